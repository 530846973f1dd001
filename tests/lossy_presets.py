"""The check every lossy preset passes on the real MiniLM, shared by the test files that run
it: one file per preset group, so that the worker scheduler (each file on one worker) can
run the int4 rebuild, the slowest, beside the others instead of after them."""

from __future__ import annotations

import graphopt
from graphopt.datasets import load_splits, text_context
from graphopt.models import load_model


def captured_minilm():
    loaded = load_model("minilm")
    program = graphopt.capture(loaded.model, kwargs=loaded.example_kwargs)
    # 16 training sentences calibrate; the budget is measured on verification texts.
    splits = load_splits(calibration=16, verification=32, heldout=0)
    return program, text_context(loaded.tokenizer, splits, list(loaded.example_kwargs))


def check_lossy_preset(captured, ctx, preset: str, tmp_path) -> None:
    # Padded positions' outputs may drift far (int8: cosine 0.91 over every position) while
    # the real tokens stay at 0.99. The budget counts the real tokens only, so the preset's
    # quantize stage must survive it.
    result = graphopt.optimize(captured, preset, context=ctx)
    statuses = {record.name: record.status for record in result.report.passes}
    assert statuses["quantize"] == "applied", result.report.failures
    if preset != "int8":  # balanced calibrates its static ranges (and smooth its α), int4 rounds with GPTQ: on the context's texts
        quantize = next(record for record in result.report.passes if record.name == "quantize")
        assert ctx.calibration_source in quantize.info["calibration"]
    assert not result.report.failures
    assert result.report.final_drift["cosine"] >= result.recipe.budget.min_cosine
    assert result.program.parameter_stats() != captured.parameter_stats()
    # Static int8 (balanced) and int8-compute weight-only (int4) programs differ from ORT
    # by rounding flips, not by lowering errors: parity holds them to their rounding floor.
    result.export(tmp_path / "model.onnx")
    assert result.parity.passed

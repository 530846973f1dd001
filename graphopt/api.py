"""``graphopt.optimize(...)`` and what it returns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graphopt.capture import capture
from graphopt.context import PassContext, Services
from graphopt.datasets import program_context
from graphopt.errors import ParityError
from graphopt.instrument import Instrumentation, default_instrumentations
from graphopt.manager import ManagerInfo, PassManager
from graphopt.passbase import Pass
from graphopt.pipeline import as_manager
from graphopt.program import Program
from graphopt.recipe import Recipe
from graphopt.report import Report
from graphopt.verify import Budget


@dataclass
class OptimizeResult:
    program: Program
    report: Report
    recipe: Recipe
    exported: Any = None  # export.ExportResult once export() ran
    parity: Any = None  # export.ParityReport once export() ran with parity
    extras: dict = field(default_factory=dict)

    def export(self, path: str | Path, *, opset: int | None = None, parity: bool | None = None, external_data: bool | str | None = None):
        """Export to ONNX (atomically), check it fully, and check ORT parity against the
        optimized program on the example inputs and on other batch/sequence sizes.

        A parity failure raises :class:`ParityError` with the figures; the report records
        export size and parity either way.
        """
        from graphopt.export import check_parity, to_onnx

        settings = self.recipe.export
        exported = to_onnx(
            self.program,
            path,
            opset=opset or settings.opset,
            external_data=settings.external_data if external_data is None else external_data,
            strip_metadata=settings.strip_metadata,
        )
        self.exported = exported
        self.report.sections["export"] = {
            "path": str(exported.path),
            "bytes": exported.bytes,
            "opset": exported.opset,
            "initializers": exported.initializer_count,
            "initializer_bytes": exported.initializer_bytes,
            "deduplicated_initializers": exported.deduplicated_initializers,
            "external_data": str(exported.external_data_path) if exported.external_data_path else None,
            "export_seconds": round(exported.export_seconds, 2),
        }
        if parity if parity is not None else settings.parity:
            try:
                self.parity = check_parity(self.program, exported.path, atol=settings.parity_atol, rtol=settings.parity_rtol)
            except ParityError as exc:
                self.report.sections["parity"] = {"passed": False, "error": str(exc)}
                self.report.failures.append(f"ORT parity failed: {exc}")
                raise
            worst = self.parity.worst
            self.report.sections["parity"] = {
                "passed": self.parity.passed,
                "atol": self.parity.atol,
                "rtol": self.parity.rtol,
                "input_sets": sorted({r.input_set for r in self.parity.results}),
                "worst": worst.describe() if worst else "",
            }
        return exported


def optimize(
    model: Program | torch.nn.Module,
    pipeline: str | PassManager | list | Recipe | Path | None = None,
    *,
    args: tuple = (),
    kwargs: dict | None = None,
    dynamic_shapes: Any = "auto",
    budget: Any = None,
    on_failure: str | None = None,
    context: PassContext | None = None,
    instrumentations: Sequence[Instrumentation] | None = None,
    reproducer_dir: str | Path | None = None,
    progress: bool = False,
    print_after_change: str | Path | None = None,
) -> OptimizeResult:
    """Run a pipeline over a captured program (or capture the model first).

    ``pipeline`` is a textual pipeline (``"dce,dedup,sdpa"``), a :class:`PassManager`,
    a list of passes, a :class:`Recipe`, or the path / preset name of a TOML recipe
    (``None``: the default recipe). ``context`` brings the passes' data (calibration,
    verification, tokenizer, ...; :mod:`graphopt.datasets` builds one from text); without
    one, a program is calibrated and verified on seeded random inputs over its dynamic
    shapes. The original program is the context's teacher. ``instrumentations`` replaces the
    standard set (:func:`graphopt.instrument.default_instrumentations`). The input program
    is never modified: the pipeline runs on a copy.
    """
    recipe = _as_recipe(pipeline)
    if isinstance(budget, dict):
        budget = Budget(**budget)
    program = model if isinstance(model, Program) else capture(model, args, kwargs, dynamic_shapes)
    explicit = isinstance(pipeline, (PassManager, Pass, list, tuple))
    settings = dict(reproducer_dir=reproducer_dir, progress=progress, print_after_change=print_after_change)
    manager = as_manager(pipeline) if explicit else recipe.manager(**settings)
    if budget is not None:
        manager.budget = budget
    if on_failure is not None:
        manager.on_failure = on_failure  # type: ignore[assignment]
    if instrumentations is not None:
        manager.instrumentations = list(instrumentations)
    elif manager.instrumentations is None:
        manager.instrumentations = default_instrumentations(**settings)
    ctx = _complete(context if context is not None else PassContext(), program)
    ctx = ctx.replace(teacher=ctx.teacher or program, services=ctx.services if ctx.services.block_timer else default_services())
    result = manager(program.clone(), ctx)
    assert isinstance(result.info, ManagerInfo)
    return OptimizeResult(program=result.program, report=result.info.report, recipe=recipe)


def _complete(ctx: PassContext, program: Program) -> PassContext:
    """The context with verification (and, without a tokenizer, calibration) data filled in
    from seeded random inputs over the program's shapes, so that what the run is verified
    on is part of the context (and of a reproducer)."""
    if ctx.verification and (ctx.calibration or ctx.tokenizer is not None):
        return ctx
    made = program_context(program)
    if not ctx.verification:
        ctx = ctx.replace(verification=made.verification, verification_source=made.verification_source)
    if not ctx.calibration and ctx.tokenizer is None:
        ctx = ctx.replace(calibration=made.calibration, calibration_source=made.calibration_source)
    return ctx


def default_services() -> Services:
    """The services the top layer lends to passes: ORT block timing (latency-aware pruning)."""

    def block_timer(provider: str, threads: int, tokens: int) -> Any:
        from graphopt.export.latency import BlockTimer

        return BlockTimer(provider, threads, tokens)

    return Services(block_timer=block_timer)


def _as_recipe(pipeline: Any) -> Recipe:
    if isinstance(pipeline, Recipe):
        return pipeline
    if pipeline is None:
        return Recipe.load("default")
    from graphopt.recipe import presets

    if isinstance(pipeline, Path) or (isinstance(pipeline, str) and (pipeline.endswith(".toml") or pipeline in presets())):
        return Recipe.load(pipeline)
    if isinstance(pipeline, str):
        return Recipe.from_dict({"pipeline": pipeline}, source="pipeline")
    return Recipe()

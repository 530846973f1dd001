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
from graphopt.decoder import decoder_context, is_decoder_spec
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
    budget: Budget = field(default_factory=Budget)  # what the run's lossy passes were held to

    def export(self, path: str | Path, *, opset: int | None = None, parity: bool | None = None, external_data: bool | str | None = None):
        """Export to ONNX (atomically) and check it fully; then, unless ``parity`` is False
        (default: the recipe's ``[export] parity``), check ORT parity with
        :meth:`check_parity` on the recipe's ``[runtime]`` session settings (``"auto"``
        disabled optimizers: the provider's known slow fusions, unmeasured). The build step
        exports with ``parity=False`` and checks parity on the settings it measured.

        The report records the export either way; a parity failure raises :class:`ParityError`.
        """
        from graphopt.export import to_onnx

        settings = self.recipe.export
        exported = to_onnx(
            self.program,
            path,
            opset=opset or settings.opset,
            external_data=settings.external_data if external_data is None else external_data,
            strip_metadata=settings.strip_metadata,
            skip_norm=settings.skip_norm,
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
        if exported.kv_buffer:  # decoders: whether generation shares one cache buffer between past and present
            self.report.sections["export"]["kv_buffer"] = exported.kv_buffer
        if exported.logits_to_keep:  # decoders: whether generation computes the last position's logits only
            self.report.sections["export"]["logits_to_keep"] = exported.logits_to_keep
        if exported.skip_norms:  # residual Adds fused with the RMSNorm after them
            self.report.sections["export"]["skip_norms"] = exported.skip_norms
        if parity if parity is not None else settings.parity:
            runtime = self.recipe.runtime
            disabled = list(runtime.disabled_optimizers) if isinstance(runtime.disabled_optimizers, tuple) else runtime.disabled_optimizers
            self.check_parity(session={"provider": runtime.provider, "threads": runtime.threads, "graph_optimization": runtime.graph_optimization,
                                       "disabled_optimizers": disabled})
        return exported

    def check_parity(self, *, session: dict | None = None, original: Program | None = None):
        """Check ORT parity of the exported model on exactly the session ``session`` describes
        (:func:`graphopt.export.make_session` keywords: provider, threads, graph_optimization,
        disabled_optimizers; default: ORT's), against the optimized program (end to end, op by
        op and along the chain: :func:`graphopt.export.check_parity`) and, given ``original``,
        against the original program.

        Against the original: when every pass that changed the program is exact, ORT must be
        within the pipeline's exact tolerance (the verification's ``exact_tolerance``, max rel
        over every position) plus ORT's own deviation from the optimized program on that input
        set (the two add; the second is held to atol/rtol by the first check). Else ORT must
        be finite wherever the original is, and within the run's budget ``min_cosine`` on
        the real positions of the example inputs (random sets: reported, not gated; see
        graphopt.export.parity). Records the report's ``parity`` section either way; raises
        :class:`ParityError` on failure.
        """
        from graphopt.export import check_parity

        if self.exported is None:
            raise ParityError("nothing was exported: call export() first")
        settings = self.recipe.export
        exact = all(record.exact for record in self.report.passes if record.status == "applied")
        tolerance = self.report.verification.get("exact_tolerance") or self.budget.exact_tolerance()
        try:
            self.parity = check_parity(
                self.program, self.exported.path, atol=settings.parity_atol, rtol=settings.parity_rtol, **(session or {}),
                original=original, original_max_rel=tolerance if exact else None,
                original_min_cosine=None if exact else self.budget.min_cosine,
                op_sites=self.exported.op_sites, raise_on_failure=False,
            )
        except Exception as exc:
            self.report.sections["parity"] = {"passed": False, "session": session or {}, "error": f"{type(exc).__name__}: {exc}"}
            self.report.failures.append(f"ORT parity could not be checked: {type(exc).__name__}: {exc}")
            raise
        self.report.sections["parity"] = {**self.parity.summary(), "against_original": None if original is None else ("exact" if exact else "budget cosine")}
        if not self.parity.passed:
            message = self.parity.failure_message()
            self.report.failures.append(f"ORT parity failed: {message.splitlines()[1].strip() if len(message.splitlines()) > 1 else message}")
            raise ParityError(message)
        return self.parity


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
    manager = as_manager(pipeline) if explicit else recipe.manager(reproducer_dir=reproducer_dir, progress=progress, print_after_change=print_after_change)
    if budget is not None:
        manager.budget = budget
    if on_failure is not None:
        manager.on_failure = on_failure  # type: ignore[assignment]
    if instrumentations is not None:
        manager.instrumentations = list(instrumentations)
    elif manager.instrumentations is None:
        manager.instrumentations = default_instrumentations(reproducer_dir=reproducer_dir, progress=progress, print_after_change=print_after_change)
    ctx = _complete(context if context is not None else PassContext(), program)
    ctx = ctx.replace(teacher=ctx.teacher or program, services=ctx.services if ctx.services.block_timer else default_services())
    result = manager(program.clone(), ctx)
    assert isinstance(result.info, ManagerInfo)
    return OptimizeResult(program=result.program, report=result.info.report, recipe=recipe, budget=manager.budget)


def _complete(ctx: PassContext, program: Program) -> PassContext:
    """The context with verification (and, without a tokenizer, calibration) data filled in
    from seeded random inputs over the program's shapes, so that what the run is verified
    on is part of the context (and of a reproducer)."""
    if ctx.verification and (ctx.calibration or ctx.tokenizer is not None):
        return ctx
    made = decoder_context(program) if is_decoder_spec(program) else program_context(program)
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

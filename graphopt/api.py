"""``graphopt.optimize(...)`` and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graphopt.capture import capture
from graphopt.errors import ParityError
from graphopt.manager import PassManager, as_manager
from graphopt.program import Program
from graphopt.recipe import Recipe
from graphopt.report import Report


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
    reproducer_dir: str | Path | None = None,
    progress: bool = False,
) -> OptimizeResult:
    """Run a pipeline over a captured program (or capture the model first).

    ``pipeline`` is a textual pipeline (``"dce,dedup,sdpa"``), a :class:`PassManager`,
    a list of passes, a :class:`Recipe`, or the path / preset name of a TOML recipe
    (``None``: the default recipe). The input program is never modified: the pipeline
    runs on a copy.
    """
    recipe = _as_recipe(pipeline)
    if isinstance(budget, dict):
        from graphopt.verify import Budget

        budget = Budget(**budget)
    program = model if isinstance(model, Program) else capture(model, args, kwargs, dynamic_shapes)
    if isinstance(pipeline, (PassManager, list, tuple)) and not isinstance(pipeline, Recipe):
        manager = as_manager(pipeline)
        manager.budget = budget or recipe.budget
        manager.on_failure = on_failure or recipe.on_failure
    else:
        manager = recipe.manager()
        if budget is not None:
            manager.budget = budget
        if on_failure is not None:
            manager.on_failure = on_failure
    if reproducer_dir is not None:
        manager.reproducer_dir = Path(reproducer_dir)
    manager.progress = progress
    result = manager(program.clone())
    report = result.info["report"]
    return OptimizeResult(program=result.program, report=report, recipe=recipe)


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

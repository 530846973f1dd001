"""The distillation stage as a pipeline step: ``distill{steps=300,lr=1e-4}``.

Not a graph rewrite: it trains the current program's parameters to reproduce the
original program, ``ctx.teacher`` (``graphopt.optimize`` sets it to the pipeline's input).
Text models train on ``ctx.training_texts`` with ``ctx.tokenizer`` (the standard library's
training sentences when the context has a tokenizer but no texts), validating on a split
of those; models without a tokenizer on the context's calibration batches (seeded random
inputs over the dynamic shapes, :mod:`graphopt.datasets`, when the context has none). The
curve goes to ``ctx.artifacts``. Lossy, so the manager verifies it against the budget like
any other lossy pass, and rolls it back if it made things worse than allowed.
"""

from __future__ import annotations

from typing import Any, ClassVar

from graphopt.context import PassContext
from graphopt.distill import DistillConfig, DistillError, distill
from graphopt.passbase import Pass, PassConfig, PassInfo, PassResult, register_pass
from graphopt.program import Program
from graphopt.verify import EXACT_RTOL, drift


class DistillInfo(PassInfo):
    steps: int = 0
    wall_s: float = 0.0
    stopped: str = ""
    world_size: int = 1
    data: str = ""  # what the run trained on
    best_val_mean_cosine: float | None = None
    curve_png: str | None = None
    history: list[dict[str, Any]] = []  # {"step", "loss", "val_mean_cosine"}


@register_pass
class Distill(Pass):
    """Knowledge distillation from the original program (final hidden state, block
    outputs, logits); AdamW, warm-up + cosine, clipping, early stop on a validation split."""

    name: ClassVar[str] = "distill"
    Config: ClassVar[type[PassConfig]] = DistillConfig
    Info: ClassVar[type[PassInfo]] = DistillInfo
    config: DistillConfig

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        teacher = ctx.teacher
        if teacher is None:
            raise DistillError("distill needs the original program as teacher (ctx.teacher); graphopt.optimize sets it")
        # The example alone can miss a difference (approximate attention is exact on short
        # inputs): the verification batches count too.
        if drift(teacher.run(), program.run()).max_rel <= EXACT_RTOL and all(_same_on(teacher, program, batch) for batch in ctx.verification):
            return PassResult.unchanged(program, DistillInfo(), "the program computes what its teacher does on the example and verification inputs: nothing to recover")
        data, described = training_data(program, ctx, self.config)
        result = distill(program, teacher, data, self.config, tokenizer=ctx.tokenizer, report_dir=ctx.artifacts)
        scores = [h["val_mean_cosine"] for h in result.history if h.get("val_mean_cosine") is not None]
        info = DistillInfo(steps=result.steps, wall_s=round(result.wall_s, 1), stopped=result.stopped, world_size=result.world_size,
                           data=described, best_val_mean_cosine=max(scores) if scores else None, curve_png=result.curve_png,
                           history=result.history)
        return PassResult.of(result.program, result.steps > 0, info, "no training step ran")


def _same_on(teacher: Program, program: Program, batch) -> bool:
    """Whether the two compute the same on one verification batch (a teacher that cannot
    take it differs; distillation's own check then says how)."""
    args, kwargs = batch
    try:
        return drift(teacher.run(args, kwargs), program.run(args, kwargs)).max_rel <= EXACT_RTOL
    except Exception:  # noqa: BLE001 - any failure to run means "not the same"
        return False


def training_data(program: Program, ctx: PassContext, config: DistillConfig) -> tuple[Any, str]:
    """What :func:`graphopt.distill.distill` trains on, and its description."""
    if ctx.tokenizer is not None:
        if ctx.training_texts:
            return list(ctx.training_texts), f"{len(ctx.training_texts)} training texts of the context"
        return None, f"the standard library's training sentences ({config.data}): the context has no training texts"
    if ctx.calibration:
        return list(ctx.calibration), f"{len(ctx.calibration)} calibration batches ({ctx.calibration_source or 'given'})"
    from graphopt.datasets import program_context

    seeded = program_context(program)
    return list(seeded.calibration), seeded.calibration_source

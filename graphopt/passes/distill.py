"""The distillation stage as a pipeline step: ``distill{steps=300,lr=1e-4}``.

Not a graph rewrite: it trains the current program's parameters to reproduce the
original program (the pipeline's input, kept as ``program.teacher``). Text models use
the tokenizer in ``program.meta["tokenizer"]`` (the CLI sets it) and the standard
library's training sentences. Lossy, so the manager verifies it against the budget like
any other lossy pass, and rolls it back if it made things worse than allowed.
"""

from __future__ import annotations

from typing import ClassVar

from graphopt.distill import DistillConfig, DistillError, distill
from graphopt.passbase import Pass, PassConfig, PassResult, register_pass
from graphopt.program import Program
from graphopt.verify import EXACT_RTOL, drift


@register_pass
class Distill(Pass):
    """Knowledge distillation from the original program (final hidden state, block
    outputs, logits); AdamW, warm-up + cosine, clipping, early stop on a validation split."""

    name: ClassVar[str] = "distill"
    exact: ClassVar[bool] = False
    Config: ClassVar[type[PassConfig]] = DistillConfig
    needs_teacher: ClassVar[bool] = True

    def run(self, program: Program) -> PassResult:
        if program.teacher is None:
            raise DistillError("distill needs the original program as teacher; run it inside a pipeline (graphopt.optimize)")
        if drift(program.teacher.run(), program.run()).max_rel <= EXACT_RTOL:
            return PassResult(program, False, {"skipped": "the program computes what its teacher does: nothing to recover"})
        result = distill(program, program.teacher, None if program.meta.get("tokenizer") else _tensor_data(program), self.config, report_dir=program.meta.get("report_dir"))
        return PassResult(result.program, result.steps > 0, {"distill": result.to_dict(), "steps": result.steps, "wall_s": round(result.wall_s, 1), "stopped": result.stopped})


def _tensor_data(program: Program) -> list[dict]:
    """Random batches shaped like the example inputs, for models without a tokenizer."""
    import torch

    from graphopt.export.parity import random_inputs

    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(32):
        _args, kwargs = random_inputs(program, {}, generator)
        batches.append(kwargs)
    return batches

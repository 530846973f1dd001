"""Building pass contexts: the data a pipeline calibrates, trains and is verified on.

:func:`program_context` serves programs without a tokenizer: seeded random inputs over the
program's declared dynamic shapes (two sizes per dynamic axis), one stream for calibration
and another, with other seeds, for verification.
"""

from __future__ import annotations

from typing import Any

from graphopt.context import Batch, PassContext
from graphopt.inputs import dynamic_axis_names, random_batches
from graphopt.program import Program

CALIBRATION_SEED = 7
VERIFICATION_SEED = 1_000_003
CALIBRATION_BATCHES = 8
VERIFICATION_BATCHES = 16  # batch sizes 1 and 3 alternating: 32 samples


def program_context(program: Program, *, calibration_batches: int = CALIBRATION_BATCHES, verification_batches: int = VERIFICATION_BATCHES, **fields: Any) -> PassContext:
    """A context of seeded random inputs over ``program``'s dynamic shapes (its example
    first among the calibration batches); ``fields`` set the rest of the context."""
    shapes = runnable_shapes(program)
    calibration = [(tuple(program.args), dict(program.kwargs)), *random_batches(program, calibration_batches, seed=CALIBRATION_SEED, shapes=shapes)]
    verification = random_batches(program, verification_batches, seed=VERIFICATION_SEED, shapes=shapes)
    described = describe_shapes(shapes)
    return PassContext(
        calibration=tuple(calibration),
        calibration_source=f"the example and {calibration_batches} seeded random batches ({described})",
        verification=tuple(verification),
        verification_source=f"{verification_batches} seeded random batches ({described})",
        **fields,
    )


def runnable_shapes(program: Program) -> tuple[dict[str, int], ...] | None:
    """Two sizes of every dynamic axis (batch 1 and 3, other axes 7 and 19) that the program
    accepts; the example's own shape when it accepts neither or declares no dynamic axis."""
    axes = sorted({label for labels in dynamic_axis_names(program).values() for label in labels.values()})
    if not axes:
        return None
    candidates = ({a: (1 if a == "batch" else 7) for a in axes}, {a: (3 if a == "batch" else 19) for a in axes})
    kept = []
    for shape in candidates:
        try:
            (batch,) = random_batches(program, 1, seed=0, shapes=(shape,))
            program.run(*batch)
        except Exception:  # noqa: BLE001 - a size outside the program's range: leave it out
            continue
        kept.append(shape)
    return tuple(kept) or ({},)


def describe_shapes(shapes: tuple[dict[str, int], ...] | None) -> str:
    if not shapes or shapes == ({},):
        return "the example's shape"
    return "; ".join(", ".join(f"{k}={v}" for k, v in shape.items()) for shape in shapes)


__all__ = ["Batch", "program_context", "runnable_shapes"]

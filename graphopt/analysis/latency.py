"""A group's matmuls as a block, and the width to keep chosen from measured block latency.

A group's 2-D weights are its block: every member ``W`` of shape ``[a, b]`` cut along
``dim`` is a ``[tokens, k] × [k, n]`` MatMul whose cut side has the candidate width (the
other side is the weight's other dim). Timing the block on the target runtime is what
tells a width that the kernels run faster (a multiple of their tile) from one that only
has fewer FLOPs. The timing itself is not here: passes get a :class:`BlockTiming` from
``ctx.services.block_timer`` (ONNX Runtime's is :class:`graphopt.export.latency.BlockTimer`),
so this module and the prune pass import no runtime.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from graphopt.analysis.groups import Group

Block = tuple[tuple[int, int, bool], ...]  # (other dim, rows per unit, cut is the output side)


class BlockTiming(Protocol):
    """Milliseconds of ``block`` with ``units`` units kept, on some runtime."""

    def ms(self, block: Block, units: int) -> float: ...


def block_of(group: Group, shapes: dict[str, tuple[int, ...]]) -> Block:
    """The matmuls of ``group``: one entry per 2-D member weight."""
    entries = []
    for member in group.members:
        shape = shapes.get(member.attr)
        if shape is None or len(shape) != 2:
            continue
        rows_per_unit = int((member.units == 0).sum()) or 1
        entries.append((shape[1 - member.dim], rows_per_unit, member.dim == 0))
    return tuple(sorted(entries))


def choose_width(timer: BlockTiming, block: Block, size: int, planned: int, multiple: int, tolerance: float,
                 span: int = 3) -> tuple[int, dict[int, float]]:
    """The widest width, from ``planned`` up by steps of ``multiple`` (``span`` of them), that
    runs no slower than ``planned`` (within ``tolerance``): units the kernels make free are
    kept. When even the planned cut is not measurably faster than the full width, the
    group is not cut at all: it would lose accuracy for nothing.
    """
    candidates = sorted({min(planned + k * multiple, size) for k in range(span + 1)} | {size})
    measured = {w: timer.ms(block, w) for w in candidates}
    if measured[planned] >= measured[size] * (1 - tolerance):
        return size, measured
    chosen = max(w for w, t in measured.items() if w < size and t <= measured[planned] * (1 + tolerance))
    return chosen, measured


def measured_block_ms(timer: BlockTiming, blocks: Sequence[tuple[Block, int]]) -> float:
    return sum(timer.ms(block, units) for block, units in blocks)

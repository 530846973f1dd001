"""Latency-aware widths: re-choose each group's kept width from measured block latency.

For every group the block of its matmuls (:func:`graphopt.analysis.latency.block_of`) is
timed from the planned width up, on the timer the context lends
(``ctx.services.block_timer``; ONNX Runtime's in ``graphopt.optimize``): units the
kernels make free are kept, and a cut that is not measurably faster than the full width
is not made (:func:`graphopt.analysis.latency.choose_width`).
"""

from __future__ import annotations

from graphopt.analysis.groups import DependencyAnalysis
from graphopt.analysis.latency import BlockTiming, block_of, choose_width
from graphopt.program import Program
from graphopt.pruning.config import GroupLatency, LatencySummary, PruneConfig
from graphopt.pruning.plan import Keep, Scores, top, unit_multiple


def latency_widths(program: Program, analysis: DependencyAnalysis, keep: Keep, scores: Scores, cfg: PruneConfig,
                   timer: BlockTiming) -> tuple[Keep, dict[int, GroupLatency | None], LatencySummary]:
    """The plan with each group's width re-chosen; per group the full / planned / chosen
    milliseconds (None for a group without 2-D weights), and the predicted totals."""
    shapes = {name: tuple(t.shape) for name, t in program.tensors().items()}
    chosen_keep = dict(keep)
    report: dict[int, GroupLatency | None] = {}
    full_total = chosen_total = planned_total = 0.0
    for gid in sorted(keep):
        group = analysis.group(gid)
        block = block_of(group, shapes)
        planned = int(keep[gid].numel())
        if not block:
            report[gid] = None
            continue
        chosen, measured = choose_width(timer, block, group.size, planned, unit_multiple(group.kind, cfg), cfg.latency_tolerance)
        full = timer.ms(block, group.size)
        chosen_keep[gid] = top(scores[gid], chosen)
        report[gid] = GroupLatency(full=full, planned=measured[planned], chosen=measured[chosen], planned_width=planned,
                                   measured={str(w): t for w, t in measured.items()})
        full_total, planned_total, chosen_total = full_total + full, planned_total + measured[planned], chosen_total + measured[chosen]
    summary = LatencySummary(provider=cfg.latency_provider, tokens=cfg.latency_tokens, threads=cfg.latency_threads,
                             predicted_full_ms=full_total, predicted_planned_ms=planned_total, predicted_chosen_ms=chosen_total)
    return chosen_keep, report, summary

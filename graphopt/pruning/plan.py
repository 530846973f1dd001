"""Planning a prune: which units of each dependency group to keep.

Ratios per kind give each group a count, rounded to a multiple (channel kinds) and no
smaller than ``min_keep``; ``scope=layer`` ranks within each group, ``scope=global`` puts
one threshold on the raw scores across every group of a kind, so width moves to the
layers whose units score higher. With ``target_params`` one factor scales every ratio,
found by bisection on the parameter count the plan predicts.
"""

from __future__ import annotations

import torch

from graphopt.analysis.groups import DependencyAnalysis, Group
from graphopt.program import Program
from graphopt.pruning.config import PruneConfig, TargetFit
from graphopt.surgery import get_tensor

Scores = dict[int, torch.Tensor]
Keep = dict[int, torch.Tensor]  # group id -> kept unit indices, ascending


def plan(groups: list[Group], scores: Scores, cfg: PruneConfig) -> Keep:
    """Indices to keep in each group, sorted ascending."""
    keep: Keep = {}
    by_kind: dict[str, list[Group]] = {}
    for g in groups:
        by_kind.setdefault(g.kind, []).append(g)
    for kind, members in by_kind.items():
        ratio = getattr(cfg, kind)
        multiple = unit_multiple(kind, cfg)
        if cfg.scope == "layer" or len(members) == 1:
            counts = {g.id: keep_count(g.size, ratio, multiple, cfg.min_keep) for g in members}
        else:
            counts = global_counts(members, scores, ratio, multiple, cfg.min_keep)
        for g in members:
            keep[g.id] = top(scores[g.id], counts[g.id])
    return keep


def unit_multiple(kind: str, cfg: PruneConfig) -> int:
    """Heads are counted one by one; channel widths round to ``cfg.multiple``."""
    return 1 if kind in ("heads", "kv_heads") else cfg.multiple


def keep_count(size: int, ratio: float, multiple: int, min_keep: int) -> int:
    target = size * (1.0 - ratio)
    count = round(target / multiple) * multiple
    floor = -(-max(min_keep, 1) // multiple) * multiple  # min_keep rounded up to the multiple
    return min(max(count, floor), size)


def global_counts(members: list[Group], scores: Scores, ratio: float, multiple: int, min_keep: int) -> dict[int, int]:
    """One threshold on the raw scores across all groups of a kind."""
    total = sum(g.size for g in members)
    n_remove = round(total * ratio)
    pool: list[tuple[float, int]] = []
    for g in members:
        pool.extend((float(v), g.id) for v in scores[g.id])
    pool.sort()
    removed: dict[int, int] = {g.id: 0 for g in members}
    for _, gid in pool[:n_remove]:
        removed[gid] += 1
    counts = {}
    for g in members:
        kept = g.size - removed[g.id]
        counts[g.id] = keep_count(g.size, 1.0 - kept / g.size, multiple, min_keep)
    return counts


def top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` highest-scoring units (ties: the lower index), ascending."""
    return torch.sort(torch.argsort(scores, descending=True, stable=True)[:count]).values


# ---- parameter target ----------------------------------------------------------------------
def predicted_params(program: Program, analysis: DependencyAnalysis, keep: Keep) -> int:
    """Parameters the program would hold after :func:`graphopt.pruning.apply.apply_plan` with ``keep``."""
    graph, seen, total = analysis.graph, set(), 0
    counts: dict[int, int] = {}
    for node in program.graph.nodes:
        if node.op != "get_attr" or node.target in seen:
            continue
        seen.add(node.target)
        tensor = get_tensor(program.module, node.target)
        if not isinstance(tensor, torch.Tensor):
            continue
        numel = 1
        for d, size in enumerate(tensor.shape):
            sid = graph.slot_space.get((f"attr:{node.target}", 0, d))
            if sid in analysis.coords and set(analysis.coords[sid]) & set(keep):
                if sid not in counts:
                    counts[sid] = int(analysis.kept_indices(sid, keep).numel())
                size = counts[sid]
            numel *= size
        total += numel
    return total


def fit_params(program: Program, analysis: DependencyAnalysis, groups: list[Group], scores: Scores, cfg: PruneConfig) -> tuple[PruneConfig, TargetFit]:
    """Scale every ratio by one factor so the pruned program keeps ``target_params`` of its parameters."""
    assert cfg.target_params is not None
    ratios = cfg.ratios()
    goal = cfg.target_params * predicted_params(program, analysis, {})

    def scaled(factor: float) -> PruneConfig:
        return cfg.model_copy(update={kind: min(r * factor, 0.999) for kind, r in ratios.items()})

    def params(factor: float) -> int:
        return predicted_params(program, analysis, plan(groups, scores, scaled(factor)))

    lo, hi = 0.0, 0.999 / max(ratios.values())
    reachable = params(hi) <= goal
    if reachable:
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if params(mid) <= goal else (mid, hi)
    fitted = scaled(hi)
    return fitted, TargetFit(target_params=int(goal), predicted_params=params(hi), reachable=reachable, ratios=fitted.ratios())

"""Structured pruning from the graph's own dependency groups (lossy).

``prune{heads=0.25,ffn=0.5}`` removes a quarter of the attention heads and half of the
FFN channels of every layer: weights are physically sliced, and every shape constant
that encodes a head count or a width (view / reshape / expand sizes, split sizes,
layer-norm shapes) is rewritten, so the result is an ordinary smaller graph that runs on
any batch and sequence length and exports to ONNX with smaller initializers.

Pieces, each usable alone:

1. :func:`graphopt.analysis.dependency_groups` finds the groups (cached on the program);
2. :func:`graphopt.analysis.importance.importance` scores their units;
3. :func:`graphopt.pruning.plan.plan` chooses the units to keep (ratios per kind,
   per-layer or global ranking, widths rounded to a multiple, a minimum per group;
   ``target_params`` scales the ratios to a parameter budget);
4. :func:`graphopt.pruning.latency.latency_widths` (``latency_aware=true``) re-chooses
   each width from block latency measured on the target runtime;
5. :func:`graphopt.pruning.reconstruct.reconstruct` (``reconstruct=true``) re-fits, by
   least squares on calibration inputs of the unpruned program, every matmul whose input
   channels are cut (Kwon et al. 2022);
6. :func:`graphopt.pruning.apply.apply_plan` rewrites the program.

Calibration data for the data-driven criteria (``taylor``, ``activation``) and for the
reconstruction is ``ctx.calibration`` (training text only; at most
``calibration_batches`` batches), or else the program's example inputs. Block timing for
``latency_aware`` is ``ctx.services.block_timer``: without one the pass is skipped, since
planning widths without measuring them is what ``latency_aware=false`` already does.

Hidden width is the residual stream, which is also the output of an encoder: it is only
cut with ``allow_output_change=true``, since it changes the output's shape (the pass
manager then cannot compare outputs with the reference; use it outside a budgeted run).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from graphopt.analysis.groups import DependencyAnalysis, Group, dependency_groups
from graphopt.analysis.importance import importance
from graphopt.context import Batch, PassContext
from graphopt.passbase import Pass, PassConfig, PassInfo, PassResult, register_pass
from graphopt.program import Program
from graphopt.pruning.apply import apply_plan
from graphopt.pruning.config import (
    GroupLatency,
    GroupReport,
    NotPrunable,
    PruneConfig,
    PruneInfo,
    ReconstructionSummary,
)
from graphopt.pruning.latency import latency_widths
from graphopt.pruning.plan import Keep, fit_params, plan
from graphopt.pruning.reconstruct import reconstruct

_DATA_CRITERIA = ("taylor", "activation")


@register_pass
class Prune(Pass):
    """Remove attention heads, kv heads, FFN channels or hidden width, physically, ranked by importance."""

    name: ClassVar[str] = "prune"
    Config: ClassVar[type[PassConfig]] = PruneConfig
    Info: ClassVar[type[PassInfo]] = PruneInfo
    requires_ir = ("aten",)
    config: PruneConfig

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        cfg = self.config
        analysis = dependency_groups(program)
        info = PruneInfo(not_prunable=[NotPrunable(**entry) for entry in analysis.unhandled])
        ratios = cfg.ratios()
        if not ratios:
            return PassResult.unchanged(program, info, "all ratios are 0")
        if cfg.latency_aware and ctx.services.block_timer is None:
            return PassResult.skipped(program, "latency_aware=true needs a block timer (ctx.services.block_timer) to measure widths on the "
                                      "target runtime; graphopt.optimize lends ONNX Runtime's", info)
        groups = [g for kind in ratios for g in analysis.prunable(kind, allow_output_change=cfg.allow_output_change)]
        info.kinds_without_groups = [kind for kind in ratios if not any(g.kind == kind for g in groups)]
        calibration, source = ctx.calibration_batches(program, cfg.calibration_batches)
        if cfg.importance in _DATA_CRITERIA or cfg.reconstruct:
            info.calibration = source
        keep = self._plan(program, ctx, analysis, groups, calibration, info)
        cut = {gid: kept for gid, kept in keep.items() if kept.numel() < analysis.group(gid).size}
        if not cut:
            return PassResult.unchanged(program, info, _nothing_to_cut(groups, info, cfg))
        if cfg.reconstruct:
            fitted = reconstruct(program, analysis, cut, calibration, cfg.reconstruct_damp)
            info.reconstruction = ReconstructionSummary(data=source, batches=len(calibration), damp=cfg.reconstruct_damp)
            for entry, gid in zip(info.groups, sorted(keep)):
                entry.reconstructed = False
                for key, value in fitted.get(gid, {}).items():
                    setattr(entry, key, value)
        self._apply(program, analysis, cut, keep, info)
        return PassResult.applied(program, info)

    def _plan(self, program: Program, ctx: PassContext, analysis: DependencyAnalysis, groups: list[Group],
              calibration: list[Batch], info: PruneInfo) -> Keep:
        """Scores, the parameter target, the plan and (latency-aware) the measured widths;
        the per-group report entries."""
        cfg = self.config
        scores = importance(cfg.importance, program, groups, calibration)
        if cfg.target_params is not None:
            cfg, info.target = fit_params(program, analysis, groups, scores, cfg)
        keep = plan(groups, scores, cfg)
        latency: dict[int, GroupLatency | None] = {}
        if cfg.latency_aware:
            assert ctx.services.block_timer is not None
            timer = ctx.services.block_timer(cfg.latency_provider, cfg.latency_threads, cfg.latency_tokens)
            keep, latency, info.latency = latency_widths(program, analysis, keep, scores, cfg, timer)
        info.groups = [_describe(analysis.group(gid), keep[gid], latency.get(gid)) for gid in sorted(keep)]
        return keep

    def _apply(self, program: Program, analysis: DependencyAnalysis, cut: Keep, keep: Keep, info: PruneInfo) -> None:
        """Rewrite the program; parameters before and after, per group and in all."""
        info.params_before = program.parameter_stats()["parameters"]
        sizes_before = {name: t.numel() for name, t in program.tensors().items()}
        apply_plan(program, analysis, cut)
        sizes_after = {name: t.numel() for name, t in program.tensors().items()}
        for entry, gid in zip(info.groups, sorted(keep)):
            attrs = {m.attr for m in analysis.group(gid).members}
            entry.params_before = sum(sizes_before.get(a, 0) for a in attrs)
            entry.params_after = sum(sizes_after.get(a, 0) for a in attrs)
        info.params_after = program.parameter_stats()["parameters"]


def _describe(group: Group, kept: torch.Tensor, latency: GroupLatency | None) -> GroupReport:
    return GroupReport(kind=group.kind, module_path=group.module_path, size=group.size, kept=int(kept.numel()),
                       kept_indices=kept.tolist(), latency_ms=latency)


def _nothing_to_cut(groups: list[Group], info: PruneInfo, cfg: PruneConfig) -> str:
    if groups:
        return "nothing to cut after rounding"
    asked_hidden = "hidden" in info.kinds_without_groups and not cfg.allow_output_change
    hint = " (hidden width reaches the output: allow_output_change=true cuts it)" if asked_hidden else ""
    return f"no prunable group of the kinds asked for ({', '.join(info.kinds_without_groups)}){hint}"


__all__ = ["Prune", "PruneConfig", "PruneInfo"]

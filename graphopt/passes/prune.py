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

Decoders (:func:`graphopt.decoder.capture_decoder`): heads are found at
``scaled_dot_product_attention`` (run ``sdpa`` first on eager attention). Query heads
under grouped-query attention are the axis ``repeat_kv`` expands, so each kv group loses
the same ones and the cache is untouched; FFN channels (SwiGLU's gate, up and down) are cut
alike. Kv heads are the KV cache's head axis (``past_key_values.N`` / ``present.N`` dim 1),
so cutting them changes the cache layout: each kv head goes with its query heads (the
ratio stays uniform), every layer must keep the same count (the cache has one layout,
``DecoderSpec.kv_heads``, which the pass updates with the example inputs), and it takes
``allow_output_change=true``. Under the pass manager the cut is verified like any lossy
pass: steps built on the old cache cannot run the result, so the manager replays each
verification run (prefill, then decode steps) on the pruned program's own cache and
compares the logits with the original's; later passes get the replayed steps
(:func:`graphopt.decoder.replay_steps`).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from graphopt.analysis.groups import DependencyAnalysis, Group, dependency_groups
from graphopt.analysis.importance import importance
from graphopt.context import Batch, PassContext
from graphopt.decoder import DecoderSpec, decoder_spec, is_decoder_spec, python_past_names
from graphopt.passbase import Pass, PassConfig, PassInfo, PassResult, register_pass
from graphopt.program import Program
from graphopt.pruning.apply import apply_plan, changed_spaces, input_cuts
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

aten = torch.ops.aten
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
            return PassResult.unchanged(program, info, _nothing_to_cut(program, analysis, groups, info, cfg))
        kv_heads = _cache_heads(program, analysis, cut)
        if kv_heads is not None:
            refusal = _cache_refusal(program, kv_heads)
            if refusal:
                return PassResult.skipped(program, refusal, info)
        if cfg.reconstruct:
            fitted = reconstruct(program, analysis, cut, calibration, cfg.reconstruct_damp)
            info.reconstruction = ReconstructionSummary(data=source, batches=len(calibration), damp=cfg.reconstruct_damp)
            for entry, gid in zip(info.groups, sorted(keep)):
                entry.reconstructed = False
                for key, value in fitted.get(gid, {}).items():
                    setattr(entry, key, value)
        self._apply(program, analysis, cut, keep, info)
        if kv_heads is not None:
            spec = decoder_spec(program)
            program.meta["decoder"] = DecoderSpec.from_dict({**spec.to_dict(), "kv_heads": kv_heads[0]}).to_dict()
            info.cache_kv_heads = kv_heads[0]
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


def _cache_heads(program: Program, analysis: DependencyAnalysis, cut: Keep) -> list[int] | None:
    """Kv heads of each past input of a decoder after the cut, or None when the cache keeps its layout."""
    if not is_decoder_spec(program):
        return None
    spec = decoder_spec(program)
    cuts = input_cuts(program, analysis, changed_spaces(analysis, cut))
    heads = [int(cuts[name][1].numel()) if 1 in cuts.get(name, {}) else spec.kv_heads for name in python_past_names(spec.layers)]
    return heads if set(heads) != {spec.kv_heads} else None


def _cache_refusal(program: Program, kv_heads: list[int]) -> str:
    """Why a cut of the cache's kv heads to ``kv_heads`` (per past input) cannot be made, or ""."""
    spec = decoder_spec(program)
    if len(set(kv_heads)) > 1:
        per_layer = ", ".join(f"layer {i}: {n}" for i, n in enumerate(kv_heads[::2]))
        return (f"the plan leaves the layers different kv-head counts ({per_layer}), but a decoder's KV cache has one layout "
                f"for every layer (DecoderSpec.kv_heads={spec.kv_heads}): use scope=layer, or cut every layer's kv heads")
    return ""


def _nothing_to_cut(program: Program, analysis: DependencyAnalysis, groups: list[Group], info: PruneInfo, cfg: PruneConfig) -> str:
    if groups:
        return "nothing to cut after rounding"
    hints = []
    if "hidden" in info.kinds_without_groups and not cfg.allow_output_change:
        hints.append("hidden width reaches the output: allow_output_change=true cuts it")
    if "kv_heads" in info.kinds_without_groups and not cfg.allow_output_change and any(g.cache for g in analysis.prunable("kv_heads", allow_output_change=True)):
        hints.append("kv heads are the KV cache's head axis (past_key_values.N / present.N dim 1): allow_output_change=true cuts them "
                     "and updates the DecoderSpec")
    heads_asked = {"heads", "kv_heads"} & set(info.kinds_without_groups)
    if heads_asked and not any(n.target is aten.scaled_dot_product_attention.default for n in program.graph.nodes):
        hints.append("heads are found at scaled_dot_product_attention and this graph has none: run sdpa first on eager attention, "
                     "and prune before fusing attention kernels")
    hint = f" ({'; '.join(hints)})" if hints else ""
    return f"no prunable group of the kinds asked for ({', '.join(info.kinds_without_groups)}){hint}"


__all__ = ["Prune", "PruneConfig", "PruneInfo"]

"""Structured pruning from the graph's own dependency groups (lossy).

``prune{heads=0.25,ffn=0.5}`` removes a quarter of the attention heads and half of the
FFN channels of every layer: weights are physically sliced, and every shape constant
that encodes a head count or a width (view / reshape / expand sizes, split sizes,
layer-norm shapes) is rewritten, so the result is an ordinary smaller graph that runs on
any batch and sequence length and exports to ONNX with smaller initializers.

Pieces, each usable alone:

1. :func:`graphopt.analysis.dependency_groups` finds the groups (cached on the program);
2. :func:`graphopt.analysis.importance.importance` scores their units;
3. :func:`plan` chooses the units to keep (ratios per kind, per-layer or global ranking,
   widths rounded to a multiple, a minimum per group);
4. :func:`reconstruct` (``reconstruct=true``) re-fits, by least squares on calibration
   inputs of the unpruned program, every matmul whose input channels are cut, so that its
   output from the kept channels matches the unpruned one (the bias absorbs the mean of
   the removed channels): the layer-wise reconstruction of Kwon et al. 2022;
5. :func:`apply_plan` rewrites the program.

Calibration data for the data-driven criteria (``taylor``, ``activation``) and for the
reconstruction is ``program.meta["calibration"]`` (a list of ``(args, kwargs)`` batches,
training text only) or else the program's example inputs.

Hidden width is the residual stream, which is also the output of an encoder: it is only
cut with ``allow_output_change=true``, since it changes the output's shape (the pass
manager then cannot compare outputs with the reference; use it outside a budgeted run).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.fx as fx
from pydantic import Field
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from graphopt.analysis.groups import DependencyAnalysis, Group, dependency_groups
from graphopt.analysis.importance import importance, input_moments, matmul_readers
from graphopt.passbase import Pass, PassConfig, PassResult, register_pass
from graphopt.program import Program

aten = torch.ops.aten
Ratio = Field(0.0, ge=0.0, lt=1.0)


class PruneConfig(PassConfig):
    heads: float = Ratio  # fraction of query heads removed (per kv group under GQA)
    kv_heads: float = Ratio  # fraction of kv heads removed, each with its query heads (GQA)
    ffn: float = Ratio  # fraction of FFN channels removed
    hidden: float = Ratio  # fraction of the residual stream's width removed
    importance: Literal["l1", "l2", "taylor", "activation"] = "l2"
    scope: Literal["layer", "global"] = "layer"  # rank within each group, or across groups of a kind
    multiple: int = Field(8, ge=1)  # channel counts (ffn, hidden) are rounded to this multiple
    min_keep: int = Field(1, ge=1)  # never keep fewer units than this in a group
    allow_output_change: bool = False  # allow cutting spaces that reach a graph output
    calibration_batches: int = Field(8, ge=1)
    # A parameter budget: keep this fraction of the program's parameters. The kind ratios
    # then only give the proportions; one factor scaling them all is found by bisection.
    target_params: float | None = Field(None, gt=0.0, lt=1.0)
    # Latency-aware widths: time each group's matmuls on ONNX Runtime from the planned width
    # up; keep the widest no slower than the plan, and skip cuts that are not measurably faster.
    latency_aware: bool = False
    latency_tolerance: float = Field(0.03, ge=0.0, le=1.0)
    latency_tokens: int = Field(128, ge=1)  # rows of the timed matmuls (batch x sequence)
    latency_threads: int = Field(1, ge=1)
    latency_provider: str = "cpu"
    # Re-fit the matmuls that read cut channels on the calibration inputs (least squares);
    # the ridge term, a fraction of the mean input energy, pulls the kept weights to their old values.
    reconstruct: bool = False
    reconstruct_damp: float = Field(0.01, gt=0.0)

    def ratios(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("heads", "kv_heads", "ffn", "hidden") if getattr(self, k) > 0}


@register_pass
class Prune(Pass):
    """Remove attention heads, kv heads, FFN channels or hidden width, physically, ranked by importance."""

    name: ClassVar[str] = "prune"
    exact: ClassVar[bool] = False
    Config: ClassVar[type[PassConfig]] = PruneConfig
    requires_ir = ("aten",)

    def run(self, program: Program) -> PassResult:
        cfg = self.config
        analysis = dependency_groups(program)
        info: dict = {"not_prunable": analysis.unhandled}
        ratios = cfg.ratios()
        if not ratios:
            return PassResult(program, False, {**info, "groups": [], "reason": "all ratios are 0"})
        groups = [g for kind in ratios for g in analysis.prunable(kind, allow_output_change=cfg.allow_output_change)]
        missing = [kind for kind in ratios if not any(g.kind == kind for g in groups)]
        if missing:
            info["kinds_without_groups"] = missing
        calibration = list(program.meta.get("calibration", ()))[: cfg.calibration_batches]
        scores = importance(cfg.importance, program, groups, calibration)
        if cfg.target_params is not None:
            cfg, info["target"] = _fit_params(program, analysis, groups, scores, cfg)
        keep = plan(groups, scores, cfg)
        latency = _latency_aware(program, analysis, keep, scores, cfg) if cfg.latency_aware else {}
        cut = {gid: kept for gid, kept in keep.items() if kept.numel() < analysis.group(gid).size}
        params_before = program.parameter_stats()["parameters"]
        sizes_before = {name: t.numel() for name, t in program.tensors().items()}
        info["groups"] = [_describe(analysis.group(gid), keep[gid]) for gid in sorted(keep)]
        if latency:
            info["latency"] = latency.pop("summary")
            for entry, gid in zip(info["groups"], sorted(keep)):
                entry["latency_ms"] = latency[gid]
        if not cut:
            return PassResult(program, False, {**info, "reason": "nothing to cut after rounding"})
        if cfg.reconstruct:
            data = calibration or [(program.args, program.kwargs)]
            fitted = reconstruct(program, analysis, cut, data, cfg.reconstruct_damp)
            info["reconstruction"] = {"data": "calibration" if calibration else "example inputs", "batches": len(data),
                                      "damp": cfg.reconstruct_damp}
            for entry, gid in zip(info["groups"], sorted(keep)):
                entry.update(fitted.get(gid, {"reconstructed": False}))
        apply_plan(program, analysis, cut)
        sizes_after = {name: t.numel() for name, t in program.tensors().items()}
        for entry, gid in zip(info["groups"], sorted(keep)):
            attrs = {m.attr for m in analysis.group(gid).members}
            entry["params_before"] = sum(sizes_before.get(a, 0) for a in attrs)
            entry["params_after"] = sum(sizes_after.get(a, 0) for a in attrs)
        info["params_before"] = params_before
        info["params_after"] = program.parameter_stats()["parameters"]
        return PassResult(program, True, info)


# ---- planning -----------------------------------------------------------------------------
def plan(groups: list[Group], scores: dict[int, torch.Tensor], cfg: PruneConfig) -> dict[int, torch.Tensor]:
    """Indices to keep in each group, sorted ascending."""
    keep: dict[int, torch.Tensor] = {}
    by_kind: dict[str, list[Group]] = {}
    for g in groups:
        by_kind.setdefault(g.kind, []).append(g)
    for kind, members in by_kind.items():
        ratio = getattr(cfg, kind)
        multiple = 1 if kind in ("heads", "kv_heads") else cfg.multiple
        if cfg.scope == "layer" or len(members) == 1:
            counts = {g.id: _keep_count(g.size, ratio, multiple, cfg.min_keep) for g in members}
        else:
            counts = _global_counts(members, scores, ratio, multiple, cfg.min_keep)
        for g in members:
            keep[g.id] = _top(scores[g.id], counts[g.id])
    return keep


def predicted_params(program: Program, analysis: DependencyAnalysis, keep: dict[int, torch.Tensor]) -> int:
    """Parameters the program would hold after :func:`apply_plan` with ``keep``."""
    graph, seen, total = analysis.graph, set(), 0
    counts: dict[int, int] = {}
    for node in program.graph.nodes:
        if node.op != "get_attr" or node.target in seen:
            continue
        seen.add(node.target)
        tensor = _get(program.module, node.target)
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


def _fit_params(program, analysis, groups, scores, cfg: PruneConfig) -> tuple[PruneConfig, dict]:
    """Scale every ratio by one factor so the pruned program keeps ``target_params`` of its parameters."""
    ratios = cfg.ratios()
    before = predicted_params(program, analysis, {})
    goal = cfg.target_params * before

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
    return fitted, {"target_params": int(goal), "predicted_params": params(hi), "reachable": reachable,
                    "ratios": fitted.ratios()}


def _keep_count(size: int, ratio: float, multiple: int, min_keep: int) -> int:
    target = size * (1.0 - ratio)
    count = int(round(target / multiple)) * multiple
    floor = -(-max(min_keep, 1) // multiple) * multiple  # min_keep rounded up to the multiple
    return min(max(count, floor), size)


def _global_counts(members: list[Group], scores, ratio: float, multiple: int, min_keep: int) -> dict[int, int]:
    """One threshold on the raw scores across all groups of a kind."""
    total = sum(g.size for g in members)
    n_remove = int(round(total * ratio))
    pool = []
    for g in members:
        pool.extend((float(v), g.id) for v in scores[g.id])
    pool.sort()
    removed: dict[int, int] = {g.id: 0 for g in members}
    for _, gid in pool[:n_remove]:
        removed[gid] += 1
    counts = {}
    for g in members:
        kept = g.size - removed[g.id]
        counts[g.id] = _keep_count(g.size, 1.0 - kept / g.size, multiple, min_keep)
    return counts


def _latency_aware(program: Program, analysis: DependencyAnalysis, keep: dict[int, torch.Tensor], scores,
                   cfg: PruneConfig) -> dict:
    """Re-choose each group's width from measured block latency; per group: full / planned /
    chosen milliseconds, and a summary of the predicted saving over all groups."""
    from graphopt.analysis.latency import BlockTimer, block_of, choose_width

    timer = BlockTimer(cfg.latency_provider, cfg.latency_threads, cfg.latency_tokens)
    shapes = {name: tuple(t.shape) for name, t in program.tensors().items()}
    report: dict = {}
    full_total = chosen_total = planned_total = 0.0
    for gid in sorted(keep):
        group = analysis.group(gid)
        block = block_of(group, shapes)
        planned = int(keep[gid].numel())
        if not block:
            report[gid] = None
            continue
        multiple = 1 if group.kind in ("heads", "kv_heads") else cfg.multiple
        chosen, measured = choose_width(timer, block, group.size, planned, multiple, cfg.latency_tolerance)
        full = timer.ms(block, group.size)
        keep[gid] = _top(scores[gid], chosen)
        report[gid] = {"full": full, "planned": measured[planned], "chosen": measured[chosen], "planned_width": planned,
                       "measured": {str(w): t for w, t in measured.items()}}
        full_total, planned_total, chosen_total = full_total + full, planned_total + measured[planned], chosen_total + measured[chosen]
    report["summary"] = {"provider": cfg.latency_provider, "tokens": cfg.latency_tokens, "threads": cfg.latency_threads,
                         "predicted_full_ms": full_total, "predicted_planned_ms": planned_total,
                         "predicted_chosen_ms": chosen_total}
    return report


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    return torch.sort(torch.argsort(scores, descending=True, stable=True)[:count]).values


def _describe(group: Group, kept: torch.Tensor) -> dict:
    return {"kind": group.kind, "module_path": group.module_path, "size": group.size, "kept": int(kept.numel()),
            "kept_indices": kept.tolist()}


# ---- reconstruction ----------------------------------------------------------------------
_BIAS_ARG = {aten.linear.default: 2, aten.addmm.default: 0}


def reconstruct(program: Program, analysis: DependencyAnalysis, keep: dict[int, torch.Tensor], calibration,
                damp: float) -> dict[int, dict]:
    """Re-fit every matmul whose input channels ``keep`` cuts, before :func:`apply_plan`.

    For ``y = x Wᵀ + b`` with kept input channels ``S`` and ``Σ = E[[x,1][x,1]ᵀ]`` over all
    calibration tokens (padding included) of the unpruned program, the columns ``S' = [S,1]``
    of ``[W,b]`` become ``([W,b] Σ[:,S'] + λ[W,b][:,S']) (Σ[S',S'] + λI)⁻¹``, with
    ``λ = damp · mean(diag Σ[S',S'])``: least squares, pulled towards the old weights (without
    a bias, ``S`` alone). Weights are written at full shape; :func:`apply_plan` slices the cut
    columns away. A weight or bias that is read elsewhere too (a tied embedding) is left
    alone. Returns, for each group with re-fitted consumers, the relative output error
    ``‖y'-y‖/‖y‖`` of those on the calibration inputs, with the re-fit and with plain pruning.
    """
    gm = program.module
    readers = matmul_readers(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    fits: dict[tuple[str, int], torch.Tensor] = {}
    for (attr, dim), uses in readers.items():
        sid = analysis.graph.slot_space.get((f"attr:{attr}", 0, dim))
        weight = _get(gm, attr)
        if sid not in analysis.coords or not set(analysis.coords[sid]) & set(keep) or weight.dim() != 2:
            continue
        kept = analysis.kept_indices(sid, keep)
        if kept.numel() < weight.shape[dim] and _exclusive(program, attr, {name for name, _ in uses}):
            fits[(attr, dim)] = kept
    moments = input_moments(gm, {name for key in fits for name, _ in readers[key]}, calibration)
    errors: dict[tuple[str, int], torch.Tensor] = {}
    for (attr, dim), kept in fits.items():
        uses = [name for name, _ in readers[(attr, dim)]]
        sigma = sum(moments[n][0] for n in uses) / sum(moments[n][1] for n in uses)
        weight = _get(gm, attr).detach()
        w = weight.double() if dim == 1 else weight.double().T  # (out, in)
        bias = _shared_bias(program, [nodes[n] for n in uses], w.shape[0])
        if bias is None:
            full, cols, sigma = w, kept, sigma[:-1, :-1]
        else:
            full = torch.cat([w, _get(gm, bias).detach().double()[:, None]], 1)
            cols = torch.cat([kept, kept.new_tensor([w.shape[1]])])
        fitted, errors[(attr, dim)] = _refit(full, sigma, cols, damp)
        w_new = w.clone()
        w_new[:, kept] = fitted[:, : kept.numel()]
        _set(gm, attr, (w_new if dim == 1 else w_new.T).to(weight.dtype).contiguous(), _get(gm, attr))
        if bias is not None:
            _set(gm, bias, fitted[:, -1].to(_get(gm, bias).dtype).contiguous(), _get(gm, bias))
    out = {}
    for gid in keep:
        mine = [errors[(m.attr, m.dim)] for m in analysis.group(gid).members if (m.attr, m.dim) in errors]
        if mine:
            fit, plain, total = torch.stack(mine).sum(0)
            out[gid] = {"reconstructed": True, "reconstruction_error": float((fit / total).sqrt()),
                        "pruning_error": float((plain / total).sqrt())}
    return out


def _refit(full: torch.Tensor, sigma: torch.Tensor, cols: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """New columns ``cols`` of ``full`` (out x in), and ``‖Δy‖²`` re-fitted, ``‖Δy‖²`` plainly
    cut and ``‖y‖²`` under the input moments ``sigma``."""
    inner = sigma[cols][:, cols]
    lam = damp * inner.diagonal().mean()
    rhs = full @ sigma[:, cols] + lam * full[:, cols]
    fitted = torch.linalg.solve(inner + lam * torch.eye(len(cols), dtype=inner.dtype), rhs.T).T
    refit, cut = torch.zeros_like(full), torch.zeros_like(full)
    refit[:, cols], cut[:, cols] = fitted, full[:, cols]
    energy = [((d @ sigma) * d).sum() for d in (refit - full, cut - full, full)]
    return fitted, torch.stack(energy)


def _exclusive(program: Program, attr: str, names: set[str]) -> bool:
    """``attr`` is read only by the nodes ``names`` and shares its storage with no other tensor."""
    users = {u.name for n in program.graph.nodes if n.op == "get_attr" and n.target == attr for u in n.users}
    storage = _get(program.module, attr).untyped_storage().data_ptr()
    aliases = sum(t.untyped_storage().data_ptr() == storage for t in program.tensors().values())
    return users <= names and aliases <= 1


def _shared_bias(program: Program, uses: list[fx.Node], size: int) -> str | None:
    """The bias attribute (``size`` long) that every use adds with unit scale and nothing else reads."""
    targets = set()
    for node in uses:
        index = _BIAS_ARG.get(node.target)
        arg = node.args[index] if index is not None and len(node.args) > index and not node.kwargs else None
        targets.add(arg.target if isinstance(arg, fx.Node) and arg.op == "get_attr" else None)
    bias = targets.pop() if len(targets) == 1 else None
    if bias is None or _get(program.module, bias).shape != (size,):
        return None
    return bias if _exclusive(program, bias, {n.name for n in uses}) else None


# ---- rewriting ----------------------------------------------------------------------------
def apply_plan(program: Program, analysis: DependencyAnalysis, keep: dict[int, torch.Tensor]) -> None:
    """Slice every weight and rewrite every shape constant so that group ``g`` keeps ``keep[g]``."""
    gm = program.module
    graph = analysis.graph
    changed: dict[int, torch.Tensor] = {}
    for sid, coords in analysis.coords.items():
        if set(coords) & set(keep):
            kept = analysis.kept_indices(sid, keep)
            if kept.numel() < next(iter(coords.values())).numel():
                changed[sid] = kept
    sliced: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in sliced:
            continue
        sliced.add(node.target)
        tensor = _get(gm, node.target)
        if not isinstance(tensor, torch.Tensor):
            continue
        new = tensor.detach()
        for d in range(tensor.dim()):
            sid = graph.slot_space.get((f"attr:{node.target}", 0, d))
            if sid in changed:
                new = new.index_select(d, changed[sid])
        if new is not tensor.detach():
            _set(gm, node.target, new.contiguous(), tensor)
    nodes = {n.name: n for n in gm.graph.nodes}
    split_sizes: dict[str, dict[int, int]] = {}
    for sid, kept in changed.items():
        for node_name, arg_index, position in graph.spaces[sid].sites:
            node = nodes[node_name]
            if isinstance(position, tuple):  # ("split", part)
                split_sizes.setdefault(node_name, {})[position[1]] = int(kept.numel())
                continue
            args = list(node.args)
            if position is None:
                args[arg_index] = int(kept.numel())
            else:
                values = list(args[arg_index])
                values[position] = int(kept.numel())
                args[arg_index] = values
            node.args = tuple(args)
    for node_name, new_sizes in split_sizes.items():
        node = nodes[node_name]
        sizes = [int(v.shape[node.args[2] if len(node.args) > 2 else 0]) for v in node.meta["val"]]
        for part, size in new_sizes.items():
            sizes[part] = size
        dim = node.args[2] if len(node.args) > 2 else 0
        node.target = aten.split_with_sizes.default
        node.args = (node.args[0], sizes, dim)
    gm.graph.lint()
    gm.recompile()
    _propagate_shapes(gm)
    program.invalidate()


def _get(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _set(gm: fx.GraphModule, target: str, value: torch.Tensor, old: torch.Tensor) -> None:
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if name in owner._parameters:
        owner._parameters[name] = torch.nn.Parameter(value, requires_grad=old.requires_grad)
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        setattr(owner, name, value)


def _propagate_shapes(gm: fx.GraphModule) -> None:
    """Recompute every node's FakeTensor (``meta['val']``) with the new weight shapes."""
    inputs = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    fake = next((v for v in inputs if isinstance(v, torch._subclasses.FakeTensor)), None)
    if fake is None:
        return
    mode = fake.fake_mode
    allowed = mode.allow_non_fake_inputs
    mode.allow_non_fake_inputs = True
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)
    finally:
        mode.allow_non_fake_inputs = allowed

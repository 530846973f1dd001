"""Importance of each unit (head, channel) of each dependency group.

Three criteria, each a function ``(program, groups, calibration) -> {group id: scores}``
with one score per unit, higher = more important:

* ``magnitude`` (``l1`` / ``l2``): the norm of every weight slice the unit owns, summed
  over the group's members (no data needed);
* ``taylor``: first-order estimate of how much the outputs move when the unit is removed,
  ``|Σ w·∂L/∂w|`` over the unit's weights, averaged over calibration batches. With no
  labels, ``L = ⟨outputs, r⟩`` for a fresh Gaussian direction ``r`` per batch, so the
  score estimates the size of the output change in a random direction;
* ``activation``: for every matmul that reads the group's channels, the mean absolute
  input activation of a channel times the norm of the weight column that reads it (the
  channel's typical contribution to that matmul's output).

Calibration batches are ``(args, kwargs)`` pairs; callers must draw them from training
data only (the prune pass takes them from ``ctx.calibration``), never from held-out text.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import fx

from graphopt.analysis.groups import Group
from graphopt.context import Batch
from graphopt.program import Program, flatten_outputs

Scores = dict[int, torch.Tensor]
CRITERIA = ("l1", "l2", "taylor", "activation")


def importance(criterion: str, program: Program, groups: Sequence[Group], calibration: Sequence[Batch] = ()) -> Scores:
    """Scores of every unit of ``groups`` by ``criterion`` (the example inputs when no
    calibration batch is given)."""
    try:
        fn: Callable = _CRITERIA[criterion]
    except KeyError:
        raise ValueError(f"unknown importance criterion '{criterion}'; choose one of {', '.join(CRITERIA)}") from None
    return fn(program, groups, list(calibration) or [(program.args, program.kwargs)])


def _tensors(program: Program) -> dict[str, torch.Tensor]:
    return program.tensors()


def _scatter(group: Group, per_member: Callable[[torch.Tensor, int], torch.Tensor | None], tensors) -> torch.Tensor:
    """Sum per-row values of every member into the group's units."""
    scores = torch.zeros(group.size, dtype=torch.float64)
    for member in group.members:
        tensor = tensors.get(member.attr)
        if tensor is None or not tensor.is_floating_point():
            continue
        rows = per_member(tensor.detach(), member.dim)
        if rows is None:
            continue
        keep = member.units >= 0
        scores.index_add_(0, member.units[keep], rows.double()[keep])
    return scores


def _row_reduce(tensor: torch.Tensor, dim: int, fn) -> torch.Tensor:
    moved = tensor.movedim(dim, 0).reshape(tensor.shape[dim], -1)
    return fn(moved)


def magnitude(p: int):
    def score(program: Program, groups: Sequence[Group], calibration) -> Scores:
        tensors = _tensors(program)
        out = {}
        for g in groups:
            power = _scatter(g, lambda t, d: _row_reduce(t, d, lambda m: m.abs().pow(p).sum(1)), tensors)
            out[g.id] = power.pow(1.0 / p)
        return out

    return score


def taylor(program: Program, groups: Sequence[Group], calibration) -> Scores:
    tensors = _tensors(program)
    wanted = {m.attr for g in groups for m in g.members}
    params = {name: t for name, t in tensors.items() if name in wanted and t.is_floating_point()}
    flags = {name: t.requires_grad for name, t in params.items()}
    totals = {g.id: torch.zeros(g.size, dtype=torch.float64) for g in groups}
    generator = torch.Generator().manual_seed(0)
    try:
        for t in params.values():
            t.requires_grad_(True)
            t.grad = None
        for args, kwargs in calibration:
            with torch.enable_grad():
                outputs = [o for o in flatten_outputs(program.module(*args, **kwargs)) if o.is_floating_point()]
                terms = [(o * torch.randn(o.shape, generator=generator)).sum() for o in outputs]
                if not terms:
                    raise ValueError("taylor importance needs a floating-point model output to differentiate")
                loss = sum(terms[1:], terms[0])
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            products = {name: (t.detach() * g) if g is not None else None for (name, t), g in zip(params.items(), grads)}
            for g in groups:
                signed = torch.zeros(g.size, dtype=torch.float64)
                for member in g.members:
                    wg = products.get(member.attr)
                    if wg is None:
                        continue
                    rows = _row_reduce(wg, member.dim, lambda m: m.sum(1)).double()
                    keep = member.units >= 0
                    signed.index_add_(0, member.units[keep], rows[keep])
                totals[g.id] += signed.abs()
    finally:
        for name, t in params.items():
            t.requires_grad_(flags[name])
            t.grad = None
    return {gid: total / len(calibration) for gid, total in totals.items()}


def activation(program: Program, groups: Sequence[Group], calibration) -> Scores:
    readers = matmul_readers(program.module)
    means = _mean_abs_inputs(program.module, readers, calibration)
    tensors = _tensors(program)
    out = {}
    for g in groups:
        scores = torch.zeros(g.size, dtype=torch.float64)
        for member in g.members:
            for node_name, _in_dim in readers.get((member.attr, member.dim), ()):
                weight = tensors[member.attr].detach()
                col_norm = _row_reduce(weight, member.dim, lambda m: m.pow(2).sum(1).sqrt())
                rows = means[node_name] * col_norm.double()
                keep = member.units >= 0
                scores.index_add_(0, member.units[keep], rows[keep])
        out[g.id] = scores
    return out


_READ_DIM = {  # matmul-like op → (input arg, weight arg, weight dim that meets the input's channels)
    torch.ops.aten.linear.default: (0, 1, 1),
    torch.ops.aten.addmm.default: (1, 2, 0),
    torch.ops.aten.mm.default: (0, 1, 0),
    torch.ops.aten.matmul.default: (0, 1, 0),
}


def matmul_readers(gm: fx.GraphModule) -> dict[tuple[str, int], list[tuple[str, int]]]:
    """(weight attribute, dim) → [(matmul node, input channel dim)] for matmuls reading a weight."""
    readers: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for node in gm.graph.nodes:
        spec = _READ_DIM.get(node.target)
        if spec is None:
            continue
        weight = node.args[spec[1]]
        if isinstance(weight, fx.Node) and weight.op == "get_attr":
            readers.setdefault((str(weight.target), spec[2]), []).append((node.name, -1))
    return readers


def _mean_abs_inputs(gm: fx.GraphModule, readers, calibration) -> dict[str, torch.Tensor]:
    """Mean |x| per input channel of each reader matmul, on an instrumented copy of ``gm``."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(name: str, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).abs().double()
        sums[name] = sums.get(name, 0) + flat.sum(0)
        counts[name] = counts.get(name, 0) + flat.shape[0]

    _record_inputs(gm, {name for uses in readers.values() for name, _ in uses}, record, calibration)
    return {name: sums[name] / counts[name] for name in sums}


def input_moments(gm: fx.GraphModule, names: set[str], calibration) -> dict[str, tuple[torch.Tensor, int]]:
    """Per named matmul: ``Σ [x,1]ᵀ[x,1]`` over every input row (token) of every batch, in
    float64 (``(C+1) x (C+1)``, the constant last), with the number of rows."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(name: str, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).double()
        augmented = torch.cat([flat, flat.new_ones(flat.shape[0], 1)], 1)
        sums[name] = sums.get(name, 0) + augmented.T @ augmented
        counts[name] = counts.get(name, 0) + flat.shape[0]

    _record_inputs(gm, names, record, calibration)
    return {name: (sums[name], counts[name]) for name in sums}


def _record_inputs(gm: fx.GraphModule, names: set[str], record: Callable[[str, torch.Tensor], None], calibration) -> None:
    """Run an instrumented copy of ``gm`` on every batch; ``record(name, x)`` sees the input
    of each named matmul."""
    probe = copy.deepcopy(gm)
    for node in list(probe.graph.nodes):
        if node.name in names:
            x = node.args[_READ_DIM[node.target][0]]
            with probe.graph.inserting_before(node):
                probe.graph.call_function(record, (node.name, x))
    probe.recompile()
    with torch.no_grad():
        for args, kwargs in calibration:
            probe(*args, **kwargs)


_CRITERIA: dict[str, Callable] = {"l1": magnitude(1), "l2": magnitude(2), "taylor": taylor, "activation": activation}

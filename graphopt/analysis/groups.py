"""Dependency groups: the free channel spaces a pruner may cut, with every tensor they reach.

A :class:`Group` is one free space of :mod:`graphopt.analysis.channels` that reaches at
least one weight. Its *units* are the indices of that space: one attention head, one FFN
channel, one hidden channel. Each :class:`Member` is one dimension of one weight with, for
every row, the unit of this group it belongs to (``-1``: rows the group does not touch,
e.g. the k rows of a fused qkv weight when the group is the q heads of a GQA model).

Kinds are read off the graph, not off module names:

* ``heads``: the head axis of ``scaled_dot_product_attention`` (for grouped-query
  attention: the query heads within each kv group, the axis ``repeat_kv`` expands);
* ``kv_heads``: the outer factor of a head axis made by ``repeat_kv`` (a kv head with the
  query heads that share it);
* ``hidden``: a space that is layer-normed, reduced over (RMSNorm) or an embedding's width;
* ``head_dim``: the per-head feature axis (reported, never cut: rotary embeddings and the
  attention scale depend on it);
* ``ffn``: any other space a matmul reads or writes (MLP intermediate channels);
* ``other``: the rest (vocabulary rows, position tables): never cut.

In a decoder program (``program.meta["decoder"]``) the kv-head axis of every
``past_key_values.N`` input and ``present.N`` output is the cache's
(:class:`graphopt.analysis.channels.Interface`): its groups are marked ``cache`` and, like
the hidden width at an output, cut only when the caller allows the interface to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch
from torch import fx

from graphopt.analysis.channels import ChannelGraph, Interface, Space, build_channel_graph
from graphopt.decoder import decoder_spec, is_decoder_spec, python_past_names
from graphopt.program import Program

KINDS = ("heads", "kv_heads", "ffn", "hidden", "head_dim", "other")


@dataclass(frozen=True)
class Member:
    """One dimension of one weight, and the unit of the group each of its rows belongs to."""

    attr: str
    dim: int
    units: torch.Tensor  # LongTensor, one entry per row of ``dim``; -1 = not in this group


@dataclass
class Group:
    id: int  # the free space's id
    kind: str
    size: int  # number of units
    module_path: str
    members: list[Member]
    touches_output: bool = False
    cache: bool = False  # a decoder's KV cache axis: cutting it changes the past/present shapes
    blocked: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.blocked and self.kind not in ("head_dim", "other") and self.size > 1

    def describe(self) -> str:
        return f"{self.kind}[{self.size}] at '{self.module_path}' ({len(self.members)} tensor dims)"


@dataclass
class DependencyAnalysis:
    graph: ChannelGraph
    groups: list[Group]
    coords: dict[int, dict[int, torch.Tensor]]  # space id → {free space id: unit of each index}
    unhandled: list[dict]  # spaces with weights that cannot be pruned, and why

    def group(self, gid: int) -> Group:
        return next(g for g in self.groups if g.id == gid)

    def prunable(self, kind: str | None = None, *, allow_output_change: bool = False) -> list[Group]:
        """Groups that may be cut; of those reaching a graph output, only the hidden width
        and only when ``allow_output_change`` (a pooler's width is not worth an interface);
        of a decoder's cache axes, only when ``allow_output_change`` too."""
        return [
            g for g in self.groups
            if g.prunable and (kind is None or g.kind == kind)
            and (not g.touches_output or (allow_output_change and g.kind == "hidden"))
            and (not g.cache or allow_output_change)
        ]

    def kept_indices(self, space_id: int, keep: dict[int, torch.Tensor]) -> torch.Tensor:
        """Indices of ``space_id`` that survive when each free space ``f`` keeps ``keep[f]``."""
        coords = self.coords[space_id]
        size = next(iter(coords.values())).numel()
        mask = torch.ones(size, dtype=torch.bool)
        for free, units in coords.items():
            if free in keep:
                mask &= (units < 0) | torch.isin(units, keep[free])
        return mask.nonzero().flatten()


def dependency_groups(program: Program) -> DependencyAnalysis:
    """The program's dependency groups, cached on it until a pass modifies it."""
    return program.analysis("prune.dependency_groups", lambda p: analyse(p.module, cache_interface(p)))


def cache_interface(program: Program) -> Interface:
    """A decoder's cache axes that follow the weights: dim 1 (kv heads) of every past input
    and present output; nothing for other programs."""
    if not is_decoder_spec(program):
        return Interface()
    layers = decoder_spec(program).layers
    return Interface(inputs=dict.fromkeys(python_past_names(layers), (1,)),
                     outputs=dict.fromkeys(range(1, 1 + 2 * layers), (1,)))  # output 0 is the logits


def analyse(gm: fx.GraphModule, interface: Interface | None = None) -> DependencyAnalysis:
    graph = build_channel_graph(gm, interface)
    coords: dict[int, dict[int, torch.Tensor]] = {}
    for space in graph.spaces.values():
        if space.params or space.sites:
            _coords(graph, space.id, coords, ())
    parents = graph.parents()
    paths = _module_paths(gm)
    members: dict[int, list[Member]] = {}
    for space in graph.spaces.values():
        if not space.params or space.id not in coords:
            continue
        for free, units in coords[space.id].items():
            for attr, dim in space.params:
                members.setdefault(free, []).append(Member(attr, dim, units))
    groups = []
    for free, group_members in sorted(members.items()):
        space = graph.spaces[free]
        if space.static_size is None:
            continue
        group_members = _dedupe(group_members)
        groups.append(
            Group(
                id=free,
                kind=_kind(graph, space, parents),
                size=space.static_size,
                module_path=_common_path([paths.get(m.attr, "") for m in group_members]),
                members=group_members,
                touches_output=space.output,
                cache="cache" in space.flags,
                blocked=list(dict.fromkeys(space.blocked)),
            )
        )
    unhandled = [
        {"space": g.id, "kind": g.kind, "size": g.size, "module_path": g.module_path, "reason": g.blocked[0]}
        for g in groups
        if g.blocked and g.size > 1 and g.kind != "head_dim"
    ]
    return DependencyAnalysis(graph, groups, coords, unhandled)


def _coords(graph: ChannelGraph, sid: int, memo: dict, stack: tuple) -> dict[int, torch.Tensor] | None:
    if sid in memo:
        return memo[sid]
    space = graph.spaces[sid]
    size = space.static_size
    if size is None or sid in stack:
        return None
    if space.relation is None:
        memo[sid] = {sid: torch.arange(size)}
        return memo[sid]
    kind, parts = space.relation
    found = [_coords(graph, p, memo, (*stack, sid)) for p in parts]
    part_coords = [c for c in found if c is not None]
    if len(part_coords) != len(found):
        return None
    # A part with coordinates has a static size: _coords returns None for one without.
    sizes = [cast(int, graph.spaces[p].static_size) for p in parts]
    result: dict[int, torch.Tensor] = {}
    index = torch.arange(size)
    if kind == "product":
        if _prod(sizes) != size:
            return None
        stride = size
        for part, n in zip(part_coords, sizes):
            stride //= n
            position = (index // stride) % n
            for free, units in part.items():
                result[free] = units[position]
    else:
        if sum(sizes) != size:
            return None
        offset = 0
        for part, n in zip(part_coords, sizes):
            for free, units in part.items():
                column = result.setdefault(free, torch.full((size,), -1, dtype=torch.long))
                column[offset : offset + n] = units
            offset += n
    memo[sid] = result
    return result


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _kind(graph: ChannelGraph, space: Space, parents: dict[int, list[int]]) -> str:
    if "head_dim" in space.flags:
        return "head_dim"
    if "heads" in space.flags:
        return "heads"
    for parent in parents.get(space.id, []):
        whole = graph.spaces[parent]
        if "heads" in whole.flags and whole.relation is not None and whole.relation[0] == "product":
            return "heads" if "expanded" in space.flags else "kv_heads"
    if space.flags & {"norm", "reduced", "embedding"}:
        return "hidden"
    if space.flags & {"linear_in", "linear_out"}:
        return "ffn"
    return "other"


def _dedupe(members: list[Member]) -> list[Member]:
    seen, out = set(), []
    for m in members:
        if (m.attr, m.dim) not in seen:
            seen.add((m.attr, m.dim))
            out.append(m)
    return out


def _module_paths(gm: fx.GraphModule) -> dict[str, str]:
    return {n.target: n.meta.get("graphopt_module_path", n.target.rpartition(".")[0]) for n in gm.graph.nodes if n.op == "get_attr"}


def _common_path(paths: list[str]) -> str:
    split = [p.split(".") for p in paths if p]
    if not split:
        return ""
    common = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)

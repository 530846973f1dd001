"""Channel coupling in a captured ATen graph: which tensor dimensions must shrink together.

Every dimension of every tensor in the graph (activations and ``get_attr`` weights) is a
*slot*. Op rules join slots that index the same channels into one *space* (union-find):
``linear`` joins its input's last dim with the weight's columns and its output's last dim
with the weight's rows and the bias; elementwise ops join broadcast-aligned dims; ``sdpa``
joins the head axes of q and the output, and the head dims of q and k; and so on.

Two relations connect spaces of different sizes:

* **product**: a reshape that splits a dim of size ``H*D`` into ``(H, D)`` (or merges them)
  says the big space is ``H ⊗ D`` in row-major order; that is how attention heads reach
  the q/k/v rows and the o-projection columns;
* **concat**: ``split`` / ``cat`` along a dim says the space is its parts one after the
  other (GPT-2's fused q/k/v projection).

A space that is the result of a relation is *derived*; the others are *free*. Free spaces
are what a pruner chooses indices in; derived spaces follow. A space is *blocked* (with a
reason) when an op touches it that no rule understands, when it is sliced or indexed, or
when it is a graph input; blocking a derived space blocks its parts too. Graph outputs are
flagged separately: a model's interface only changes when the caller allows it. The
exception is an :class:`Interface` dim, one that a runtime sizes from the weights (a
decoder's KV cache heads, ``past_key_values.N`` in and ``present.N`` out): it is flagged
``cache`` instead, and the caller decides whether it may change.

Nothing here knows about architectures: the rules are per ATen op.

The op rules live in :mod:`graphopt.analysis.channel_shape_rules` (views, permutes,
slices, concatenation) and :mod:`graphopt.analysis.channel_op_rules` (elementwise ops,
matmuls, norms, attention), over the union-find of
:mod:`graphopt.analysis.channel_context`; this module builds the graph and turns the
joined slots into spaces.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import sympy
import torch
from torch import fx
from torch.utils import _pytree as pytree

# The rule modules register their rules on import.
from graphopt.analysis import channel_op_rules, channel_shape_rules  # noqa: F401
from graphopt.analysis.channel_context import (
    ChannelBuilder,
    RuleContext,
    Slot,
    apply_rule,
    is_tensor,
    slot_key,
)
from graphopt.surgery import get_tensor, has_tensor


@dataclass
class Space:
    """A set of coupled slots (one channel index space) and what the graph says about it."""

    id: int
    size: sympy.Expr
    slots: list[Slot] = field(default_factory=list)
    params: list[tuple[str, int]] = field(default_factory=list)  # (attribute, dim)
    flags: set[str] = field(default_factory=set)
    blocked: list[str] = field(default_factory=list)
    output: bool = False
    relation: tuple[str, list[int]] | None = None  # ("product" | "concat", part space ids)
    sites: list[tuple[str, int, object]] = field(default_factory=list)  # (node, arg index, position)

    @property
    def static_size(self) -> int | None:
        return int(self.size) if self.size.is_Integer else None


@dataclass(frozen=True)
class Interface:
    """Dims of graph inputs (by placeholder name) and outputs (by position) that follow the
    weights instead of the caller: cutting them changes what the runtime allocates."""

    inputs: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    outputs: Mapping[int, tuple[int, ...]] = field(default_factory=dict)


@dataclass
class ChannelGraph:
    spaces: dict[int, Space]
    slot_space: dict[Slot, int]

    def space_of(self, slot: Slot) -> Space:
        return self.spaces[self.slot_space[slot]]

    def free_spaces(self) -> list[Space]:
        return [s for s in self.spaces.values() if s.relation is None]

    def parents(self) -> dict[int, list[int]]:
        """space id → ids of the derived spaces it is a part of."""
        up: dict[int, list[int]] = {}
        for space in self.spaces.values():
            if space.relation:
                for part in space.relation[1]:
                    up.setdefault(part, []).append(space.id)
        return up


# ---- building ---------------------------------------------------------------------------
def build_channel_graph(gm: fx.GraphModule, interface: Interface | None = None) -> ChannelGraph:
    """Run the op rules over ``gm`` and return its channel spaces."""
    interface = interface or Interface()
    b = ChannelBuilder(gm)
    _register_slots(b, gm)
    ctx = RuleContext(b)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            for d, slot in enumerate(ctx.slots(node)):
                if d in interface.inputs.get(node.name, ()):
                    b.flag(slot, "cache")
                else:
                    b.block(slot, "a graph input's dimension")
        elif node.op == "output":
            for position, leaf in enumerate(pytree.tree_leaves(node.args)):
                for d, slot in enumerate(ctx.slots(leaf) if is_tensor(leaf) else []):
                    if d in interface.outputs.get(position, ()):
                        b.flag(slot, "cache")
                    else:
                        b.outputs.add(slot)
        elif node.op == "call_function":
            apply_rule(ctx, node)
        elif node.op == "call_module" and node.target != "_guards_fn":
            ctx.block_all(node, f"submodule call '{node.target}'")
    return _finish(b)


def _register_slots(b: ChannelBuilder, gm: fx.GraphModule) -> None:
    """One slot per dim of every node's value and of every weight a ``get_attr`` reads."""
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op == "get_attr":
            tensor = get_tensor(gm, node.target) if has_tensor(gm, node.target) else None
            if isinstance(tensor, torch.Tensor):
                b.register(slot_key(node), 0, tensor)
                for d in range(tensor.dim()):
                    b.params[(slot_key(node), 0, d)] = (node.target, d)
        elif isinstance(val, (list, tuple)):
            for i, v in enumerate(val):
                b.register(node.name, i, v)
        else:
            b.register(node.name, 0, val)


# ---- finishing --------------------------------------------------------------------------
def _unify_relations(b: ChannelBuilder) -> None:
    """``W = A ⊗ B`` and ``W = C ⊗ D`` with |A| = |C| and |B| = |D| mean A ≡ C and B ≡ D
    (k and v both repeated into the same head axis; q/k/v split from one fused weight)."""
    changed = True
    while changed:
        changed = False
        seen: dict[Slot, tuple[str, list[Slot]]] = {}
        for kind, whole, parts in b.relations:
            root = b.find(whole)
            parts = [p for p in parts if kind != "product" or b.size[p] != 1]
            if root not in seen:
                seen[root] = (kind, parts)
                continue
            other_kind, other = seen[root]
            if other_kind == kind and [b.size[p] for p in other] == [b.size[p] for p in parts]:
                for x, y in zip(other, parts):
                    if b.find(x) != b.find(y):
                        b.union(x, y)
                        changed = True


def _finish(b: ChannelBuilder) -> ChannelGraph:
    _unify_relations(b)
    roots: dict[Slot, int] = {}
    spaces: dict[int, Space] = {}
    slot_space: dict[Slot, int] = {}
    for slot in b.parent:
        root = b.find(slot)
        if root not in roots:
            roots[root] = len(roots)
            spaces[roots[root]] = Space(roots[root], b.size[root])
        space = spaces[roots[root]]
        slot_space[slot] = space.id
        space.slots.append(slot)
        if b.size[slot] != space.size:
            space.blocked.append(f"slots of sizes {space.size} and {b.size[slot]} were joined")
        if slot in b.params:
            space.params.append(b.params[slot])
        space.flags |= b.flags.get(slot, set())
        space.blocked += b.blocks.get(slot, [])
        space.output |= slot in b.outputs
    for slot, site in b.sites:
        spaces[slot_space[slot]].sites.append(site)
    for kind, whole, parts in b.relations:
        space = spaces[slot_space[whole]]
        part_ids = [slot_space[p] for p in parts]
        if kind == "product":
            # Size-1 parts carry nothing; dims split off a space of itself are not new.
            part_ids = [p for p in part_ids if spaces[p].size != 1]
        if space.relation is None:
            space.relation = (kind, part_ids)
        elif space.relation != (kind, part_ids):
            space.blocked.append(f"it is both {space.relation[0]} of {space.relation[1]} and {kind} of {part_ids}")
    _block_cycles(spaces)
    _propagate_down(spaces)
    return ChannelGraph(spaces, slot_space)


def _block_cycles(spaces: dict[int, Space]) -> None:
    state: dict[int, int] = {}

    def visit(sid: int) -> bool:
        if state.get(sid) == 1:
            return True
        if state.get(sid) == 2:
            return False
        state[sid] = 1
        rel = spaces[sid].relation
        cyclic = any(visit(p) for p in rel[1]) if rel else False
        state[sid] = 2
        if cyclic:
            spaces[sid].blocked.append("it is derived from itself")
        return cyclic

    for sid in list(spaces):
        visit(sid)


def _propagate_down(spaces: dict[int, Space]) -> None:
    """A part of a blocked (or output) space cannot change either."""
    changed = True
    while changed:
        changed = False
        for space in spaces.values():
            if space.relation is None:
                continue
            for pid in space.relation[1]:
                part = spaces[pid]
                if space.blocked and not part.blocked:
                    part.blocked.append(f"it is part of space {space.id}, which is blocked: {space.blocked[0]}")
                    changed = True
                if space.output and not part.output:
                    part.output = True
                    changed = True

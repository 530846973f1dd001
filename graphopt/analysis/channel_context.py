"""What the channel op rules work with: slots, union-find over them, and the rule registry.

A *slot* is one dimension of one tensor of the graph, ``(node name or "attr:<target>",
output index, dim)``. :class:`ChannelBuilder` joins slots that index the same channels
(union-find), records blocks, flags, relations between spaces and the shape constants
that encode a space's size; :class:`RuleContext` is the view of it an op rule gets, with
the two joins most rules are made of (:meth:`RuleContext.broadcast` and
:meth:`RuleContext.reshape`). Rules register per ATen overload packet with :func:`rule`
(:mod:`graphopt.analysis.channel_shape_rules`, :mod:`graphopt.analysis.channel_op_rules`);
:func:`apply_rule` dispatches a node to its rule, or blocks every dim it touches.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import sympy
import torch
from torch import fx
from torch.utils import _pytree as pytree

from graphopt.surgery import arg_int, describe_node

Slot = tuple[str, int, int]  # (node name or "attr:<target>", output index, dim)


class ChannelBuilder:
    """Union-find over slots, and everything the rules record about them."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.parent: dict[Slot, Slot] = {}
        self.size: dict[Slot, sympy.Expr] = {}
        self.flags: dict[Slot, set[str]] = {}
        self.blocks: dict[Slot, list[str]] = {}
        self.relations: list[tuple[str, Slot, list[Slot]]] = []
        self.sites: list[tuple[Slot, tuple[str, int, object]]] = []
        self.outputs: set[Slot] = set()
        self.params: dict[Slot, tuple[str, int]] = {}

    def find(self, slot: Slot) -> Slot:
        root = slot
        while self.parent.setdefault(root, root) != root:
            root = self.parent[root]
        while self.parent[slot] != root:
            self.parent[slot], slot = root, self.parent[slot]
        return root

    def union(self, a: Slot | None, b: Slot | None) -> None:
        if a is None or b is None:
            return
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def block(self, slot: Slot | None, reason: str) -> None:
        if slot is not None:
            self.find(slot)
            self.blocks.setdefault(slot, []).append(reason)

    def flag(self, slot: Slot | None, name: str) -> None:
        if slot is not None:
            self.find(slot)
            self.flags.setdefault(slot, set()).add(name)

    def register(self, key: str, index: int, value) -> None:
        if isinstance(value, torch.Tensor):
            for d, s in enumerate(value.shape):
                slot = (key, index, d)
                self.size[slot] = size_expr(s)
                self.find(slot)


def size_expr(size) -> sympy.Expr:
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    return sympy.Integer(int(size))


def slot_key(node: fx.Node) -> str:
    return f"attr:{node.target}" if node.op == "get_attr" else node.name


def value_of(node) -> object:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def is_tensor(node) -> bool:
    return isinstance(value_of(node), torch.Tensor)


class RuleContext:
    """What op rules see: slots of a node's dims and the union-find operations."""

    def __init__(self, builder: ChannelBuilder):
        self.b = builder

    def slot(self, node, dim: int, index: int = 0) -> Slot | None:
        if not isinstance(node, fx.Node):
            return None
        val = value_of(node)
        if isinstance(val, (list, tuple)):
            val = val[index]
        if not isinstance(val, torch.Tensor) or not -val.dim() <= dim < val.dim():
            return None
        return (slot_key(node), index, dim % val.dim())

    def slots(self, node, index: int = 0) -> list[Slot]:
        # Every dim below the rank has a slot: the filter only drops what cannot occur.
        return [s for d in range(self.rank(node, index)) if (s := self.slot(node, d, index)) is not None]

    def known_slot(self, node, dim: int, index: int = 0) -> Slot:
        """:meth:`slot` where the rule knows ``node`` has that dim (a relation's member)."""
        slot = self.slot(node, dim, index)
        if slot is None:
            shown = describe_node(node) if isinstance(node, fx.Node) else repr(node)
            raise ValueError(f"{shown} has no tensor dim {dim} (output {index}) for a channel relation")
        return slot

    def rank(self, node, index: int = 0) -> int:
        val = value_of(node)
        if isinstance(val, (list, tuple)):
            val = val[index]
        return val.dim() if isinstance(val, torch.Tensor) else 0

    def size(self, slot: Slot | None) -> sympy.Expr | None:
        return None if slot is None else self.b.size[slot]

    def block_all(self, node: fx.Node, reason: str) -> None:
        for arg in (node, *pytree.tree_leaves((node.args, node.kwargs))):
            if isinstance(arg, fx.Node):
                val = value_of(arg)
                for i in range(len(val) if isinstance(val, (list, tuple)) else 1):
                    for slot in self.slots(arg, i):
                        self.b.block(slot, reason)

    def broadcast(self, out: fx.Node, inputs) -> None:
        """Join broadcast-aligned dims of equal size (right-aligned, as numpy does)."""
        r = self.rank(out)
        for x in inputs:
            if not is_tensor(x) or x is out:
                continue
            k = self.rank(x)
            for i in range(k):
                a, o = self.slot(x, i), self.slot(out, r - k + i)
                if o is None:
                    continue
                if self.size(a) == self.size(o):
                    self.b.union(a, o)
                elif self.size(a) != 1:
                    self.b.block(a, f"'{out.name}' broadcasts it to another size")
                    self.b.block(o, f"'{out.name}' broadcasts it from another size")

    def reshape(self, out: fx.Node, src: fx.Node, out_index: int = 0) -> None:
        """Match the dims of ``src`` and ``out`` block by block (size-1 dims skipped)."""
        ins = [(s, self.size(s)) for s in self.slots(src) if self.size(s) != 1]
        outs = [(s, self.size(s)) for s in self.slots(out, out_index) if self.size(s) != 1]
        i = j = 0
        while i < len(ins) and j < len(outs):
            found = _smallest_equal_block(ins[i:], outs[j:])
            if found is None:
                break
            a, c = found
            left, right = [s for s, _ in ins[i : i + a]], [s for s, _ in outs[j : j + c]]
            if a == 1 and c == 1:
                self.b.union(left[0], right[0])
            elif a == 1:
                self.b.relations.append(("product", left[0], right))
            elif c == 1:
                self.b.relations.append(("product", right[0], left))
            else:
                for s in left + right:
                    self.b.block(s, f"'{out.name}' regroups {a} dims into {c}")
            i, j = i + a, j + c
        for s, _ in ins[i:] + outs[j:]:
            self.b.block(s, f"'{out.name}' reshapes in a way the analysis cannot follow")

    def site(self, slot: Slot | None, node: fx.Node, arg_index: int, position: object) -> None:
        """An integer in ``node.args[arg_index]`` (at ``position`` in a list) that equals the size of ``slot``."""
        if slot is not None:
            self.b.find(slot)
            self.b.sites.append((slot, (node.name, arg_index, position)))


def _smallest_equal_block(ins, outs) -> tuple[int, int] | None:
    for total in range(2, len(ins) + len(outs) + 1):
        for a in range(1, total):
            c = total - a
            if a <= len(ins) and c <= len(outs) and sympy.Mul(*[s for _, s in ins[:a]]) == sympy.Mul(*[s for _, s in outs[:c]]):
                return a, c
    return None


# ---- the rule registry ---------------------------------------------------------------------
Rule = Callable[[RuleContext, fx.Node], None]
RULES: dict[object, Rule] = {}


def rule(*packets):
    """Register the decorated function as the channel rule of ATen overload ``packets``."""

    def register(fn: Rule) -> Rule:
        for packet in packets:
            RULES[packet] = fn
        return fn

    return register


def apply_rule(ctx: RuleContext, node: fx.Node) -> None:
    """Run ``node``'s rule; a node with no rule blocks every dim it reads or writes."""
    target = node.target
    if target is operator.getitem:
        source, _ = node.args
        if isinstance(value_of(source), (list, tuple)) and is_tensor(node):
            index = arg_int(node, 1)
            for d, slot in enumerate(ctx.slots(node)):
                ctx.b.union(slot, ctx.slot(source, d, index))
        return
    packet = getattr(target, "overloadpacket", target)
    fn = RULES.get(packet)
    if fn is None:
        ctx.block_all(node, f"'{node.name}' ({getattr(packet, '__name__', packet)}) has no channel rule")
        return
    fn(ctx, node)

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
flagged separately: a model's interface only changes when the caller allows it.

Nothing here knows about architectures: the rules are per ATen op.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

aten = torch.ops.aten

Slot = tuple[str, int, int]  # (node name or "attr:<target>", output index, dim)


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
class _Builder:
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

    # union-find over slots
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
                self.size[slot] = _expr(s)
                self.find(slot)


def _expr(size) -> sympy.Expr:
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    return sympy.Integer(int(size))


def _key(node: fx.Node) -> str:
    return f"attr:{node.target}" if node.op == "get_attr" else node.name


def _val(node) -> object:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _is_tensor(node) -> bool:
    return isinstance(_val(node), torch.Tensor)


def build_channel_graph(gm: fx.GraphModule) -> ChannelGraph:
    """Run the op rules over ``gm`` and return its channel spaces."""
    b = _Builder(gm)
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op == "get_attr":
            tensor = _attr(gm, node.target)
            if isinstance(tensor, torch.Tensor):
                b.register(_key(node), 0, tensor)
                for d in range(tensor.dim()):
                    b.params[(_key(node), 0, d)] = (node.target, d)
        elif isinstance(val, (list, tuple)):
            for i, v in enumerate(val):
                b.register(node.name, i, v)
        else:
            b.register(node.name, 0, val)
    ctx = _Context(b)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            for slot in ctx.slots(node):
                b.block(slot, "a graph input's dimension")
        elif node.op == "output":
            for leaf in pytree.tree_leaves(node.args):
                if _is_tensor(leaf):
                    b.outputs.update(ctx.slots(leaf))
        elif node.op == "call_function":
            _apply_rule(ctx, node)
        elif node.op == "call_module":
            if node.target != "_guards_fn":
                ctx.block_all(node, f"submodule call '{node.target}'")
    return _finish(b)


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


class _Context:
    """What op rules see: slots of a node's dims and the union-find operations."""

    def __init__(self, builder: _Builder):
        self.b = builder

    def slot(self, node, dim: int, index: int = 0) -> Slot | None:
        if not isinstance(node, fx.Node):
            return None
        val = _val(node)
        if isinstance(val, (list, tuple)):
            val = val[index]
        if not isinstance(val, torch.Tensor) or not -val.dim() <= dim < val.dim():
            return None
        return (_key(node), index, dim % val.dim())

    def slots(self, node, index: int = 0) -> list[Slot]:
        return [self.slot(node, d, index) for d in range(self.rank(node, index))]

    def rank(self, node, index: int = 0) -> int:
        val = _val(node)
        if isinstance(val, (list, tuple)):
            val = val[index]
        return val.dim() if isinstance(val, torch.Tensor) else 0

    def size(self, slot: Slot | None) -> sympy.Expr | None:
        return None if slot is None else self.b.size[slot]

    def block_all(self, node: fx.Node, reason: str) -> None:
        for arg in (node, *pytree.tree_leaves((node.args, node.kwargs))):
            if isinstance(arg, fx.Node):
                val = _val(arg)
                for i in range(len(val) if isinstance(val, (list, tuple)) else 1):
                    for slot in self.slots(arg, i):
                        self.b.block(slot, reason)

    def broadcast(self, out: fx.Node, inputs) -> None:
        """Join broadcast-aligned dims of equal size (right-aligned, as numpy does)."""
        r = self.rank(out)
        for x in inputs:
            if not _is_tensor(x) or x is out:
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
            if a <= len(ins) and c <= len(outs):
                if sympy.Mul(*[s for _, s in ins[:a]]) == sympy.Mul(*[s for _, s in outs[:c]]):
                    return a, c
    return None


# ---- op rules ---------------------------------------------------------------------------
Rule = Callable[[_Context, fx.Node], None]
_RULES: dict[object, Rule] = {}


def _rule(*packets):
    def register(fn: Rule) -> Rule:
        for packet in packets:
            _RULES[packet] = fn
        return fn

    return register


def _apply_rule(ctx: _Context, node: fx.Node) -> None:
    target = node.target
    if target is operator.getitem:
        source, index = node.args
        if isinstance(_val(source), (list, tuple)) and _is_tensor(node):
            for d, slot in enumerate(ctx.slots(node)):
                ctx.b.union(slot, ctx.slot(source, d, index))
        return
    packet = getattr(target, "overloadpacket", target)
    rule = _RULES.get(packet)
    if rule is None:
        ctx.block_all(node, f"'{node.name}' ({getattr(packet, '__name__', packet)}) has no channel rule")
        return
    rule(ctx, node)


_ELEMENTWISE = (
    aten.add, aten.sub, aten.mul, aten.div, aten.pow, aten.where, aten.masked_fill, aten.maximum, aten.minimum,
    aten.eq, aten.ne, aten.ge, aten.gt, aten.le, aten.lt, aten.__and__, aten.__or__, aten.logical_and,
    aten.logical_or, aten.logical_not, aten.bitwise_not, aten.clamp, aten.neg, aten.exp, aten.log, aten.tanh,
    aten.sigmoid, aten.gelu, aten.relu, aten.silu, aten.erf, aten.rsqrt, aten.sqrt, aten.abs, aten.sin, aten.cos,
    aten.reciprocal, aten.to, aten._to_copy, aten.clone, aten.contiguous, aten.alias, aten.detach, aten.type_as,
    aten.dropout, aten.lift_fresh_copy, aten.rsub, aten.square, aten.hardtanh, aten.leaky_relu, aten.floor_divide,
    aten.remainder,
)


@_rule(*_ELEMENTWISE)
def _elementwise(ctx: _Context, node: fx.Node) -> None:
    ctx.broadcast(node, pytree.tree_leaves((node.args, node.kwargs)))


@_rule(aten.view, aten.reshape, aten._unsafe_view)
def _view(ctx: _Context, node: fx.Node) -> None:
    ctx.reshape(node, node.args[0])
    for position, value in enumerate(node.args[1]):
        if isinstance(value, int) and value != -1:
            ctx.site(ctx.slot(node, position), node, 1, position)


@_rule(aten.unsqueeze, aten.squeeze, aten.flatten)
def _regroup(ctx: _Context, node: fx.Node) -> None:
    ctx.reshape(node, node.args[0])


@_rule(aten.unflatten)
def _unflatten(ctx: _Context, node: fx.Node) -> None:
    ctx.reshape(node, node.args[0])
    dim = node.args[1] % ctx.rank(node.args[0])
    for position, value in enumerate(node.args[2]):
        if isinstance(value, int) and value != -1:
            ctx.site(ctx.slot(node, dim + position), node, 2, position)


@_rule(aten.transpose, aten.permute, aten.t)
def _permute(ctx: _Context, node: fx.Node) -> None:
    src, r = node.args[0], ctx.rank(node)
    if node.target is aten.t.default:
        order = [1, 0] if r == 2 else list(range(r))
    elif node.target is aten.permute.default:
        order = [d % r for d in node.args[1]]
    else:
        order = list(range(r))
        a, c = node.args[1] % r, node.args[2] % r
        order[a], order[c] = order[c], order[a]
    for d, source_dim in enumerate(order):
        ctx.b.union(ctx.slot(node, d), ctx.slot(src, source_dim))


@_rule(aten.expand)
def _expand(ctx: _Context, node: fx.Node) -> None:
    src, r = node.args[0], ctx.rank(node)
    k = ctx.rank(src)
    for d in range(r):
        o = ctx.slot(node, d)
        a = ctx.slot(src, d - (r - k)) if d >= r - k else None
        if a is not None and ctx.size(a) == ctx.size(o):
            ctx.b.union(a, o)
        else:
            ctx.b.flag(o, "expanded")
        value = node.args[1][d]
        if isinstance(value, int) and value != -1:
            ctx.site(o, node, 1, d)


@_rule(aten.slice)
def _slice(ctx: _Context, node: fx.Node) -> None:
    src = node.args[0]
    dim = (node.args[1] if len(node.args) > 1 else 0) % ctx.rank(src)
    start = node.args[2] if len(node.args) > 2 else 0
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    whole = ctx.size(ctx.slot(src, dim))
    full = start in (0, None) and step == 1 and (end is None or (isinstance(end, int) and (end >= 2**62 or (whole.is_Integer and end >= int(whole)))))
    for d in range(ctx.rank(node)):
        if d == dim and not full:
            ctx.b.block(ctx.slot(src, d), f"'{node.name}' slices it")
            ctx.b.block(ctx.slot(node, d), f"'{node.name}' is a slice of it")
        else:
            ctx.b.union(ctx.slot(node, d), ctx.slot(src, d))


@_rule(aten.select)
def _select(ctx: _Context, node: fx.Node) -> None:
    src = node.args[0]
    dim = node.args[1] % ctx.rank(src)
    ctx.b.block(ctx.slot(src, dim), f"'{node.name}' selects one index of it")
    kept = [d for d in range(ctx.rank(src)) if d != dim]
    for d, source_dim in enumerate(kept):
        ctx.b.union(ctx.slot(node, d), ctx.slot(src, source_dim))


@_rule(aten.cat)
def _cat(ctx: _Context, node: fx.Node) -> None:
    tensors = [t for t in node.args[0] if _is_tensor(t)]
    r = ctx.rank(node)
    dim = (node.args[1] if len(node.args) > 1 else 0) % r
    for t in tensors:
        if ctx.rank(t) != r:
            ctx.block_all(node, f"'{node.name}' concatenates tensors of different rank")
            return
        for d in range(r):
            if d != dim:
                ctx.b.union(ctx.slot(node, d), ctx.slot(t, d))
    ctx.b.relations.append(("concat", ctx.slot(node, dim), [ctx.slot(t, dim) for t in tensors]))


@_rule(aten.split, aten.split_with_sizes)
def _split(ctx: _Context, node: fx.Node) -> None:
    src = node.args[0]
    r = ctx.rank(src)
    dim = (node.args[2] if len(node.args) > 2 else 0) % r
    parts = range(len(_val(node)))
    for i in parts:
        for d in range(r):
            if d != dim:
                ctx.b.union(ctx.slot(node, d, i), ctx.slot(src, d))
    ctx.b.relations.append(("concat", ctx.slot(src, dim), [ctx.slot(node, dim, i) for i in parts]))
    for i in parts:  # the sizes argument is rewritten from the parts' new sizes
        ctx.site(ctx.slot(node, dim, i), node, 1, ("split", i))


_REDUCTIONS = (aten.sum, aten.mean, aten.amax, aten.amin, aten.var, aten.std, aten.any, aten.all)


@_rule(*_REDUCTIONS)
def _reduce(ctx: _Context, node: fx.Node) -> None:
    src = node.args[0]
    r = ctx.rank(src)
    dims = node.args[1] if len(node.args) > 1 and node.args[1] is not None else node.kwargs.get("dim")
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        dims = list(range(r))
    dims = {d % r for d in ([dims] if isinstance(dims, int) else dims)}
    keep = ctx.rank(node) == r
    out_dim = 0
    for d in range(r):
        if d in dims:
            ctx.b.flag(ctx.slot(src, d), "reduced")
            out_dim += keep
            continue
        ctx.b.union(ctx.slot(node, out_dim), ctx.slot(src, d))
        out_dim += 1


@_rule(aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax, aten._safe_softmax)
def _softmax(ctx: _Context, node: fx.Node) -> None:
    src = node.args[0]
    ctx.broadcast(node, [src])
    ctx.b.block(ctx.slot(src, node.args[1]), f"'{node.name}' normalises over it (softmax)")


@_rule(aten.layer_norm, aten.rms_norm)
def _norm(ctx: _Context, node: fx.Node) -> None:
    x, shape = node.args[0], node.args[1]
    weight = node.args[2] if len(node.args) > 2 else None
    bias = node.args[3] if node.target is aten.layer_norm.default and len(node.args) > 3 else None
    ctx.broadcast(node, [x])
    r, k = ctx.rank(node), len(shape)
    for i in range(k):
        out = ctx.slot(node, r - k + i)
        ctx.b.flag(out, "norm")
        ctx.site(out, node, 1, i)
        for param in (weight, bias):
            if isinstance(param, fx.Node):
                ctx.b.union(out, ctx.slot(param, i))


@_rule(aten.embedding)
def _embedding(ctx: _Context, node: fx.Node) -> None:
    weight, indices = node.args[0], node.args[1]
    for d in range(ctx.rank(indices)):
        ctx.b.union(ctx.slot(node, d), ctx.slot(indices, d))
    ctx.b.union(ctx.slot(node, -1), ctx.slot(weight, 1))
    ctx.b.flag(ctx.slot(weight, 1), "embedding")
    ctx.b.block(ctx.slot(weight, 0), f"'{node.name}' looks rows up by id")


@_rule(aten.linear)
def _linear(ctx: _Context, node: fx.Node) -> None:
    x, weight = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    for d in range(ctx.rank(node) - 1):
        ctx.b.union(ctx.slot(node, d), ctx.slot(x, d))
    ctx.b.union(ctx.slot(x, -1), ctx.slot(weight, 1))
    ctx.b.union(ctx.slot(node, -1), ctx.slot(weight, 0))
    ctx.b.union(ctx.slot(node, -1), ctx.slot(bias, 0))
    ctx.b.flag(ctx.slot(node, -1), "linear_out")
    ctx.b.flag(ctx.slot(x, -1), "linear_in")


@_rule(aten.addmm)
def _addmm(ctx: _Context, node: fx.Node) -> None:
    bias, x, weight = node.args[:3]
    ctx.b.union(ctx.slot(node, 0), ctx.slot(x, 0))
    ctx.b.union(ctx.slot(x, 1), ctx.slot(weight, 0))
    ctx.b.union(ctx.slot(node, 1), ctx.slot(weight, 1))
    ctx.broadcast(node, [bias])
    ctx.b.flag(ctx.slot(node, 1), "linear_out")
    ctx.b.flag(ctx.slot(x, 1), "linear_in")


@_rule(aten.mm, aten.matmul, aten.bmm)
def _matmul(ctx: _Context, node: fx.Node) -> None:
    x, y = node.args[:2]
    if ctx.rank(x) < 2 or ctx.rank(y) < 2:
        ctx.block_all(node, f"'{node.name}' multiplies a vector")
        return
    r = ctx.rank(node)
    ctx.b.union(ctx.slot(x, -1), ctx.slot(y, -2))
    ctx.b.union(ctx.slot(node, -2), ctx.slot(x, -2))
    ctx.b.union(ctx.slot(node, -1), ctx.slot(y, -1))
    for t in (x, y):  # batch dims broadcast
        k = ctx.rank(t)
        for i in range(k - 2):
            a, o = ctx.slot(t, i), ctx.slot(node, r - k + i)
            if ctx.size(a) == ctx.size(o):
                ctx.b.union(a, o)
    ctx.b.flag(ctx.slot(node, -1), "linear_out")
    ctx.b.flag(ctx.slot(x, -1), "linear_in")


@_rule(aten.scaled_dot_product_attention)
def _sdpa(ctx: _Context, node: fx.Node) -> None:
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    r = ctx.rank(node)
    for d in range(r - 3):  # batch dims
        for t in (q, k, v):
            ctx.b.union(ctx.slot(node, d), ctx.slot(t, d))
    ctx.b.union(ctx.slot(node, -2), ctx.slot(q, -2))  # query length
    ctx.b.union(ctx.slot(k, -2), ctx.slot(v, -2))  # key length
    ctx.b.union(ctx.slot(q, -1), ctx.slot(k, -1))  # head dim of the scores
    ctx.b.union(ctx.slot(node, -1), ctx.slot(v, -1))  # head dim of the values
    ctx.b.union(ctx.slot(node, -3), ctx.slot(q, -3))  # query heads
    ctx.b.union(ctx.slot(k, -3), ctx.slot(v, -3))  # kv heads
    for t in (q, k, v, node):
        ctx.b.flag(ctx.slot(t, -3), "heads")
    for t in (q, k, v, node):
        ctx.b.flag(ctx.slot(t, -1), "head_dim")
    if ctx.size(ctx.slot(q, -3)) == ctx.size(ctx.slot(k, -3)):
        ctx.b.union(ctx.slot(q, -3), ctx.slot(k, -3))
    elif node.kwargs.get("enable_gqa"):
        ctx.b.block(ctx.slot(q, -3), f"'{node.name}' repeats kv heads implicitly (enable_gqa)")
        ctx.b.block(ctx.slot(k, -3), f"'{node.name}' repeats kv heads implicitly (enable_gqa)")
    if node.kwargs.get("scale") is None:  # the default scale reads the head dim
        ctx.b.block(ctx.slot(q, -1), f"'{node.name}' scales by 1/sqrt(head dim)")
    if _is_tensor(mask):
        m = ctx.rank(mask)
        shape = [ctx.slot(node, d) for d in range(r - 1)] + [ctx.slot(k, -2)]
        for i in range(m):
            a, o = ctx.slot(mask, i), shape[r - m + i]
            if ctx.size(a) == ctx.size(o):
                ctx.b.union(a, o)


@_rule(aten.conv1d, aten.conv2d, aten.conv3d)
def _conv(ctx: _Context, node: fx.Node) -> None:
    x, weight = node.args[:2]
    bias = node.args[2] if len(node.args) > 2 else None
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    ctx.b.union(ctx.slot(node, 0), ctx.slot(x, 0))
    ctx.b.union(ctx.slot(node, 1), ctx.slot(weight, 0))
    ctx.b.union(ctx.slot(node, 1), ctx.slot(bias, 0))
    if groups == 1:
        ctx.b.union(ctx.slot(x, 1), ctx.slot(weight, 1))
    else:
        for slot in (ctx.slot(x, 1), ctx.slot(weight, 1), ctx.slot(node, 1)):
            ctx.b.block(slot, f"'{node.name}' is a grouped convolution")
    for d in range(2, ctx.rank(node)):
        ctx.b.block(ctx.slot(node, d), f"'{node.name}' computes spatial positions")
    ctx.b.flag(ctx.slot(node, 1), "linear_out")
    ctx.b.flag(ctx.slot(x, 1), "linear_in")


@_rule(aten.full, aten.zeros, aten.ones, aten.empty)
def _create(ctx: _Context, node: fx.Node) -> None:
    for position, value in enumerate(node.args[0]):
        if isinstance(value, int):
            ctx.site(ctx.slot(node, position), node, 0, position)


@_rule(aten.new_zeros, aten.new_ones, aten.new_empty, aten.new_full)
def _create_like(ctx: _Context, node: fx.Node) -> None:
    for position, value in enumerate(node.args[1]):
        if isinstance(value, int):
            ctx.site(ctx.slot(node, position), node, 1, position)


@_rule(aten.arange)
def _arange(ctx: _Context, node: fx.Node) -> None:
    if len(node.args) == 1 and isinstance(node.args[0], int):
        ctx.site(ctx.slot(node, 0), node, 0, None)
    else:
        ctx.block_all(node, f"'{node.name}' is an arange with a start or step")


@_rule(aten.scalar_tensor, aten._assert_tensor_metadata)
def _nothing(ctx: _Context, node: fx.Node) -> None:
    pass


@_rule(aten.sym_size)
def _sym_size(ctx: _Context, node: fx.Node) -> None:
    ctx.b.block(ctx.slot(node.args[0], node.args[1]), f"'{node.name}' reads its size")


# ---- finishing --------------------------------------------------------------------------
def _unify_relations(b: _Builder) -> None:
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


def _finish(b: _Builder) -> ChannelGraph:
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

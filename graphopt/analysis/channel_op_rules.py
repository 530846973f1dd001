"""Channel rules of the ops that compute: elementwise ops, reductions, softmax, norms,
embeddings, matmuls, attention and convolutions.

Elementwise ops join broadcast-aligned dims; a matmul joins its input's channels with
the weight's columns and its output's with the weight's rows and the bias, and flags
them ``linear_in`` / ``linear_out`` (what makes a space an FFN width); a norm flags
``norm`` and records its normalised shape as a site; ``sdpa`` joins the head axes of q
and the output and flags ``heads`` / ``head_dim``. Flags are what
:mod:`graphopt.analysis.groups` reads a group's kind from.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.utils import _pytree as pytree

from graphopt.analysis.channel_context import RuleContext, is_tensor, rule
from graphopt.surgery import arg_int, arg_list, as_ints

aten = torch.ops.aten

_ELEMENTWISE = (
    aten.add, aten.sub, aten.mul, aten.div, aten.pow, aten.where, aten.masked_fill, aten.maximum, aten.minimum,
    aten.eq, aten.ne, aten.ge, aten.gt, aten.le, aten.lt, aten.__and__, aten.__or__, aten.logical_and,
    aten.logical_or, aten.logical_not, aten.bitwise_not, aten.clamp, aten.neg, aten.exp, aten.log, aten.tanh,
    aten.sigmoid, aten.gelu, aten.relu, aten.silu, aten.erf, aten.rsqrt, aten.sqrt, aten.abs, aten.sin, aten.cos,
    aten.reciprocal, aten.to, aten._to_copy, aten.clone, aten.contiguous, aten.alias, aten.detach, aten.type_as,
    aten.dropout, aten.lift_fresh_copy, aten.rsub, aten.square, aten.hardtanh, aten.leaky_relu, aten.floor_divide,
    aten.remainder,
)
_REDUCTIONS = (aten.sum, aten.mean, aten.amax, aten.amin, aten.var, aten.std, aten.any, aten.all)


@rule(*_ELEMENTWISE)
def _elementwise(ctx: RuleContext, node: fx.Node) -> None:
    ctx.broadcast(node, pytree.tree_leaves((node.args, node.kwargs)))


@rule(*_REDUCTIONS)
def _reduce(ctx: RuleContext, node: fx.Node) -> None:
    src = node.args[0]
    r = ctx.rank(src)
    given = node.args[1] if len(node.args) > 1 and node.args[1] is not None else node.kwargs.get("dim")
    if given is None or (isinstance(given, (list, tuple)) and len(given) == 0):
        given = list(range(r))
    listed = [given] if isinstance(given, int) else as_ints(node, given, "dim")
    dims = {d % r for d in listed}
    keep = ctx.rank(node) == r
    out_dim = 0
    for d in range(r):
        if d in dims:
            ctx.b.flag(ctx.slot(src, d), "reduced")
            out_dim += keep
            continue
        ctx.b.union(ctx.slot(node, out_dim), ctx.slot(src, d))
        out_dim += 1


@rule(aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax, aten._safe_softmax)
def _softmax(ctx: RuleContext, node: fx.Node) -> None:
    src = node.args[0]
    ctx.broadcast(node, [src])
    ctx.b.block(ctx.slot(src, arg_int(node, 1)), f"'{node.name}' normalises over it (softmax)")


@rule(aten.layer_norm, aten.rms_norm)
def _norm(ctx: RuleContext, node: fx.Node) -> None:
    x, shape = node.args[0], arg_list(node, 1)
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


@rule(aten.embedding)
def _embedding(ctx: RuleContext, node: fx.Node) -> None:
    weight, indices = node.args[0], node.args[1]
    for d in range(ctx.rank(indices)):
        ctx.b.union(ctx.slot(node, d), ctx.slot(indices, d))
    ctx.b.union(ctx.slot(node, -1), ctx.slot(weight, 1))
    ctx.b.flag(ctx.slot(weight, 1), "embedding")
    ctx.b.block(ctx.slot(weight, 0), f"'{node.name}' looks rows up by id")


@rule(aten.linear)
def _linear(ctx: RuleContext, node: fx.Node) -> None:
    x, weight = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    for d in range(ctx.rank(node) - 1):
        ctx.b.union(ctx.slot(node, d), ctx.slot(x, d))
    ctx.b.union(ctx.slot(x, -1), ctx.slot(weight, 1))
    ctx.b.union(ctx.slot(node, -1), ctx.slot(weight, 0))
    ctx.b.union(ctx.slot(node, -1), ctx.slot(bias, 0))
    ctx.b.flag(ctx.slot(node, -1), "linear_out")
    ctx.b.flag(ctx.slot(x, -1), "linear_in")


@rule(aten.addmm)
def _addmm(ctx: RuleContext, node: fx.Node) -> None:
    bias, x, weight = node.args[:3]
    ctx.b.union(ctx.slot(node, 0), ctx.slot(x, 0))
    ctx.b.union(ctx.slot(x, 1), ctx.slot(weight, 0))
    ctx.b.union(ctx.slot(node, 1), ctx.slot(weight, 1))
    ctx.broadcast(node, [bias])
    ctx.b.flag(ctx.slot(node, 1), "linear_out")
    ctx.b.flag(ctx.slot(x, 1), "linear_in")


@rule(aten.mm, aten.matmul, aten.bmm)
def _matmul(ctx: RuleContext, node: fx.Node) -> None:
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


@rule(aten.scaled_dot_product_attention)
def _sdpa(ctx: RuleContext, node: fx.Node) -> None:
    q, k, v = node.args[:3]
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
    _sdpa_mask(ctx, node)


def _sdpa_mask(ctx: RuleContext, node: fx.Node) -> None:
    """The mask broadcasts against the scores ``[..., heads, query, key]``."""
    k = node.args[1]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if not is_tensor(mask):
        return
    r, m = ctx.rank(node), ctx.rank(mask)
    shape = [ctx.slot(node, d) for d in range(r - 1)] + [ctx.slot(k, -2)]
    for i in range(m):
        a, o = ctx.slot(mask, i), shape[r - m + i]
        if ctx.size(a) == ctx.size(o):
            ctx.b.union(a, o)


@rule(aten.conv1d, aten.conv2d, aten.conv3d)
def _conv(ctx: RuleContext, node: fx.Node) -> None:
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

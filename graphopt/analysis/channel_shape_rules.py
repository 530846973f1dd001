"""Channel rules of the ops that move dims around: views, permutes, expands, slices,
concatenation and splits, tensor creation and size reads.

A view joins dims block by block and records a *product* relation where it splits or
merges a dim; ``cat`` / ``split`` record a *concat* relation; a slice or a ``select``
blocks the dim it cuts; an integer argument that equals a space's size is a *site* the
pruner rewrites (view sizes, expand sizes, split sizes, the sizes of ``zeros`` / ``full``).
"""

from __future__ import annotations

import torch
from torch import fx

from graphopt.analysis.channel_context import RuleContext, is_tensor, rule, value_of
from graphopt.surgery import arg_int, arg_ints, arg_list, arg_node, describe_node

aten = torch.ops.aten


@rule(aten.view, aten.reshape, aten._unsafe_view)
def _view(ctx: RuleContext, node: fx.Node) -> None:
    ctx.reshape(node, arg_node(node, 0))
    for position, value in enumerate(arg_list(node, 1)):
        if isinstance(value, int) and value != -1:
            ctx.site(ctx.slot(node, position), node, 1, position)


@rule(aten.unsqueeze, aten.squeeze, aten.flatten)
def _regroup(ctx: RuleContext, node: fx.Node) -> None:
    ctx.reshape(node, arg_node(node, 0))


@rule(aten.unflatten)
def _unflatten(ctx: RuleContext, node: fx.Node) -> None:
    src = arg_node(node, 0)
    ctx.reshape(node, src)
    dim = arg_int(node, 1) % ctx.rank(src)
    for position, value in enumerate(arg_list(node, 2)):
        if isinstance(value, int) and value != -1:
            ctx.site(ctx.slot(node, dim + position), node, 2, position)


@rule(aten.transpose, aten.permute, aten.t)
def _permute(ctx: RuleContext, node: fx.Node) -> None:
    src, r = node.args[0], ctx.rank(node)
    if node.target is aten.t.default:
        order = [1, 0] if r == 2 else list(range(r))
    elif node.target is aten.permute.default:
        order = [d % r for d in arg_ints(node, 1)]
    else:
        order = list(range(r))
        a, c = arg_int(node, 1) % r, arg_int(node, 2) % r
        order[a], order[c] = order[c], order[a]
    for d, source_dim in enumerate(order):
        ctx.b.union(ctx.slot(node, d), ctx.slot(src, source_dim))


@rule(aten.expand)
def _expand(ctx: RuleContext, node: fx.Node) -> None:
    src, r = node.args[0], ctx.rank(node)
    k = ctx.rank(src)
    for d in range(r):
        o = ctx.slot(node, d)
        a = ctx.slot(src, d - (r - k)) if d >= r - k else None
        if a is not None and ctx.size(a) == ctx.size(o):
            ctx.b.union(a, o)
        else:
            ctx.b.flag(o, "expanded")
        value = arg_list(node, 1)[d]
        if isinstance(value, int) and value != -1:
            ctx.site(o, node, 1, d)


@rule(aten.slice)
def _slice(ctx: RuleContext, node: fx.Node) -> None:
    src = node.args[0]
    dim = arg_int(node, 1, default=0) % ctx.rank(src)
    start = node.args[2] if len(node.args) > 2 else 0
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    whole = ctx.size(ctx.slot(src, dim))
    if whole is None:  # dim is one of src's dims (its rank divided the index above)
        raise ValueError(f"{describe_node(node)} slices a dim with no known size")
    full = start in (0, None) and step == 1 and (end is None or (isinstance(end, int) and (end >= 2**62 or (whole.is_Integer and end >= int(whole)))))
    for d in range(ctx.rank(node)):
        if d == dim and not full:
            ctx.b.block(ctx.slot(src, d), f"'{node.name}' slices it")
            ctx.b.block(ctx.slot(node, d), f"'{node.name}' is a slice of it")
        else:
            ctx.b.union(ctx.slot(node, d), ctx.slot(src, d))


@rule(aten.select)
def _select(ctx: RuleContext, node: fx.Node) -> None:
    src = node.args[0]
    dim = arg_int(node, 1) % ctx.rank(src)
    ctx.b.block(ctx.slot(src, dim), f"'{node.name}' selects one index of it")
    kept = [d for d in range(ctx.rank(src)) if d != dim]
    for d, source_dim in enumerate(kept):
        ctx.b.union(ctx.slot(node, d), ctx.slot(src, source_dim))


@rule(aten.cat)
def _cat(ctx: RuleContext, node: fx.Node) -> None:
    r = ctx.rank(node)
    # torch.cat skips 1-D empty tensors beside tensors of any rank (transformers' DynamicCache
    # starts every layer's keys and values from one): they hold no channel.
    tensors = [t for t in arg_list(node, 0) if is_tensor(t) and not (r > 1 and _empty_1d(t))]
    dim = arg_int(node, 1, default=0) % r
    for t in tensors:
        if ctx.rank(t) != r:
            ctx.block_all(node, f"'{node.name}' concatenates tensors of different rank")
            return
        for d in range(r):
            if d != dim:
                ctx.b.union(ctx.slot(node, d), ctx.slot(t, d))
    ctx.b.relations.append(("concat", ctx.known_slot(node, dim), [ctx.known_slot(t, dim) for t in tensors]))


def _empty_1d(node: object) -> bool:
    val = value_of(node)
    return isinstance(val, torch.Tensor) and val.dim() == 1 and val.shape[0] == 0


@rule(aten.split, aten.split_with_sizes)
def _split(ctx: RuleContext, node: fx.Node) -> None:
    src = node.args[0]
    r = ctx.rank(src)
    dim = arg_int(node, 2, default=0) % r
    outputs = value_of(node)
    if not isinstance(outputs, (list, tuple)):
        raise TypeError(f"{describe_node(node)} has no list of tensors as its value")
    parts = range(len(outputs))
    for i in parts:
        for d in range(r):
            if d != dim:
                ctx.b.union(ctx.slot(node, d, i), ctx.slot(src, d))
    ctx.b.relations.append(("concat", ctx.known_slot(src, dim), [ctx.known_slot(node, dim, i) for i in parts]))
    for i in parts:  # the sizes argument is rewritten from the parts' new sizes
        ctx.site(ctx.slot(node, dim, i), node, 1, ("split", i))


@rule(aten.full, aten.zeros, aten.ones, aten.empty)
def _create(ctx: RuleContext, node: fx.Node) -> None:
    for position, value in enumerate(arg_list(node, 0)):
        if isinstance(value, int):
            ctx.site(ctx.slot(node, position), node, 0, position)


@rule(aten.new_zeros, aten.new_ones, aten.new_empty, aten.new_full)
def _create_like(ctx: RuleContext, node: fx.Node) -> None:
    for position, value in enumerate(arg_list(node, 1)):
        if isinstance(value, int):
            ctx.site(ctx.slot(node, position), node, 1, position)


@rule(aten.arange)
def _arange(ctx: RuleContext, node: fx.Node) -> None:
    if len(node.args) == 1 and isinstance(node.args[0], int):
        ctx.site(ctx.slot(node, 0), node, 0, None)
    else:
        ctx.block_all(node, f"'{node.name}' is an arange with a start or step")


@rule(aten.scalar_tensor, aten._assert_tensor_metadata)
def _nothing(ctx: RuleContext, node: fx.Node) -> None:
    pass


@rule(aten.sym_size)
def _sym_size(ctx: RuleContext, node: fx.Node) -> None:
    ctx.b.block(ctx.slot(node.args[0], arg_int(node, 1)), f"'{node.name}' reads its size")

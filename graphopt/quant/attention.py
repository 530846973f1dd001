"""Self-attention whose Q, K, V projections were quantized -> one ``graphopt::attention_int8``.

After the ``sdpa`` pass and the dynamic-int8 rewrite, a BERT-style attention block reads

    p = linear_dynamic_int8(x, W, s, b)          for p in (q, k, v), the same x
    t = transpose(view(p, [B, S, -1, d]), 1, 2)
    o = scaled_dot_product_attention(tq, tk, tv, mask, scale=c)
    y = reshape(contiguous(transpose(o, 1, 2)), [B, S, -1])

and becomes ``attention_int8(x, [Wq|Wk|Wv], [sq|sk|sv], [bq|bk|bv], mask, heads, c)``: one
integer GEMM for the three projections (the activation is quantized once, exactly as each of
the three would quantize it) and ORT's fused MultiHeadAttention, without the transposes.
Numerically the same as the unfused ops. A rule as data: every failed check says why.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphopt.quant.constants import constant_node
from graphopt.quant.sites import get_tensor
from graphopt.rewrite import Match, NoMatch, RewriteRule, emit, fake, only_user

aten = torch.ops.aten
_IDENTITIES = frozenset({aten.contiguous.default, aten.clone.default})
_RESHAPES = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})


def fused_attention_rule(gm: fx.GraphModule) -> RewriteRule:
    registered: dict[int, str] = {}
    projection = torch.ops.graphopt.linear_dynamic_int8.default

    def match(sdpa: fx.Node) -> Match | NoMatch:
        if len(sdpa.args) < 4 or sdpa.args[3] is None:
            return NoMatch("mask", f"'{sdpa.name}' has no additive mask")
        extra = {k: v for k, v in sdpa.kwargs.items() if k != "scale"}
        if any(extra.get(k) for k in ("dropout_p", "is_causal", "enable_gqa")) or len(sdpa.args) > 4:
            return NoMatch("sdpa_options", f"'{sdpa.name}' uses dropout, is_causal or GQA")
        mask, q_val = fake(sdpa.args[3]), fake(sdpa.args[0])
        if mask is None or q_val is None or mask.dim() != 4 or mask.dtype != torch.float32:
            return NoMatch("mask", f"'{sdpa.name}' mask is not a 4-D float32 bias")
        if str(mask.shape[2]) != str(q_val.shape[2]) or str(mask.shape[1]) not in ("1", str(q_val.shape[1])):
            return NoMatch("mask", f"mask {tuple(mask.shape)} is not [B or 1, 1 or heads, S, S]")
        heads, head_dim = int(q_val.shape[1]), int(q_val.shape[3])
        chain, projections = [], []
        for operand in sdpa.args[:3]:
            found = projection_of(operand, projection)
            if isinstance(found, NoMatch):
                return found
            chain += found[1]
            projections.append(found[0])
        inputs = {p.args[0] for p in projections}
        if len(inputs) != 1:
            return NoMatch("same_input", "Q, K and V are projections of different tensors (cross-attention)")
        widths = {get_tensor(gm, p.args[1].target).shape[1] for p in projections}
        if widths != {heads * head_dim}:
            return NoMatch("widths", f"projection widths {sorted(widths)} != heads * head_dim = {heads * head_dim}")
        tail = heads_merged_output(sdpa)
        if isinstance(tail, NoMatch):
            return tail
        root, tail_nodes = tail
        scale = sdpa.kwargs.get("scale") or head_dim**-0.5
        nodes = (*projections, *chain, sdpa, *tail_nodes)
        return Match(root=root, nodes=nodes, bindings={"projections": projections, "mask": sdpa.args[3], "heads": heads, "scale": float(scale)})

    def replace(graph: fx.Graph, m: Match) -> fx.Node:
        projections = m.bindings["projections"]
        tensors = [[get_tensor(gm, p.args[i].target) for p in projections] for i in (1, 2, 3)]
        w_qkv = torch.cat(tensors[0], dim=1)
        w_scale, bias = torch.cat(tensors[1]), torch.cat(tensors[2])
        owner = projections[0].name
        with graph.inserting_before(projections[0]):
            consts = [constant_node(graph, gm, owner, key, t, registered) for key, t in (("w_qkv", w_qkv), ("w_qkv_scale", w_scale), ("qkv_bias", bias))]
        x = projections[0].args[0]
        return emit(graph, torch.ops.graphopt.attention_int8.default, (x, *consts, m.bindings["mask"], m.bindings["heads"], m.bindings["scale"]))

    return RewriteRule("attention_int8", frozenset({aten.scaled_dot_product_attention.default}), match, replace)


def projection_of(operand, projection, stored: tuple[int, ...] = (1, 2, 3), what: str = "a dynamic-int8 projection (fp32 layer, or another mode)") -> tuple[fx.Node, list[fx.Node]] | NoMatch:
    """transpose(view(p, [B, S, heads, d]), 1, 2) with p a ``projection`` node whose arguments at
    ``stored`` are stored tensors (get_attr; a missing optional one is fine), single users."""
    if not (isinstance(operand, fx.Node) and operand.target is aten.transpose.int and sorted(d % 4 for d in operand.args[1:3]) == [1, 2]):
        return NoMatch("head_split", f"{_name(operand)} is not transpose(·, 1, 2) of the heads view")
    view = operand.args[0]
    if not (isinstance(view, fx.Node) and view.target in _RESHAPES):
        return NoMatch("head_split", f"{_name(view)} is not a view into heads")
    source = view.args[0]
    if not (isinstance(source, fx.Node) and source.target is projection):
        return NoMatch("projection", f"{_name(source)} is not {what}")
    for node, expected in ((source, view), (view, operand)):
        user = only_user(node)
        if isinstance(user, NoMatch):
            return user
    for i in stored:
        if i >= len(source.args) or source.args[i] is None:
            continue
        if not (isinstance(source.args[i], fx.Node) and source.args[i].op == "get_attr"):
            return NoMatch("projection", f"{_name(source)} reads a computed weight")
    if isinstance(only_user(operand), NoMatch):
        return only_user(operand)
    return source, [view, operand]


def heads_merged_output(sdpa: fx.Node) -> tuple[fx.Node, list[fx.Node]] | NoMatch:
    """reshape([contiguous](transpose(o, 1, 2)), [B, S, -1]) -> (the reshape, the chain)."""
    chain, node = [], sdpa
    user = only_user(node)
    if isinstance(user, NoMatch):
        return user
    if not (user.target is aten.transpose.int and sorted(d % 4 for d in user.args[1:3]) == [1, 2]):
        return NoMatch("head_merge", f"attention output feeds {_name(user)}, not transpose(·, 1, 2)")
    chain.append(user)
    node = user
    while True:
        user = only_user(node)
        if isinstance(user, NoMatch):
            return user
        if user.target in _IDENTITIES:
            chain.append(user)
            node = user
            continue
        break
    out = fake(user)
    if user.target not in _RESHAPES or out is None or out.dim() != 3:
        return NoMatch("head_merge", f"heads are merged by {_name(user)}, not a reshape to [B, S, hidden]")
    chain.append(user)
    return user, chain


def _name(value) -> str:
    return f"'{value.name}' ({getattr(value.target, '__name__', value.target)})" if isinstance(value, fx.Node) else repr(value)

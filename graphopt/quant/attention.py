"""Self-attention whose Q, K, V projections were quantized -> one ``graphopt::attention_int8``.

After the ``sdpa`` pass and the dynamic-int8 rewrite, a BERT-style attention block reads

    p = linear_dynamic_int8(x, W, s, b)          for p in (q, k, v), the same x
    t = transpose(view(p, [B, S, -1, d]), 1, 2)
    o = scaled_dot_product_attention(tq, tk, tv, mask, scale=c)
    y = reshape(contiguous(transpose(o, 1, 2)), [B, S, -1])

and becomes ``attention_int8(x, [Wq|Wk|Wv], [sq|sk|sv], [bq|bk|bv], mask, heads, c)``: one
integer GEMM for the three projections and ORT's fused MultiHeadAttention, without the
transposes. The activation is quantized once: its per-tensor scale and zero point depend
on ``x`` alone, so they are the ones each of the three projections computes, and every
output column's integer dot product, scale and bias are the same as before (the eager
references agree bit for bit; tests/test_quantize.py measures it). The pass that
applies the rule is ``int8-attention`` (graphopt/passes/int8_attention.py). A rule as
data: every failed check says why.
"""

from __future__ import annotations

import torch
from torch import fx

from graphopt.attention.analysis import heads_merged_output, projection_of
from graphopt.quant import ops  # noqa: F401  (defines torch.ops.graphopt)
from graphopt.rewrite import Match, NoMatch, RewriteRule, emit, fake
from graphopt.surgery import add_constant, arg_node, as_float, get_tensor

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


DYNAMIC = torch.ops.graphopt.linear_dynamic_int8.default
STATIC = torch.ops.graphopt.linear_static_int8.default
# Per projection kind: the fused op, where its weight is among the projection's arguments, and
# the stored arguments packed along the output columns (the rest must be equal and are shared).
_KINDS = {
    DYNAMIC: (torch.ops.graphopt.attention_int8.default, 1, {"w_qkv": 1, "w_qkv_scale": 2, "qkv_bias": 3}, ()),
    STATIC: (torch.ops.graphopt.attention_static_int8.default, 3, {"w_qkv": 3, "w_qkv_scale": 4, "w_qkv_zero_point": 5, "qkv_bias": 6}, (1, 2)),
}


def fused_attention_rule(gm: fx.GraphModule) -> RewriteRule:
    """SDPA over three int8 projections of one tensor (dynamic: ``graphopt::attention_int8``;
    static with one calibrated activation scale: ``graphopt::attention_static_int8``)."""
    registered: dict[int, str] = {}

    def match(sdpa: fx.Node) -> Match | NoMatch:
        found = _check_sdpa(sdpa)
        if isinstance(found, NoMatch):
            return found
        heads, head_dim = found
        chain, projections = [], []
        for operand in sdpa.args[:3]:
            split = projection_of(operand, DYNAMIC)
            if isinstance(split, NoMatch):
                static = projection_of(operand, STATIC, stored=(1, 2, 3, 4, 5, 6), what="an int8 projection (fp32 layer, or another mode)")
                if isinstance(static, NoMatch):
                    return static if split.check == "projection" else split
                split = static
            chain += split[1]
            projections.append(split[0])
        if len({p.args[0] for p in projections}) != 1:
            return NoMatch("same_input", "Q, K and V are projections of different tensors (cross-attention)")
        if len({p.target for p in projections}) != 1:
            return NoMatch("same_kind", "Q, K and V are quantized differently (dynamic and static int8)")
        _fused, weight_at, _packed, shared = _KINDS[projections[0].target]  # type: ignore[index]  # an OpOverload: projection_of matched it
        for i in shared:  # static: one QuantizeLinear serves the three only if they quantize alike
            values = [get_tensor(gm, str(arg_node(p, i).target)) for p in projections]
            if not all(torch.equal(values[0], v) for v in values[1:]):
                return NoMatch("activation_scale", f"Q, K and V quantize their input with different calibrated {'scales' if i == 1 else 'zero points'}")
        widths = {get_tensor(gm, str(arg_node(p, weight_at).target)).shape[1] for p in projections}
        if widths != {heads * head_dim}:
            return NoMatch("widths", f"projection widths {sorted(widths)} != heads * head_dim = {heads * head_dim}")
        tail = heads_merged_output(sdpa)
        if isinstance(tail, NoMatch):
            return tail
        root, tail_nodes = tail
        given_scale = sdpa.kwargs.get("scale")
        scale = as_float(sdpa, given_scale, "scale") if given_scale else head_dim**-0.5
        nodes = (*projections, *chain, sdpa, *tail_nodes)
        return Match(root=root, nodes=nodes, bindings={"projections": projections, "mask": sdpa.args[3], "heads": heads, "scale": scale})

    def replace(graph: fx.Graph, m: Match) -> fx.Node:
        projections = m.bindings["projections"]
        fused, weight_at, packed_at, shared = _KINDS[projections[0].target]
        first = projections[0]
        packed = {key: torch.cat([get_tensor(gm, str(p.args[i].target)) for p in projections], dim=1 if i == weight_at else 0) for key, i in packed_at.items()}
        with graph.inserting_before(first):
            consts = {key: add_constant(gm, f"quant_{first.name}_{key}", t, registered=registered) for key, t in packed.items()}
        stored = [first.args[i] for i in shared] + list(consts.values())  # the op's order: x, [x_scale, x_zero_point,] weights..., bias
        return emit(graph, fused, (first.args[0], *stored, m.bindings["mask"], m.bindings["heads"], m.bindings["scale"]))

    return RewriteRule("attention_int8", frozenset({SDPA}), match, replace)


def _check_sdpa(sdpa: fx.Node) -> tuple[int, int] | NoMatch:
    """(heads, head_dim) of an SDPA the fused kernel computes the same: an additive 4-D
    float32 mask, no dropout, causal flag or GQA."""
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
    return int(q_val.shape[1]), int(q_val.shape[3])

"""Eager attention → ``aten.scaled_dot_product_attention`` (exact).

Matches, anchored at each softmax::

    matmul(q, kᵀ) [* s | / s | / full([], s)] [+ mask | masked_fill(c, v) | where(c, ·, v)]
      → softmax(-1) [→ to(same dtype)] [→ dropout(train=False) | clone | contiguous] → matmul(·, v)

and replaces the final matmul by ``sdpa(q, k, v, attn_mask, scale=s)`` (``scale=1.0``
when the graph has none: SDPA's default would be 1/sqrt(d)). ``aten.bmm`` works for
3-D. Every intermediate must have one user, so attention weights that are returned or
reused stay eager. GQA's repeat_kv (expand + reshape) is left as is.

Boolean fills become an additive mask ``where(c, v, 0)``. Masked scores are then ``s + v``
instead of ``v``, the same number in fp32 whenever |s| < |v|·2⁻²⁴ (true for HF's
``finfo.min`` masks), so even fully-masked rows agree. A ``-inf`` fill is the exception:
eager softmax gives NaN on a fully-masked row, SDPA gives 0.
"""

from __future__ import annotations

import numbers
from typing import ClassVar

import torch
from torch import fx

from graphopt.context import PassContext
from graphopt.passbase import Pass, PassConfig, PassInfo, PassResult, register_pass
from graphopt.program import Program
from graphopt.rewrite import (
    Match,
    NoMatch,
    RewriteRule,
    apply_rules,
    describe_near_misses,
    emit,
    fake,
    only_user,
)
from graphopt.surgery import arg_int, arg_ints, arg_list, arg_node, get_tensor

aten = torch.ops.aten

SOFTMAX = frozenset({aten.softmax.int, aten._softmax.default, aten._safe_softmax.default})
MATMUL = frozenset({aten.matmul.default, aten.bmm.default})
CASTS = frozenset({aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default})
IDENTITIES = frozenset({aten.clone.default, aten.contiguous.default, aten.alias.default})
MASK_OPS = frozenset({aten.add.Tensor, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self, aten.where.ScalarOther})
SCALE_OPS = frozenset({aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar})


class SDPAConfig(PassConfig):
    debug: bool = False  # log every match attempt and lint after each rewrite


class SDPAInfo(PassInfo):
    replaced: int = 0
    near_misses: list[dict[str, str]] = []  # softmax nodes that did not match, with the failing check


@register_pass
class AttentionToSDPA(Pass):
    """Rewrite eager attention (matmul, scale, mask, softmax, matmul) as one scaled_dot_product_attention."""

    name: ClassVar[str] = "sdpa"
    Config: ClassVar[type[PassConfig]] = SDPAConfig
    Info: ClassVar[type[PassInfo]] = SDPAInfo
    requires_ir = ("aten",)
    config: SDPAConfig  # the validated options (narrowed from PassConfig for type checkers)

    @classmethod
    def is_exact(cls, config: SDPAConfig) -> bool:
        return True

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        stats = apply_rules(program.module, [EAGER_ATTENTION], debug=self.config.debug, provenance=self.name)
        replaced = stats.applied[EAGER_ATTENTION.name]
        info = SDPAInfo(replaced=replaced, near_misses=[m.to_dict() for m in stats.near_misses])
        return PassResult.of(program, replaced > 0, info, _unchanged_reason(stats.near_misses))


def _unchanged_reason(near_misses: list) -> str:
    if not near_misses:
        return "no softmax in the graph: no eager attention to rewrite"
    return f"no softmax is eager attention; near misses: {describe_near_misses(near_misses, 3)}"


# ---- matching ---------------------------------------------------------------------------
def match_attention(softmax: fx.Node) -> Match | NoMatch:
    bad = _check_softmax(softmax)
    if bad is not None:
        return bad
    nodes = [softmax]
    probs = softmax
    while True:  # walk down through value-preserving ops to the second matmul
        user = only_user(probs)
        if isinstance(user, NoMatch):
            return user
        if user.target in MATMUL:
            break
        why = _passthrough(user)
        if why:
            return NoMatch("after_softmax", f"softmax feeds '{user.name}' ({_op(user)}), {why}")
        nodes.append(user)
        probs = user
    out = user
    if out.args[0] is not probs:
        return NoMatch("second_matmul", f"'{out.name}' multiplies by the probabilities on the right, not the left")
    scores = _split_scores(arg_node(softmax, 0))
    if isinstance(scores, NoMatch):
        return scores
    q, k_t, v = scores["q"], scores["k_t"], out.args[1]
    k = _untranspose(k_t)
    bad = _check_qkv(fake(q), fake(k_t), fake(v))
    if bad is not None:
        return bad
    bindings = dict(scores, k=k, v=v)
    return Match(root=out, nodes=tuple(scores["nodes"]) + tuple(nodes) + (out,), bindings=bindings)


def _check_softmax(softmax: fx.Node) -> NoMatch | None:
    x = fake(softmax.args[0])
    if x is None:
        return NoMatch("metadata", f"'{softmax.name}' has no FakeTensor value to check shapes on")
    dim = softmax.args[1]
    if dim not in (-1, x.dim() - 1):
        return NoMatch("softmax_dim", f"softmax over dim {dim}, not the last dim of a {x.dim()}-D tensor")
    out = fake(softmax)
    if out is not None and out.dtype != x.dtype:
        return NoMatch("softmax_dtype", f"softmax computes in {out.dtype} on {x.dtype} scores; SDPA would not")
    if x.dim() < 3:
        return NoMatch("rank", f"scores are {x.dim()}-D; SDPA wants (batch..., L, S)")
    return None


def _passthrough(node: fx.Node) -> str | None:
    """None when ``node`` returns its first input's values unchanged; else why it does not."""
    if node.target in IDENTITIES:
        return None
    if node.target in CASTS:
        src, dst = fake(node.args[0]), fake(node)
        if src is not None and dst is not None and (src.dtype, src.device) == (dst.dtype, dst.device):
            return None
        return "a cast that changes dtype or device"
    if node.target is aten.dropout.default:
        p, train = node.args[1], node.args[2]
        return None if (not train or p == 0) else f"dropout p={p} in training mode"
    return "which is not a cast to the same dtype, an eval-mode dropout, or a clone"


def _split_scores(node: fx.Node) -> dict | NoMatch:
    """scores = [mask op](scale op(matmul(q, kᵀ))) → q, kᵀ, scale, mask recipe, matched nodes."""
    chain, mask, scores = [], None, node
    if node.target in MASK_OPS:
        split = _split_mask(node)
        if isinstance(split, NoMatch):
            return split
        mask, scores = split
        if str(fake(node).shape) != str(fake(scores).shape):
            return NoMatch("mask_shape", f"mask op '{node.name}' broadcasts the scores to {tuple(fake(node).shape)}")
        chain.append(node)
    scaled = _split_scale(scores)
    if isinstance(scaled, NoMatch):
        return scaled
    scale, matmul, factor = scaled
    if matmul is not scores:
        chain.append(scores)
    if matmul.target not in MATMUL:
        return NoMatch("first_matmul", f"scores come from '{matmul.name}' ({_op(matmul)}), not matmul(q, kᵀ)")
    chain.append(matmul)
    for inner in chain:
        user = only_user(inner)
        if isinstance(user, NoMatch):
            return user
    q, k_t = matmul.args[:2]
    extras = [n for n in (factor, k_t) if isinstance(n, fx.Node) and n.op == "call_function"]
    return {"q": q, "k_t": k_t, "scale": scale, "mask": mask, "nodes": extras + chain[::-1]}


def _split_mask(node: fx.Node) -> tuple[tuple, fx.Node] | NoMatch:
    """(mask recipe, scores) for add(scores, mask), masked_fill(scores, c, v), where(c, scores, v)."""
    if node.target is aten.add.Tensor:
        a, b = node.args[:2]
        for scores, mask in ((a, b), (b, a)):
            if isinstance(scores, fx.Node) and _leads_to_matmul(scores):
                if not isinstance(mask, fx.Node) or fake(mask) is None:
                    return NoMatch("mask", f"'{node.name}' adds {_describe(mask)} to the scores, not a mask tensor")
                if fake(mask).dtype != fake(scores).dtype:
                    return NoMatch("mask", f"additive mask is {fake(mask).dtype}, scores are {fake(scores).dtype}")
                return ("add", mask), scores
        return NoMatch("first_matmul", f"neither side of '{node.name}' comes from matmul(q, kᵀ)")
    if node.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
        scores, cond, value = arg_node(node, 0), node.args[1], node.args[2]
        kind = "fill"
    else:
        cond, scores, value = node.args[0], arg_node(node, 1), node.args[2]
        kind = "keep"
    if fake(cond) is None or fake(cond).dtype != torch.bool:
        return NoMatch("mask", f"'{node.name}' selects with a non-boolean condition {_describe(cond)}")
    if isinstance(value, fx.Node) and (fake(value) is None or fake(value).dim() != 0 or fake(value).dtype != fake(node).dtype):
        return NoMatch("mask", f"'{node.name}' fills with {_describe(value)}, not a scalar of the scores' dtype")
    return (kind, cond, value), scores


def _leads_to_matmul(node: fx.Node) -> bool:
    split = _split_scale(node)
    return not isinstance(split, NoMatch) and split[1].target in MATMUL


def _split_scale(node: fx.Node) -> tuple[float, fx.Node, fx.Node | None] | NoMatch:
    """(scale, scores before scaling, factor node) for mul/div of a matmul by a constant scalar."""
    if node.target not in SCALE_OPS:
        return 1.0, node, None
    a, b = node.args[:2]
    dividing = node.target in (aten.div.Tensor, aten.div.Scalar)
    for scores, factor in ((a, b),) if dividing else ((a, b), (b, a)):
        if isinstance(scores, fx.Node) and scores.target in MATMUL:
            value = _constant_scalar(factor)
            if value is None:
                return NoMatch("scale", f"'{node.name}' scales the scores by {_describe(factor)}, not a constant scalar")
            return (1.0 / value if dividing else value), scores, factor if isinstance(factor, fx.Node) else None
    return 1.0, node, None


def _constant_scalar(value) -> float | None:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, fx.Node):
        if value.target is aten.full.default and arg_list(value, 0) == [] and isinstance(value.args[1], numbers.Number):
            return float(value.args[1])
        if value.target is aten.scalar_tensor.default and isinstance(value.args[0], numbers.Number):
            return float(value.args[0])
        if value.op == "get_attr":
            gm = value.graph.owning_module
            if gm is None:  # get_tensor's AttributeError on None, as for a missing tensor
                return None
            try:
                tensor = get_tensor(gm, str(value.target))
            except AttributeError:
                return None
            if isinstance(tensor, torch.Tensor) and tensor.numel() == 1 and tensor.dim() == 0:
                return float(tensor)
    return None


def _untranspose(k_t: fx.Node) -> fx.Node | None:
    """k when kᵀ is transpose(k, -2, -1); None when the replacement must transpose kᵀ itself."""
    val = fake(k_t)
    if val is None or not isinstance(k_t, fx.Node):
        return None
    n = val.dim()
    if k_t.target is aten.transpose.int and {arg_int(k_t, 1) % n, arg_int(k_t, 2) % n} == {n - 2, n - 1}:
        return arg_node(k_t, 0)
    if k_t.target is aten.permute.default and arg_ints(k_t, 1) == [*range(n - 2), n - 1, n - 2]:
        return arg_node(k_t, 0)
    return None


def _check_qkv(q, k_t, v) -> NoMatch | None:
    if q is None or k_t is None or v is None:
        return NoMatch("metadata", "q, kᵀ or v has no FakeTensor value")
    if not (q.dtype == k_t.dtype == v.dtype) or not q.dtype.is_floating_point:
        return NoMatch("dtype", f"q, k, v dtypes {q.dtype}, {k_t.dtype}, {v.dtype}")
    if not (q.dim() == k_t.dim() == v.dim()):
        return NoMatch("rank", f"q, kᵀ, v are {q.dim()}-D, {k_t.dim()}-D, {v.dim()}-D")
    batch = {str(tuple(t.shape[:-2])) for t in (q, k_t, v)}
    if len(batch) != 1:
        return NoMatch("batch_dims", f"q, k, v batch dims differ {sorted(batch)}: matmul broadcasts, SDPA would not")
    return None


def _op(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def _describe(value) -> str:
    return f"'{value.name}' ({_op(value)})" if isinstance(value, fx.Node) else repr(value)


# ---- replacement ------------------------------------------------------------------------
def replace_attention(graph: fx.Graph, match: Match) -> fx.Node:
    b = match.bindings
    k = b["k"] if b["k"] is not None else emit(graph, aten.transpose.int, (b["k_t"], -2, -1))
    args: tuple[fx.Node, ...] = (b["q"], k, b["v"])
    mask = _additive_mask(graph, b["mask"], fake(b["q"]))
    if mask is not None:
        args += (mask,)
    return emit(graph, aten.scaled_dot_product_attention.default, args, {"scale": b["scale"]})


def _additive_mask(graph: fx.Graph, recipe, q) -> fx.Node | None:
    if recipe is None:
        return None
    if recipe[0] == "add":
        return recipe[1]
    kind, cond, value = recipe
    if not isinstance(value, fx.Node):
        value = emit(graph, aten.scalar_tensor.default, (float(value),), {"dtype": q.dtype, "device": q.device})
    if kind == "fill":  # masked_fill(s, c, v): v where c
        return emit(graph, aten.where.ScalarOther, (cond, value, 0.0))
    return emit(graph, aten.where.ScalarSelf, (cond, 0.0, value))  # where(c, s, v): v where not c


EAGER_ATTENTION = RewriteRule("eager_attention", SOFTMAX, match_attention, replace_attention)

"""``aten.scaled_dot_product_attention`` → ``graphopt::fused_attention`` (exact).

The exporter decomposes SDPA into MatMul/Softmax/MatMul plus shape arithmetic (opset 18)
or emits opset-23 ``Attention``; both hold the ``seq × seq`` score matrix. ORT's
``com.microsoft.MultiHeadAttention`` CPU kernel does not, and is faster. Measured here
(ORT 1.32, 2 threads, 12 heads × 32, batch 1; ms / extra peak MiB):

=====  ===========  ==============  =====================
seq    decomposed   Attention-23    MultiHeadAttention
=====  ===========  ==============  =====================
512       6.5 / 24      6.6 / 13       2.8 / 3
2048     63 / 400       52 / 200        40 / 10
4096    219 / 806      221 / 800       162 / 19
8192   1012 / 3213    1097 / 3200      608 / 37
=====  ===========  ==============  =====================

so the lowering is chosen per target by :data:`LOWERING_BY_PROVIDER`: MultiHeadAttention
at every length on CPU (it won at each one). A provider without a measurement keeps the
exporter's own form (the pass is skipped and says so). The provider is the config's, or
else the context's target.

Self-attention whose Q, K, V are fp32 linears of one tensor becomes one packed
``Attention`` kernel instead (:mod:`graphopt.attention.packed`); every other fusable SDPA
node becomes ``graphopt::fused_attention[_biased]``. Both rules take the masks
transformers builds: the additive ``where(mask, 0, finfo.min)`` of eager attention and
the boolean mask (True = attend) of SDPA attention, which is converted in the graph to
that additive form (exact wherever a query keeps a key: :mod:`graphopt.attention.masks`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import fx

import graphopt.attention  # noqa: F401  (registers the custom ops, declares their lowerings)
from graphopt.attention.analysis import SDPA, SDPASite
from graphopt.attention.masks import MASK_CONVERSION, additive_mask, zero_unattended
from graphopt.attention.packed import packed_attention_rule
from graphopt.context import PassContext
from graphopt.passbase import Pass, PassConfig, PassInfo, PassResult, register_pass
from graphopt.program import Program, module_path
from graphopt.rewrite import Match, NoMatch, RewriteRule, apply_rules, describe_near_misses, emit, fake
from graphopt.surgery import CREATED_BY

# provider -> lowering, from the table above; "exporter" keeps torch.onnx's own form.
LOWERING_BY_PROVIDER: dict[str, str] = {"cpu": "multi_head_attention"}


class FusedAttentionConfig(PassConfig):
    provider: str | None = Field(None, description="the ORT provider to lower for; default: the context's target")
    pack_qkv: bool = Field(True, description="self-attention whose Q, K, V are fp32 linears of one tensor: one packed matmul")


class FusedAttentionInfo(PassInfo):
    replaced: int = 0  # SDPA nodes now one fused kernel (packed ones included)
    packed_qkv: int = 0  # of which with their Q/K/V projections packed into the kernel
    boolean_masks: int = 0  # boolean SDPA masks converted to additive biases on the way
    lowering: str = ""
    near_misses: list[dict[str, str]] = []  # SDPA nodes left as they are, with the failing check


@register_pass
class FusedAttention(Pass):
    """Lower scaled_dot_product_attention to ORT's fused attention kernel, packing Q/K/V projections where it can."""

    name: ClassVar[str] = "fused-attention"
    Config: ClassVar[type[PassConfig]] = FusedAttentionConfig
    Info: ClassVar[type[PassInfo]] = FusedAttentionInfo
    requires_ir = ("aten",)
    config: FusedAttentionConfig  # the validated options (narrowed from PassConfig for type checkers)

    @classmethod
    def is_exact(cls, config: FusedAttentionConfig) -> bool:
        return True

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        provider = self.config.provider or ctx.target.provider
        lowering = LOWERING_BY_PROVIDER.get(provider.lower(), "exporter")
        if lowering == "exporter":
            return PassResult.skipped(program, f"no measured fused lowering for provider '{provider}' (measured: {', '.join(LOWERING_BY_PROVIDER)}): the exporter's form stays", FusedAttentionInfo(lowering=lowering))
        gm = program.module
        rules = ([packed_attention_rule(gm)] if self.config.pack_qkv else []) + [FUSED_ATTENTION]
        stats = apply_rules(gm, rules, provenance=self.name)
        near_misses = [m.to_dict() for m in stats.near_misses]
        if not stats.total:
            return PassResult.unchanged(program, FusedAttentionInfo(lowering=lowering, near_misses=near_misses), _unchanged_reason(stats.near_misses))
        converted = [n for n in gm.graph.nodes if n.target is MASK_CONVERSION and n.meta.get(CREATED_BY, "").startswith(f"{self.name}:")]
        info = FusedAttentionInfo(
            replaced=stats.total, packed_qkv=stats.applied.get("attention_qkv", 0), boolean_masks=len(converted), lowering=lowering, near_misses=near_misses
        )
        return PassResult.applied(program, info)


def _unchanged_reason(near_misses: list) -> str:
    if not near_misses:
        return "no scaled_dot_product_attention in the graph (run the sdpa pass first on eager attention)"
    return f"no SDPA node can be fused; near misses: {describe_near_misses(near_misses, 4, with_rule=True)}"


# ---- one SDPA node -> MultiHeadAttention ----------------------------------------------------
def unfusable(site: SDPASite) -> str:
    """Why ``site`` cannot become MultiHeadAttention ('' when it can)."""
    q, k, v = (fake(a) for a in site.node.args[:3])
    mask = fake(site.mask) if site.mask is not None else None
    if any(t is None for t in (q, k, v)) or (site.mask is not None and mask is None):
        return "q, k, v or the mask has no FakeTensor value"
    if site.dropout:
        return f"dropout_p={site.dropout}"
    if site.enable_gqa:
        return "enable_gqa (grouped-query attention)"
    if not (q.dim() == k.dim() == v.dim() == 4):
        return f"q, k, v are {q.dim()}-D, {k.dim()}-D, {v.dim()}-D, not (batch, heads, seq, head_dim)"
    if not (q.dtype == k.dtype == v.dtype == torch.float32):
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}: the lowering is written for float32"
    if not isinstance(q.shape[1], int) or q.shape[1] != k.shape[1] or q.shape[1] != v.shape[1]:
        return f"head counts {q.shape[1]}, {k.shape[1]}, {v.shape[1]} are not one static number"
    if q.shape[-1] != k.shape[-1]:
        return "q and k head sizes differ"
    if mask is not None:
        if mask.dim() != 4 or mask.dtype not in (q.dtype, torch.bool):
            return f"a {mask.dim()}-D {mask.dtype} mask, not a 4-D additive or boolean one"
        if site.is_causal:
            return "both a mask and is_causal"
    return ""


def _match_site(node: fx.Node) -> Match | NoMatch:
    site = SDPASite(node, -1, module_path(node))  # its layer index is not needed here
    why = unfusable(site)
    if why:
        return NoMatch("unfusable", why)
    return Match(root=node, nodes=(node,), bindings={"site": site})


def _replace_site(graph: fx.Graph, m: Match) -> fx.Node:
    site: SDPASite = m.bindings["site"]
    q, k, v = site.node.args[:3]
    heads = fake(q).shape[1]
    if site.mask is None:
        return emit(graph, torch.ops.graphopt.fused_attention.default, (q, k, v, site.scale(), site.is_causal, heads))
    mask = additive_mask(graph, site.mask, fake(q).dtype)
    out = emit(graph, torch.ops.graphopt.fused_attention_biased.default, (q, k, v, mask, site.scale(), site.is_causal, heads))
    return zero_unattended(graph, out, site.mask, merged_heads=False)


FUSED_ATTENTION = RewriteRule("fused_attention", frozenset({SDPA}), _match_site, _replace_site)

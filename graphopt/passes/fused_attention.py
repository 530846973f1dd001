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
exporter's own form (the pass leaves the graph alone and says so).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.fx as fx
from pydantic import Field

import graphopt.attention  # noqa: F401  (registers the custom ops and their lowerings)
from graphopt.attention.analysis import SDPASite, sdpa_nodes
from graphopt.attention.packed import packed_attention_rule
from graphopt.passbase import Pass, PassConfig, PassResult, register_pass
from graphopt.surgery import remove_unused_tensors
from graphopt.program import Program
from graphopt.rewrite import apply_rules, emit, fake

# provider -> lowering, from the table above; "exporter" keeps torch.onnx's own form.
LOWERING_BY_PROVIDER: dict[str, str] = {"cpu": "multi_head_attention"}


class FusedAttentionConfig(PassConfig):
    provider: str = "cpu"
    pack_qkv: bool = Field(True, description="self-attention whose Q, K, V are fp32 linears of one tensor: one packed matmul")


@register_pass
class FusedAttention(Pass):
    """Lower scaled_dot_product_attention to ORT's fused attention kernel, packing Q/K/V projections where it can."""

    name: ClassVar[str] = "fused-attention"
    exact: ClassVar[bool] = True
    Config: ClassVar[type[PassConfig]] = FusedAttentionConfig
    requires_ir = ("aten",)

    def run(self, program: Program) -> PassResult:
        lowering = LOWERING_BY_PROVIDER.get(self.config.provider.lower(), "exporter")
        sites = sdpa_nodes(program)
        if lowering == "exporter":
            return PassResult(program, False, {"replaced": 0, "lowering": lowering, "skipped_nodes": [], "reason": f"no measured fused lowering for provider '{self.config.provider}'"})
        packed = 0
        if self.config.pack_qkv and sites:
            packed = apply_rules(program.module, [packed_attention_rule(program.module)], provenance=self.name).total
            sites = sdpa_nodes(program) if packed else sites
        replaced, skipped = packed, []
        for site in sites:
            why = unfusable(site)
            if why:
                skipped.append({"node": site.node.name, "module_path": site.module_path, "reason": why})
                continue
            _replace(program.graph, site, self.name)
            replaced += 1
        if replaced:
            program.graph.eliminate_dead_code()
            remove_unused_tensors(program.module)  # the separate Q/K/V weights, now packed
            program.graph.lint()
            program.module.recompile()
        return PassResult(program, replaced > 0, {"replaced": replaced, "packed_qkv": packed, "lowering": lowering, "skipped_nodes": skipped})


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
        if mask.dtype == torch.bool:
            return "boolean mask"
        if mask.dim() != 4 or mask.dtype != q.dtype:
            return f"a {mask.dim()}-D {mask.dtype} mask, not a 4-D additive one"
        if site.is_causal:
            return "both a mask and is_causal"
    return ""


def _replace(graph: fx.Graph, site: SDPASite, provenance: str) -> None:
    node = site.node
    q, k, v = node.args[:3]
    heads = fake(q).shape[1]
    with graph.inserting_before(node):
        if site.mask is None:
            new = emit(graph, torch.ops.graphopt.fused_attention.default, (q, k, v, site.scale(), site.is_causal, heads))
        else:
            new = emit(graph, torch.ops.graphopt.fused_attention_biased.default, (q, k, v, site.mask, site.scale(), site.is_causal, heads))
    new.meta.update({key: node.meta[key] for key in ("nn_module_stack", "graphopt_module_path", "stack_trace") if key in node.meta})
    new.meta["graphopt_created_by"] = f"{provenance}:{new.target.name()}"
    node.replace_all_uses_with(new)
    graph.erase_node(node)

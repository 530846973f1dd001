"""Int8 Q/K/V projections + SDPA -> one int8 GEMM + MultiHeadAttention (exact).

After ``sdpa`` and ``quantize{mode=dynamic}``, self-attention reads three
``linear_dynamic_int8`` projections of one tensor, their head splits, SDPA and the head
merge. :func:`graphopt.quant.attention.fused_attention_rule` makes that one
``graphopt::attention_int8`` node: in ONNX one ``DynamicQuantizeMatMul`` over the packed
``[H, 3H]`` weight and ORT's ``MultiHeadAttention``, instead of three integer GEMMs, six
reshapes/transposes and the attention. Static-int8 projections (``quantize{mode=static}``)
whose calibrated activation scale and zero point are equal, as they are for one input,
become ``graphopt::attention_static_int8``: one ``QuantizeLinear``, one
``MatMulIntegerToFloat`` and the same attention. It was part of the quantize pass; it is a pass of
its own so that a recipe orders it (``quantize,int8-attention?,fused-attention?,...``) and
its report is its own.

Exact: the activation's per-tensor scale and zero point depend on the activation alone, so
quantizing it once for the packed GEMM gives the codes each of the three projections
computed; every output column keeps its integer dot product, weight scale and bias, and the
attention reads the same Q, K, V. Measured: on a 2-layer tiny BERT and on MiniLM the fused
program's outputs equal the unfused ones bit for bit on the example and 16 seeded batches
of two shapes per dynamic axis (tests/test_quantize.py checks it).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from graphopt.context import PassContext
from graphopt.passbase import Pass, PassConfig, PassInfo, PassResult, register_pass
from graphopt.program import Program
from graphopt.quant.attention import SDPA, fused_attention_rule
from graphopt.rewrite import apply_rules


class Int8AttentionConfig(PassConfig):
    pass


class Int8AttentionInfo(PassInfo):
    fused: int = 0
    near_misses: list[dict[str, str]] = []  # SDPA nodes left alone: node, module_path, rule, check, reason


@register_pass
class Int8Attention(Pass):
    """Fuse int8 (dynamic or static) Q/K/V projections and SDPA into one int8 GEMM + MultiHeadAttention."""

    name: ClassVar[str] = "int8-attention"
    Config: ClassVar[type[PassConfig]] = Int8AttentionConfig
    Info: ClassVar[type[PassInfo]] = Int8AttentionInfo
    requires_ir = ("aten",)

    @classmethod
    def is_exact(cls, config: Int8AttentionConfig) -> bool:
        return True

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        graph = program.graph
        if not any(n.target is SDPA for n in graph.nodes):
            return PassResult.unchanged(program, Int8AttentionInfo(), "no scaled_dot_product_attention node (run the sdpa pass first)")
        projections = (torch.ops.graphopt.linear_dynamic_int8.default, torch.ops.graphopt.linear_static_int8.default)
        if not any(n.target in projections for n in graph.nodes):
            return PassResult.unchanged(program, Int8AttentionInfo(), "no int8 linear layer (run quantize{mode=dynamic} or {mode=static} first)")
        stats = apply_rules(program.module, [fused_attention_rule(program.module)], provenance=self.name)
        misses = [m.to_dict() for m in stats.near_misses]
        info = Int8AttentionInfo(fused=stats.total, near_misses=misses)
        reason = f"{len(misses)} attention nodes left alone; first: {misses[0]['check']}: {misses[0]['reason']}" if misses else "no attention to fuse"
        return PassResult.of(program, stats.total > 0, info, reason)

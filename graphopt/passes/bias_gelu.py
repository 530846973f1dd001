"""``gelu(linear(x, W, b))`` -> ``bias_gelu(linear(x, W), b)``: one ORT ``BiasGelu`` kernel (exact).

The exporter spells the erf GELU as Div, Erf, Add, Mul, Mul after the linear layer's bias
Add, in an order ORT's own GeluFusion does not recognise: six elementwise passes over the
FFN's widest activation. ``com.microsoft.BiasGelu`` does the bias add and the GELU in one.
Applies to fp32 ``aten.linear`` and to graphopt's quantized linear ops, so the recipes run
this pass after ``quantize``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import fx

import graphopt.quant  # noqa: F401  (graphopt::bias_gelu and the quantized linears; declares their lowerings)
from graphopt.context import PassContext
from graphopt.passbase import Pass, PassConfig, PassInfo, PassResult, register_pass
from graphopt.program import Program
from graphopt.rewrite import Match, NoMatch, RewriteRule, apply_rules, emit, only_user
from graphopt.surgery import add_constant, get_tensor

aten = torch.ops.aten


def bias_gelu_rule(gm: fx.GraphModule) -> RewriteRule:
    """gelu(linear(x, W, bias)) -> bias_gelu(linear(x, W, no bias), bias), for fp32 ``aten.linear``
    (the bias argument is dropped) and the quantized linear ops (their bias becomes zeros)."""
    ops = torch.ops.graphopt
    quantized = frozenset({ops.linear_dynamic_int8.default, ops.linear_static_int8.default, ops.linear_nbits.default})

    def match(node: fx.Node) -> Match | NoMatch:
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        if approximate != "none":
            return NoMatch("approximate", f"'{node.name}' is the {approximate} GELU; BiasGelu computes the erf form")
        source = node.args[0]
        if not isinstance(source, fx.Node) or (source.target not in quantized and source.target is not aten.linear.default):
            return NoMatch("producer", f"'{node.name}' does not follow a linear layer")
        user = only_user(source)
        if isinstance(user, NoMatch):
            return user
        index = [a.name for a in source.target._schema.arguments].index("bias")
        bias = source.args[index] if len(source.args) > index else None
        if not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
            return NoMatch("bias", f"'{source.name}' has no stored bias")
        value = get_tensor(gm, str(bias.target))
        if value.dim() != 1 or value.dtype != torch.float32:
            return NoMatch("bias", f"'{source.name}' bias is not a float32 vector")
        return Match(root=node, nodes=(node,), bindings={"linear": source, "index": index, "bias": bias})

    def replace(graph: fx.Graph, m: Match) -> fx.Node:
        linear, index, bias = m.bindings["linear"], m.bindings["index"], m.bindings["bias"]
        if linear.target is aten.linear.default:
            linear.args = linear.args[:index]
        else:  # the quantized ops' bias is not optional: zeros, stored once per linear
            with graph.inserting_before(linear):
                zeros = add_constant(gm, f"quant_{linear.name}_zero_bias", torch.zeros_like(get_tensor(gm, bias.target)))
            linear.update_arg(index, zeros)
        return emit(graph, ops.bias_gelu.default, (linear, bias))

    return RewriteRule("bias_gelu", frozenset({aten.gelu.default}), match, replace)


class BiasGeluConfig(PassConfig):
    pass


class BiasGeluInfo(PassInfo):
    fused: int = 0
    near_misses: list[dict[str, str]] = []  # GELUs left as they are, with the failing check (first 8)


@register_pass
class BiasGelu(Pass):
    """Fuse bias + erf GELU after a linear layer into one BiasGelu kernel."""

    name: ClassVar[str] = "bias-gelu"
    Config: ClassVar[type[PassConfig]] = BiasGeluConfig
    Info: ClassVar[type[PassInfo]] = BiasGeluInfo
    requires_ir = ("aten",)

    @classmethod
    def is_exact(cls, config: BiasGeluConfig) -> bool:
        return True

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        stats = apply_rules(program.module, [bias_gelu_rule(program.module)], provenance=self.name)
        misses = stats.near_misses
        info = BiasGeluInfo(fused=stats.total, near_misses=[m.to_dict() for m in misses[:8]])
        if not misses:
            reason = "no aten.gelu in the graph (a GELU spelled out in elementwise ops, like GPT-2's, is not matched)"
        else:
            reason = "no GELU follows a linear layer with a stored bias; near misses: " + "; ".join(f"{m.node}: {m.check}: {m.reason}" for m in misses[:3])
        return PassResult.of(program, stats.total > 0, info, reason)

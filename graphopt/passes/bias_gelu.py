"""``gelu(linear(x, W, b))`` -> ``bias_gelu(linear(x, W), b)``: one ORT ``BiasGelu`` kernel (exact).

The exporter spells the erf GELU as Div, Erf, Add, Mul, Mul after the linear layer's bias
Add, in an order ORT's own GeluFusion does not recognise: six elementwise passes over the
FFN's widest activation. ``com.microsoft.BiasGelu`` does the bias add and the GELU in one.
Applies to fp32 ``aten.linear`` and to graphopt's quantized linear ops (the quantize pass
runs the same rule after substituting them).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.fx as fx

from graphopt.passbase import Pass, PassConfig, PassResult, register_pass
from graphopt.surgery import remove_unused_tensors
from graphopt.program import Program
from graphopt.quant import ops as _quant_ops  # noqa: F401  (graphopt::bias_gelu and its lowering)
from graphopt.quant import lowering as _quant_lowering  # noqa: F401
from graphopt.quant.constants import constant_node
from graphopt.quant.sites import get_tensor
from graphopt.rewrite import Match, NoMatch, RewriteRule, apply_rules, emit, only_user

aten = torch.ops.aten


def bias_gelu_rule(gm: fx.GraphModule) -> RewriteRule:
    """gelu(linear(x, W, bias)) -> bias_gelu(linear(x, W, no bias), bias), for fp32 ``aten.linear``
    (the bias argument is dropped) and the quantized linear ops (their bias becomes zeros)."""
    graphopt = torch.ops.graphopt
    quantized = frozenset({graphopt.linear_dynamic_int8.default, graphopt.linear_static_int8.default, graphopt.linear_nbits.default})
    registered: dict[int, str] = {}

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
        value = get_tensor(gm, bias.target)
        if value.dim() != 1 or value.dtype != torch.float32:
            return NoMatch("bias", f"'{source.name}' bias is not a float32 vector")
        return Match(root=node, nodes=(node,), bindings={"linear": source, "index": index, "bias": bias})

    def replace(graph: fx.Graph, m: Match) -> fx.Node:
        linear, index, bias = m.bindings["linear"], m.bindings["index"], m.bindings["bias"]
        if linear.target is aten.linear.default:
            linear.args = linear.args[:index]
        else:
            with graph.inserting_before(linear):
                zeros = constant_node(graph, gm, linear.name, "zero_bias", torch.zeros_like(get_tensor(gm, bias.target)), registered)
            linear.update_arg(index, zeros)
        return emit(graph, graphopt.bias_gelu.default, (linear, bias))

    return RewriteRule("bias_gelu", frozenset({aten.gelu.default}), match, replace)


class BiasGeluConfig(PassConfig):
    pass


@register_pass
class BiasGelu(Pass):
    """Fuse bias + erf GELU after a linear layer into one BiasGelu kernel."""

    name: ClassVar[str] = "bias-gelu"
    exact: ClassVar[bool] = True
    Config: ClassVar[type[PassConfig]] = BiasGeluConfig
    requires_ir = ("aten",)

    def run(self, program: Program) -> PassResult:
        gm = program.module
        stats = apply_rules(gm, [bias_gelu_rule(gm)], provenance=self.name)
        fused = stats.total
        if fused:
            gm.graph.eliminate_dead_code()
            remove_unused_tensors(gm)
            gm.graph.lint()
            gm.recompile()
        return PassResult(program, fused > 0, {"fused": fused, "near_misses": [str(n) for n in stats.near_misses][:8]})

"""RMSNorm in the form ONNX Runtime fuses: ``x * rsqrt(mean(x^2) + eps)`` -> ``x / sqrt(...)`` (exact).

Llama, Qwen, Mistral and Phi-3 normalise with ``x * rsqrt(mean(x**2, -1) + eps) * w``. The
exporter writes ``rsqrt`` as Sqrt then Reciprocal, and ORT's SimplifiedLayerNormalization
fusion does not recognise that: the decoder then runs Pow, ReduceMean, Add, Sqrt, Reciprocal,
Mul and Mul per norm (a 24-layer decoder: 49 norms, about 340 small kernels per token at batch
1). Spelled as a division, ORT fuses each into one ``SimplifiedLayerNormalization`` kernel at
session creation. The two forms differ by rounding only (the manager checks the pass as exact).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import fx

from graphopt.context import PassContext
from graphopt.passbase import Pass, PassConfig, PassInfo, PassResult, register_pass
from graphopt.program import Program
from graphopt.rewrite import Match, NoMatch, RewriteRule, apply_rules, emit

aten = torch.ops.aten


def _through_casts(node: object) -> object:
    """``node`` past same-dtype ``to`` casts (HF's norms cast to float32 and back)."""
    while isinstance(node, fx.Node) and node.target in (aten.to.dtype, aten._to_copy.default):
        node = node.args[0]
    return node


def rms_norm_rule() -> RewriteRule:
    """mul(x, rsqrt(add(mean(pow(x, 2), [-1], keepdim), eps))) -> div(x, sqrt(add(...)))."""

    def match(node: fx.Node) -> Match | NoMatch:
        rsqrt = next((a for a in node.args[:2] if isinstance(a, fx.Node) and a.target is aten.rsqrt.default), None)
        if rsqrt is None:
            return NoMatch("rsqrt", f"'{node.name}' does not multiply by an rsqrt")
        x = node.args[1] if node.args[0] is rsqrt else node.args[0]
        total = rsqrt.args[0]
        if not (isinstance(total, fx.Node) and total.target is aten.add.Tensor and not isinstance(total.args[1], fx.Node)):
            return NoMatch("epsilon", f"'{rsqrt.name}' does not read mean + eps")
        mean = total.args[0]
        axes = mean.args[1] if isinstance(mean, fx.Node) and len(mean.args) > 1 else None
        if not (isinstance(mean, fx.Node) and mean.target is aten.mean.dim and isinstance(axes, (list, tuple)) and list(axes) == [-1]
                and len(mean.args) > 2 and mean.args[2]):
            return NoMatch("mean", f"'{total.name}' does not add eps to a mean over the last axis (keepdim)")
        square = mean.args[0]
        if not (isinstance(square, fx.Node) and square.target is aten.pow.Tensor_Scalar and square.args[1] == 2):
            return NoMatch("square", f"'{mean.name}' is not the mean of a square")
        if _through_casts(square.args[0]) is not _through_casts(x):
            return NoMatch("operand", f"'{node.name}' normalises another tensor than the one squared")
        if any(user is not node for user in rsqrt.users):
            return NoMatch("single_user", f"'{rsqrt.name}' has other users")
        return Match(root=node, nodes=(node, rsqrt), bindings={"x": x, "total": total})

    def replace(graph: fx.Graph, m: Match) -> fx.Node:
        root = emit(graph, aten.sqrt.default, (m.bindings["total"],))
        return emit(graph, aten.div.Tensor, (m.bindings["x"], root))

    return RewriteRule("rms_norm", frozenset({aten.mul.Tensor}), match, replace)


class RmsNormConfig(PassConfig):
    pass


class RmsNormInfo(PassInfo):
    rewritten: int = 0


@register_pass
class RmsNorm(Pass):
    """Spell RMSNorm as ORT's SimplifiedLayerNormalization fusion expects (x / sqrt, not x * rsqrt)."""

    name: ClassVar[str] = "rms-norm"
    Config: ClassVar[type[PassConfig]] = RmsNormConfig
    Info: ClassVar[type[PassInfo]] = RmsNormInfo
    requires_ir = ("aten",)

    @classmethod
    def is_exact(cls, config: RmsNormConfig) -> bool:
        return True

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        stats = apply_rules(program.module, [rms_norm_rule()], provenance=self.name)
        return PassResult.of(program, stats.total > 0, RmsNormInfo(rewritten=stats.total),
                             "no x * rsqrt(mean(x^2) + eps) in the graph (no RMSNorm, or one written another way)")

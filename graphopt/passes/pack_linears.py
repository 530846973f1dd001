"""Linears that read one input -> one wider linear and a split (exact).

A transformer layer projects one normalised activation three times for attention (Q, K, V)
and twice in a gated MLP (gate, up). As separate GEMMs, each is a kernel launch that streams
the same input; at decode (one token) the small K and V projections of a GQA model (two kv
heads: 128 of 896 columns) keep two threads busy for a few microseconds each. Packed, they
are one GEMM (one ``MatMulNBits`` after ``quantize``: its blocks run along the input axis of
each output column, so quantizing the packed weight gives the same codes as quantizing each
part) and one Split. By default it packs decoders only (``decoders_only``): an encoder's
Q/K/V are packed by ``fused-attention`` into its Attention kernel. Run it after pruning and sharing (they edit the separate projections)
and before ``quantize``.
"""

from __future__ import annotations

import operator
from typing import ClassVar

import torch
from torch import fx

from graphopt.context import PassContext
from graphopt.passbase import Pass, PassConfig, PassInfo, PassResult, register_pass
from graphopt.program import Program, module_path
from graphopt.rewrite import emit
from graphopt.surgery import add_parameter, get_tensor, stamp

aten = torch.ops.aten


class PackLinearsConfig(PassConfig):
    # An encoder's Q/K/V are packed by fused-attention into its Attention kernel, which needs
    # them separate until then: by default only decoders (capture_decoder) are packed.
    decoders_only: bool = True


class PackLinearsInfo(PassInfo):
    packed: int = 0  # wider linears made
    linears: int = 0  # linears they replace
    groups: list[dict[str, object]] = []


def _weights(node: fx.Node) -> tuple[fx.Node, fx.Node | None] | None:
    """``(weight, bias)`` get_attr nodes of a plain ``aten.linear``, else None."""
    if node.op != "call_function" or node.target is not aten.linear.default:
        return None
    weight = node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return None
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return None
    return weight, bias


@register_pass
class PackLinears(Pass):
    """Pack the linears that read one input (Q/K/V, gate/up) into one."""

    name: ClassVar[str] = "pack-linears"
    Config: ClassVar[type[PassConfig]] = PackLinearsConfig
    Info: ClassVar[type[PassInfo]] = PackLinearsInfo
    requires_ir = ("aten",)

    @classmethod
    def is_exact(cls, config: PackLinearsConfig) -> bool:
        return True

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        config = self.config
        assert isinstance(config, PackLinearsConfig)
        if config.decoders_only and "decoder" not in program.meta:
            return PassResult.of(program, False, PackLinearsInfo(), "not a decoder (capture_decoder); fused-attention packs an encoder's "
                                 "Q/K/V into its Attention kernel (decoders_only=false packs here anyway)")
        gm = program.module
        # (input, biased, dtype) -> the linears reading that input, with their weight and bias
        groups: dict[tuple[fx.Node, bool, torch.dtype], list[tuple[fx.Node, fx.Node, fx.Node | None]]] = {}
        for node in gm.graph.nodes:
            found = _weights(node)
            if found is not None:
                weight, bias = found
                groups.setdefault((node.args[0], bias is not None, get_tensor(gm, str(weight.target)).dtype), []).append((node, weight, bias))
        info = PackLinearsInfo()
        for linears in groups.values():
            if len(linears) < 2:
                continue
            self._pack(gm, linears)
            info.packed += 1
            info.linears += len(linears)
            if len(info.groups) < 16:
                info.groups.append({"layers": [module_path(n) or n.name for n, _, _ in linears]})
        return PassResult.of(program, info.packed > 0, info, "no two linears with constant weights read the same input")

    def _pack(self, gm: fx.GraphModule, linears: list[tuple[fx.Node, fx.Node, fx.Node | None]]) -> None:
        """One wider linear before the first of ``linears``, a split, a piece for each (the
        pass manager's clean-up erases the old linears and their tensors)."""
        graph = gm.graph
        first, first_weight, first_bias = linears[0]
        weights = [get_tensor(gm, str(w.target)) for _, w, _ in linears]
        created_by = f"{self.name}:pack"
        with graph.inserting_before(first):
            weight = stamp(add_parameter(gm, f"{first_weight.target}_packed", torch.cat(weights, dim=0)), created_by, first)
            args: tuple = (first.args[0], weight)
            if first_bias is not None:
                biases = [get_tensor(gm, str(b.target)) for _, _, b in linears if b is not None]
                args += (stamp(add_parameter(gm, f"{first_bias.target}_packed", torch.cat(biases, dim=0)), created_by, first),)
            wide = stamp(emit(graph, aten.linear.default, args), created_by, first)
            split = stamp(emit(graph, aten.split_with_sizes.default, (wide, [int(w.shape[0]) for w in weights], -1)), created_by, first)
            for index, (old, _, _) in enumerate(linears):
                old.replace_all_uses_with(stamp(emit(graph, operator.getitem, (split, index)), created_by, old))

"""Dead-code elimination: unused nodes, inference no-ops, and tensors nothing reads."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import fx

from graphopt.context import PassContext
from graphopt.passbase import Pass, PassConfig, PassInfo, PassResult, register_pass
from graphopt.program import Program
from graphopt.surgery import arg_float, arg_node, remove_unused_tensors

aten = torch.ops.aten


class DCEConfig(PassConfig):
    remove_identities: bool = True  # dropout in eval mode, alias, detach, dtype-preserving casts
    remove_unused_tensors: bool = True  # parameters / buffers no get_attr reads any more


class DCEInfo(PassInfo):
    identities_removed: int = 0
    dead_nodes_removed: int = 0
    tensors_removed: int = 0


def is_identity(node: fx.Node) -> bool:
    """Ops that return their input unchanged when the graph runs for inference."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    target, args, kwargs = node.target, node.args, node.kwargs
    if target is aten.dropout.default:
        train = args[2] if len(args) > 2 else kwargs.get("train", True)
        p = arg_float(node, 1, "p", default=0.5)
        return train is False or p == 0
    if target in (aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default):
        return True
    if target in (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default):
        source, result = arg_node(node, 0).meta.get("val"), node.meta.get("val")
        if not isinstance(source, torch.Tensor) or not isinstance(result, torch.Tensor):
            return False
        # A cast that keeps dtype, device and layout is an identity (copy semantics aside:
        # nothing in an inference graph writes through it, which the functional IR ensures).
        same = source.dtype == result.dtype and source.device == result.device and source.layout == result.layout
        memory_format = kwargs.get("memory_format")
        return same and memory_format in (None, torch.preserve_format)
    return False


@register_pass
class DeadCodeElimination(Pass):
    """Remove unused nodes, inference no-ops (eval dropout, alias/detach, same-dtype casts) and tensors no node reads."""

    name: ClassVar[str] = "dce"
    Config: ClassVar[type[PassConfig]] = DCEConfig
    Info: ClassVar[type[PassInfo]] = DCEInfo
    config: DCEConfig  # the validated options (narrowed from PassConfig for type checkers)

    @classmethod
    def is_exact(cls, config: DCEConfig) -> bool:
        return True

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        graph = program.module.graph
        identities = 0
        if self.config.remove_identities:
            for node in list(graph.nodes):
                if is_identity(node):
                    node.replace_all_uses_with(node.args[0])
                    graph.erase_node(node)
                    identities += 1
        nodes_before = len(graph.nodes)
        graph.eliminate_dead_code()
        dead = nodes_before - len(graph.nodes)
        removed = remove_unused_tensors(program.module) if self.config.remove_unused_tensors else []
        info = DCEInfo(identities_removed=identities, dead_nodes_removed=dead, tensors_removed=len(removed))
        return PassResult.of(program, bool(identities or dead or removed), info, "no dead nodes, inference no-ops or unread tensors")

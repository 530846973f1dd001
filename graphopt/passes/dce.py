"""Dead-code elimination: unused nodes, inference no-ops, and tensors nothing reads."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.fx as fx

from graphopt.passbase import Pass, PassConfig, PassResult, register_pass
from graphopt.program import Program

aten = torch.ops.aten


class DCEConfig(PassConfig):
    remove_identities: bool = True  # dropout in eval mode, alias, detach, dtype-preserving casts
    remove_unused_tensors: bool = True  # parameters / buffers no get_attr reads any more


def _is_identity(node: fx.Node) -> bool:
    """Ops that return their input unchanged when the graph runs for inference."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    target, args, kwargs = node.target, node.args, node.kwargs
    if target is aten.dropout.default:
        train = args[2] if len(args) > 2 else kwargs.get("train", True)
        p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
        return train is False or p == 0
    if target in (aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default):
        return True
    if target in (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default):
        source, result = args[0].meta.get("val"), node.meta.get("val")
        if not isinstance(source, torch.Tensor) or not isinstance(result, torch.Tensor):
            return False
        # A cast that keeps dtype, device and layout is an identity (copy semantics aside:
        # nothing in an inference graph writes through it, which the functional IR ensures).
        same = source.dtype == result.dtype and source.device == result.device and source.layout == result.layout
        memory_format = kwargs.get("memory_format")
        return same and memory_format in (None, torch.preserve_format)
    return False


def remove_unused_tensors(gm: fx.GraphModule) -> list[str]:
    """Delete parameters and buffers that no get_attr node refers to; return their names."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    removed = []
    names = [n for n, _ in gm.named_parameters(remove_duplicate=False)] + [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    for name in names:
        if name in used:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        if hasattr(owner, attr):
            delattr(owner, attr)
            removed.append(name)
    # get_attr may also point at plain tensor attributes (constants) that are now unused
    return removed


@register_pass
class DeadCodeElimination(Pass):
    """Remove nodes whose results nothing uses, ops that are identities in inference
    (dropout with train=False, alias/detach, same-dtype casts), and parameters or buffers
    no node reads. Exact."""

    name: ClassVar[str] = "dce"
    exact: ClassVar[bool] = True
    Config: ClassVar[type[PassConfig]] = DCEConfig

    def run(self, program: Program) -> PassResult:
        gm = program.module
        graph = gm.graph
        identities = 0
        if self.config.remove_identities:
            for node in list(graph.nodes):
                if _is_identity(node):
                    node.replace_all_uses_with(node.args[0])
                    graph.erase_node(node)
                    identities += 1
        nodes_before = len(graph.nodes)
        graph.eliminate_dead_code()
        dead = nodes_before - len(graph.nodes)
        removed_tensors = remove_unused_tensors(gm) if self.config.remove_unused_tensors else []
        modified = bool(identities or dead or removed_tensors)
        if modified:
            graph.lint()
            gm.recompile()
        return PassResult(program, modified, {"identities_removed": identities, "dead_nodes_removed": dead, "tensors_removed": len(removed_tensors)})

"""Training views of a Program: flat inputs in, outputs plus intermediate "taps" out.

Distillation needs the hidden state after every block of both the teacher and the
student. The blocks are found from provenance (``graphopt_module_path``), not from
per-architecture tables: a block is a module path ending in an index
(``encoder.layer.3``, ``h.0``, ``layers.11``, ``transformer.layer.2``), and its output is
the last node of the block whose value is used outside it.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx import _pytree as fx_pytree
from torch.fx.graph import CodeGen

from graphopt.program import Program

_BLOCK = re.compile(r"^(?P<stack>(?:.*\.)?(?:layer|layers|h|block|blocks))\.(?P<index>\d+)(?:\.|$)")


@dataclass(frozen=True)
class BlockOutput:
    stack: str  # e.g. "encoder.layer"
    index: int
    node: str  # node name in the graph


def block_outputs(program: Program) -> list[BlockOutput]:
    """The output node of each repeated block, in order (the largest stack only)."""
    nodes = list(program.graph.nodes)
    block_of: dict[fx.Node, tuple[str, int]] = {}
    for node in nodes:
        match = _BLOCK.match(node.meta.get("graphopt_module_path", "") or "")
        if match and node.op == "call_function":
            block_of[node] = (match["stack"], int(match["index"]))
    outputs: dict[tuple[str, int], fx.Node] = {}
    for node, block in block_of.items():
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or not val.is_floating_point() or val.dim() < 2:
            continue
        if any(block_of.get(user) != block for user in node.users):
            outputs[block] = node  # graph order: the last such node wins
    stacks: dict[str, list[BlockOutput]] = {}
    for (stack, index), node in outputs.items():
        stacks.setdefault(stack, []).append(BlockOutput(stack, index, node.name))
    if not stacks:
        return []
    biggest = max(stacks.values(), key=len)
    return sorted(biggest, key=lambda b: b.index)


class TappedModule(torch.nn.Module):
    """Runs a program's graph on flat inputs, returning (outputs, taps). Shares parameters."""

    def __init__(self, program: Program, taps: list[str]):
        super().__init__()
        source = program.module
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            graph = copy.deepcopy(source.graph)
        graph._codegen = CodeGen()  # flat inputs / flat outputs instead of pytree specs
        by_name = {n.name: n for n in graph.nodes}
        for node in [n for n in graph.nodes if n.op == "call_module"]:
            if not node.users:  # torch.export's input guards: not needed for training
                graph.erase_node(node)
        output = next(n for n in graph.nodes if n.op == "output")
        outs = output.args[0]
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        self.n_outputs = len(outs)
        output.args = (tuple(outs) + tuple(by_name[t] for t in taps),)
        graph.lint()
        self.graph_module = fx.GraphModule(source, graph)
        self.in_spec = getattr(source, "_in_spec", None)

    def flatten(self, args: tuple, kwargs: dict) -> list:
        if self.in_spec is None:
            return list(args) + list(kwargs.values())
        return fx_pytree.tree_flatten_spec((tuple(args), dict(kwargs)), self.in_spec)

    def forward(self, *flat_inputs):
        result = self.graph_module(*flat_inputs)
        result = tuple(result) if isinstance(result, (tuple, list)) else (result,)
        return result[: self.n_outputs], result[self.n_outputs :]


def layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Teacher block for each student block: evenly spread, last maps to last."""
    if n_student == 0 or n_teacher == 0:
        return []
    return [max(0, round((j + 1) * n_teacher / n_student) - 1) for j in range(n_student)]

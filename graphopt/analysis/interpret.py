"""Running a program node by node while watching or replacing chosen nodes.

:class:`NodeInterpreter` runs a GraphModule, handing the input activation of chosen nodes
to observers (static quantization's activation ranges, GPTQ's and clustering's input
second moments) or computing chosen nodes another way (one layer quantized at a time, for
sensitivity). :func:`run_calibration` runs it over input batches, such as those
``PassContext.calibration_batches`` returns.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from graphopt.context import Batch
from graphopt.errors import ConfigError
from graphopt.program import flatten_outputs


class NodeInterpreter(fx.Interpreter):
    """Runs a GraphModule; ``observe`` sees the activation input of chosen nodes, ``override``
    computes chosen nodes instead of their own op (given the node and its evaluated args)."""

    def __init__(
        self,
        gm: fx.GraphModule,
        observe: Mapping[str, Callable[[torch.Tensor], None]] | None = None,
        override: Mapping[str, Callable[..., torch.Tensor]] | None = None,
        keep_values: bool = False,
    ):
        super().__init__(gm, garbage_collect_values=not keep_values)
        self.observe = dict(observe or {})
        self.override = dict(override or {})

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.observe or n.name in self.override:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            if n.name in self.observe:
                self.observe[n.name](activation_of(n, args))
            if n.name in self.override:
                return self.override[n.name](n, args, kwargs)
        return super().run_node(n)


def activation_of(node: fx.Node, args: tuple) -> torch.Tensor:
    """The activation a linear node multiplies: addmm(bias, x, W) takes it second;
    linear / mm / matmul take it first."""
    return args[1] if node.target is torch.ops.aten.addmm.default else args[0]


def run_calibration(gm: fx.GraphModule, batches: Sequence[Batch], **interpreter_options: Any) -> list[tuple[torch.Tensor, ...]]:
    """Flattened outputs per batch, with the given observers / overrides active."""
    return [run_batch(gm, args, kwargs, **interpreter_options)[0] for args, kwargs in batches]


def run_batch(
    gm: fx.GraphModule, args: tuple, kwargs: dict, *, initial_values: dict | None = None, keep_values: bool = False, **interpreter_options: Any
) -> tuple[tuple[torch.Tensor, ...], dict]:
    """(flattened outputs, every node's value when ``keep_values``) for one batch. Nodes in
    ``initial_values`` are not recomputed: a run that changes one layer reuses the rest."""
    interpreter = NodeInterpreter(gm, keep_values=keep_values, **interpreter_options)
    with torch.no_grad():
        out = interpreter.run(*_placeholder_values(gm, args, kwargs), initial_env=dict(initial_values or {}))
    return flatten_outputs(out), (interpreter.env if keep_values else {})


def _placeholder_values(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[Any]:
    # The Interpreter takes one value per placeholder. torch.export's module packs its
    # forward arguments into a pytree whose leaves follow the forward signature's order.
    try:
        bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"a calibration batch does not fit the program's inputs: {exc}") from None
    return pytree.arg_tree_leaves(*bound.arguments.values())

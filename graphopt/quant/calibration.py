"""Calibration data, and running a program while watching or replacing chosen nodes.

:class:`CalibrationSet` is an ordered list of input batches, built from strings with a
tokenizer or from tensors; the same data gives the same batches every time.
:class:`NodeInterpreter` runs a GraphModule node by node, recording the input of chosen
linear nodes (activation ranges for static quantization) or computing chosen nodes
another way (one layer quantized at a time, for sensitivity).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from graphopt.errors import ConfigError
from graphopt.program import Program, flatten_outputs


@dataclass(frozen=True)
class CalibrationSet:
    """Input batches as (args, kwargs) pairs, in a fixed order."""

    batches: tuple[tuple[tuple, dict], ...]
    source: str = "tensors"

    def __post_init__(self):
        if not self.batches:
            raise ConfigError("the calibration set is empty: give at least one batch of inputs (or one sentence)")

    def __len__(self) -> int:
        return len(self.batches)

    @classmethod
    def from_tensors(cls, batches: Iterable[Mapping[str, torch.Tensor] | tuple], source: str = "tensors") -> CalibrationSet:
        """From keyword dicts (``{"input_ids": ...}``), argument tuples or (args, kwargs) pairs."""
        items = []
        for batch in batches:
            if isinstance(batch, Mapping):
                items.append(((), dict(batch)))
            elif isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[1], Mapping) and isinstance(batch[0], (tuple, list)):
                items.append((tuple(batch[0]), dict(batch[1])))
            elif isinstance(batch, (tuple, list)):
                items.append((tuple(batch), {}))
            elif isinstance(batch, torch.Tensor):
                items.append(((batch,), {}))
            else:
                raise ConfigError(f"a calibration batch is a dict of tensors, a tuple of tensors or (args, kwargs), got {type(batch).__name__}")
        return cls(tuple(items), source)

    @classmethod
    def from_sentences(
        cls,
        tokenizer: Any,
        sentences: Sequence[str],
        *,
        batch_size: int = 16,
        max_length: int = 128,
        input_names: Sequence[str] | None = None,
    ) -> CalibrationSet:
        """Tokenized ``sentences`` in batches of ``batch_size``, padded to each batch's longest.

        ``input_names`` keeps only those tensors (e.g. a program captured without
        ``token_type_ids``). Calibrate on training text only (``graphopt.data.train_sentences``).
        """
        from graphopt.data import batches

        if isinstance(sentences, str):
            sentences = [sentences]
        if not sentences:
            raise ConfigError("the calibration set is empty: no sentences given")
        items = []
        for batch in batches(tokenizer, list(sentences), batch_size=batch_size, max_length=max_length):
            kept = batch if input_names is None else {name: batch[name] for name in input_names}
            items.append(((), dict(kept)))
        return cls(tuple(items), f"{len(sentences)} sentences")

    @classmethod
    def from_program(cls, program: Program) -> CalibrationSet:
        """``program.meta["calibration"]`` (a list of (args, kwargs) batches: the build step puts
        training sentences there for text models), else the program's own example inputs as one
        batch (a fallback; real data calibrates better)."""
        batches = program.meta.get("calibration")
        if batches:
            found = cls.from_tensors(list(batches), source="program.meta['calibration']")
            return cls(found.batches, f"{len(found)} batches from program.meta['calibration']")
        return cls(((tuple(program.args), dict(program.kwargs)),), "example inputs")


class NodeInterpreter(fx.Interpreter):
    """Runs a GraphModule; ``observe`` sees the first input of chosen nodes, ``override``
    computes chosen nodes instead of their own op (given the node's evaluated args)."""

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
                self.observe[n.name](_activation(n, args))
            if n.name in self.override:
                return self.override[n.name](n, args, kwargs)
        return super().run_node(n)


def _activation(node: fx.Node, args: tuple) -> torch.Tensor:
    # addmm(bias, x, W) takes the activation second; linear / mm / matmul take it first.
    return args[1] if node.target is torch.ops.aten.addmm.default else args[0]


def activation_of(node: fx.Node, args: tuple) -> torch.Tensor:
    return _activation(node, args)


def run_calibration(gm: fx.GraphModule, data: CalibrationSet, **interpreter_options) -> list[tuple[torch.Tensor, ...]]:
    """Flattened outputs per batch, with the given observers / overrides active."""
    return [run_batch(gm, args, kwargs, **interpreter_options)[0] for args, kwargs in data.batches]


def run_batch(
    gm: fx.GraphModule, args: tuple, kwargs: dict, *, initial_values: dict | None = None, keep_values: bool = False, **interpreter_options
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
    import inspect

    from torch.utils import _pytree as pytree

    try:
        bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"a calibration batch does not fit the program's inputs: {exc}") from None
    return pytree.arg_tree_leaves(*bound.arguments.values())


@dataclass
class ActivationRange:
    """Running min / max of a node's input over the calibration batches, and a histogram sample."""

    low: float = float("inf")
    high: float = float("-inf")
    channel_absmax: torch.Tensor | None = None
    samples: list[torch.Tensor] = field(default_factory=list)

    def update(self, x: torch.Tensor, keep_samples: bool = False) -> None:
        x = x.detach().float()
        self.low = min(self.low, float(x.min()))
        self.high = max(self.high, float(x.max()))
        per_channel = x.reshape(-1, x.shape[-1]).abs().amax(dim=0)
        self.channel_absmax = per_channel if self.channel_absmax is None else torch.maximum(self.channel_absmax, per_channel)
        if keep_samples:
            flat = x.reshape(-1)
            step = max(1, flat.numel() // 65536)
            self.samples.append(flat[::step].clone())

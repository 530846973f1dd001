"""A program's inputs by name, its dynamic axes, and seeded random inputs over them.

Shared by verification (models without a tokenizer are verified on seeded random inputs
over their declared dynamic shapes), distillation of such models, and ORT parity, which
all need inputs "like the example's, at other sizes".
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from graphopt.errors import ConfigError
from graphopt.program import Program


def positional_names(program: Program) -> list[str]:
    """Names of the program's positional arguments (``arg<i>`` where the signature has none)."""
    try:
        params = [p.name for p in inspect.signature(program.module.forward).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return [params[i] if i < len(params) else f"arg{i}" for i in range(len(program.args))]


def named_inputs(program: Program, args: tuple | None = None, kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``args`` and ``kwargs`` (default: the example's) as one mapping from input name to value."""
    args = program.args if args is None else args
    kwargs = program.kwargs if kwargs is None else kwargs
    names = positional_names(program)
    names += [f"arg{i}" for i in range(len(names), len(args))]
    named = dict(zip(names, args))
    named.update(kwargs)
    return named


def input_names(program: Program) -> list[str]:
    """Names of the program's tensor inputs in call order: positional names, then kwargs."""
    return [name for name, value in named_inputs(program).items() if isinstance(value, torch.Tensor)]


def onnx_input_names(program: Program) -> list[str]:
    """The ONNX model's input names: :func:`input_names`, renamed where the program says
    (a decoder's ``past_key_values.N.key`` cannot be a Python parameter name)."""
    renamed = program.meta.get("onnx_input_names") or {}
    return [renamed.get(name, name) for name in input_names(program)]


def onnx_feed_names(program: Program, named: Mapping[str, Any]) -> dict[str, Any]:
    """``named`` (program input name -> value) keyed by the ONNX model's input names."""
    renamed = program.meta.get("onnx_input_names") or {}
    return {renamed.get(name, name): value for name, value in named.items()}


def split_inputs(program: Program, inputs: Mapping[str, Any] | tuple) -> tuple[tuple, dict]:
    """An input set given by name (or as (args, kwargs)) -> (args, kwargs) for the program."""
    if isinstance(inputs, tuple):
        if len(inputs) != 2:
            raise ConfigError("an input set given as a tuple must be (args, kwargs)")
        return tuple(inputs[0]), dict(inputs[1])
    positional = positional_names(program)
    missing = [name for name in positional if name not in inputs]
    if missing:
        raise ConfigError(f"input set lacks positional inputs {missing}")
    return tuple(inputs[name] for name in positional), {name: value for name, value in inputs.items() if name not in positional}


# ---- dynamic axes --------------------------------------------------------------------------
def axis_name(input_name: str, axis: int, dim: Any) -> str:
    """The name of a dynamic axis: a named Dim's name, else batch / seq / <input>_dim<k>."""
    if isinstance(dim, torch.export.Dim):
        return dim.__name__
    if isinstance(dim, str):
        return dim
    return {0: "batch", 1: "seq"}.get(axis, f"{input_name}_dim{axis}")


def dynamic_axes_by_input(program: Program) -> dict[str, dict[int, Any]]:
    """``program.dynamic_shapes`` as {input name: {axis: Dim or hint}}, static axes left out."""
    spec = program.dynamic_shapes
    if spec is None:
        return {}
    pairs = list(spec.items()) if isinstance(spec, Mapping) else list(zip(list(named_inputs(program)), spec))
    result: dict[str, dict[int, Any]] = {}
    for name, axes in pairs:
        if isinstance(axes, Mapping):
            items = list(axes.items())
        elif isinstance(axes, (list, tuple)):
            items = list(enumerate(axes))
        else:
            continue
        dynamic = {int(a): d for a, d in items if d is not None and not isinstance(d, int) and isinstance(a, int)}
        if dynamic:
            result[name] = dynamic
    return result


def dynamic_axis_names(program: Program) -> dict[str, dict[int, str]]:
    named = program.meta.get("onnx_axis_names")  # a decoder's (Optimum's) axis names
    if named:
        return {name: dict(axes) for name, axes in named.items()}
    return {name: {axis: axis_name(name, axis, dim) for axis, dim in axes.items()} for name, axes in dynamic_axes_by_input(program).items()}


# ---- random inputs -------------------------------------------------------------------------
def random_inputs(program: Program, sizes: Mapping[str, int], generator: torch.Generator) -> tuple[tuple, dict]:
    """Inputs like the example's, with each dynamic axis named in ``sizes`` resized.

    Token ids stay within the example's range, ``position_ids`` count up, attention masks
    get right padding (at least one real token per row), floats follow the example's mean
    and spread.
    """
    axes = dynamic_axis_names(program)
    bounds = program.analysis("inputs.index_bounds", index_bounds)
    named: dict[str, Any] = {}
    for name, value in named_inputs(program).items():
        if not isinstance(value, torch.Tensor):
            named[name] = value
            continue
        shape = list(value.shape)
        for axis, axis_label in axes.get(name, {}).items():
            if axis_label in sizes:
                shape[axis] = int(sizes[axis_label])
        named[name] = _random_like(name, value, shape, generator, bounds.get(name))
    return split_inputs(program, named)


_VIEWS = frozenset({torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten.unsqueeze.default,
                    torch.ops.aten.expand.default, torch.ops.aten.slice.Tensor, torch.ops.aten.flatten.using_ints})


def index_bounds(program: Program) -> dict[str, int]:
    """Integer inputs that index an embedding table (directly or through views): the number of
    rows they may address, so random ids cover the whole table and not only the example's ids
    (a pass that broke the rows the example does not use would otherwise go unseen)."""
    bounds: dict[str, int] = {}
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.embedding.default:
            continue
        table, index = node.args[0], node.args[1]
        for _ in range(6):
            if not isinstance(index, torch.fx.Node) or index.op == "placeholder" or index.target not in _VIEWS:
                break
            index = index.args[0]
        if isinstance(index, torch.fx.Node) and index.op == "placeholder" and isinstance(table, torch.fx.Node):
            rows = table.meta.get("val")
            if rows is not None and isinstance(rows.shape[0], int):
                bounds[str(index.target)] = min(bounds.get(str(index.target), rows.shape[0]), int(rows.shape[0]))
    return bounds


def random_batches(program: Program, count: int, *, seed: int, shapes: tuple[Mapping[str, int], ...] | None = None) -> list[tuple[tuple, dict]]:
    """``count`` seeded random batches over the program's declared dynamic axes, cycling
    through ``shapes`` (default: two sizes for every dynamic axis, so a rewrite that is only
    right at the traced shape shows)."""
    axes = sorted({label for labels in dynamic_axis_names(program).values() for label in labels.values()})
    if shapes is None:
        small = {label: (1 if label == "batch" else 7) for label in axes}
        large = {label: (3 if label == "batch" else 19) for label in axes}
        shapes = (small, large)
    generator = torch.Generator().manual_seed(seed)
    return [random_inputs(program, shapes[i % len(shapes)], generator) for i in range(count)]


def _random_like(name: str, example: torch.Tensor, shape: list[int], generator: torch.Generator, rows: int | None = None) -> torch.Tensor:
    lowered = name.lower()
    if "mask" in lowered and len(shape) == 2 and _is_binary(example):
        return _padding_mask(shape, generator).to(example.dtype)
    if example.dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    if example.is_floating_point():
        mean, std = 0.0, 1.0
        if example.numel() > 1:
            mean, std = example.float().mean().item(), example.float().std().item()
            std = std if np.isfinite(std) and std > 0 else 1.0
        return (torch.randn(shape, generator=generator) * std + mean).to(example.dtype)
    if lowered == "position_ids" and len(shape) == 2:
        return torch.arange(shape[1]).expand(shape).to(example.dtype).contiguous()
    low = int(example.min()) if example.numel() else 0
    high = int(example.max()) if example.numel() else 1
    if rows is not None:
        low, high = 0, rows - 1
    return torch.randint(low, high + 1, shape, generator=generator).to(example.dtype)


def _is_binary(t: torch.Tensor) -> bool:
    return t.dtype == torch.bool or bool(((t == 0) | (t == 1)).all())


def _padding_mask(shape: list[int], generator: torch.Generator) -> torch.Tensor:
    batch, seq = shape
    mask = torch.zeros(shape, dtype=torch.int64)
    for row in range(batch):
        # keep one full row so the longest sequence is exercised
        full = seq <= 1 or (row == 0 and batch > 1)
        length = seq if full else int(torch.randint(1, seq, (1,), generator=generator))
        mask[row, :length] = 1
    return mask


# ---- padding patterns -------------------------------------------------------------------
PADDED_SIZES = {"batch": 3, "seq": 19}


def padded_inputs(program: Program, seed: int = 0) -> tuple[str, tuple, dict] | None:
    """A random set whose padding masks have, row by row: no padding; left padding (only the
    last quarter real: the padded query rows of a causal model see no key); right padding
    after one real token (a padding run longer than a sliding window, whose rows then see no
    key either). None when the program takes no 2-D 0/1 mask named ``*mask*``."""
    named = named_inputs(program)
    masks = [n for n, v in named.items() if isinstance(v, torch.Tensor) and "mask" in n.lower() and v.dim() == 2 and _binary(v)]
    if not masks:
        return None
    declared = {label for axes in dynamic_axis_names(program).values() for label in axes.values()}
    sizes = {k: v for k, v in PADDED_SIZES.items() if k in declared}
    args, kwargs = random_inputs(program, sizes, torch.Generator().manual_seed(seed + 1000))
    named = named_inputs(program, args, kwargs)
    for name in masks:
        named[name] = _padding_patterns(tuple(named[name].shape)).to(named[name].dtype)
    label = "padded[" + ",".join(f"{k}={v}" for k, v in sizes.items()) + ",left+long]"
    return (label, *split_inputs(program, named))


def _padding_patterns(shape: tuple[int, int]) -> torch.Tensor:
    batch, seq = shape
    mask = torch.ones(shape, dtype=torch.int64)
    patterns = ("left", "right") if batch < 3 else ("full", "left", "right")
    for row in range(batch):
        kind = patterns[row % len(patterns)]
        if kind == "left":
            mask[row, : seq - max(1, seq // 4)] = 0
        elif kind == "right":
            mask[row, 1:] = 0
    return mask


def _binary(t: torch.Tensor) -> bool:
    return t.dtype == torch.bool or bool(((t == 0) | (t == 1)).all())

"""Applying a prune plan: slice every weight, rewrite every shape constant, re-propagate shapes.

Every space whose kept indices change (a group's own space or one derived from it by a
product or concat relation) is sliced in every weight dimension that belongs to it; every
integer site the channel analysis recorded for it (view / reshape / expand sizes, split
sizes, layer-norm shapes, sizes of created tensors) is set to the new width; splits become
``split_with_sizes``. The graph's FakeTensors are then recomputed so later passes and the
exporter see the new shapes. A graph input whose dim belongs to a cut space (a decoder's
past keys and values, whose kv heads follow the weights) is resized too: its FakeTensor
and the program's example input. The pass's caller (:meth:`graphopt.passbase.Pass.__call__`)
lints and recompiles the module afterwards; call :func:`graphopt.surgery.cleanup` when
using :func:`apply_plan` alone.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from graphopt.analysis.groups import DependencyAnalysis
from graphopt.program import Program
from graphopt.pruning.plan import Keep
from graphopt.surgery import get_tensor, set_tensor

aten = torch.ops.aten


def apply_plan(program: Program, analysis: DependencyAnalysis, keep: Keep) -> None:
    """Slice every weight and rewrite every shape constant so that group ``g`` keeps ``keep[g]``."""
    changed = changed_spaces(analysis, keep)
    _slice_tensors(program.module, analysis, changed)
    _rewrite_sites(program.module, analysis, changed)
    _resize_inputs(program, analysis, changed)
    _propagate_shapes(program.module)


def input_cuts(program: Program, analysis: DependencyAnalysis, changed: dict[int, torch.Tensor]) -> dict[str, dict[int, torch.Tensor]]:
    """For every graph input that ``changed`` resizes, the kept indices of each dim it cuts."""
    cuts: dict[str, dict[int, torch.Tensor]] = {}
    for node in program.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and isinstance(val, torch.Tensor):
            dims = {d: changed[sid] for d in range(val.dim()) if (sid := analysis.graph.slot_space.get((node.name, 0, d))) in changed}
            if dims:
                cuts[node.name] = dims
    return cuts


def _resize_inputs(program: Program, analysis: DependencyAnalysis, changed: dict[int, torch.Tensor]) -> None:
    kwargs = dict(program.kwargs)
    nodes = {n.name: n for n in program.graph.nodes}
    for name, dims in input_cuts(program, analysis, changed).items():
        if name not in kwargs:
            raise ValueError(f"input '{name}' loses channels but is not one of the program's keyword example inputs")
        val, example = nodes[name].meta["val"], kwargs[name]
        shape = list(val.shape)
        for d, kept in dims.items():
            shape[d] = int(kept.numel())
            example = example.index_select(d, kept)
        kwargs[name] = example.contiguous()
        if isinstance(val, torch._subclasses.FakeTensor):
            with val.fake_mode:
                nodes[name].meta["val"] = val.new_empty(shape)
    program.kwargs = kwargs


def changed_spaces(analysis: DependencyAnalysis, keep: Keep) -> dict[int, torch.Tensor]:
    """Kept indices of every space that loses some of its indices under ``keep``."""
    changed: dict[int, torch.Tensor] = {}
    for sid, coords in analysis.coords.items():
        if set(coords) & set(keep):
            kept = analysis.kept_indices(sid, keep)
            if kept.numel() < next(iter(coords.values())).numel():
                changed[sid] = kept
    return changed


def _slice_tensors(gm: fx.GraphModule, analysis: DependencyAnalysis, changed: dict[int, torch.Tensor]) -> None:
    sliced: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in sliced:
            continue
        sliced.add(node.target)
        tensor = get_tensor(gm, node.target)
        if not isinstance(tensor, torch.Tensor):
            continue
        new = tensor.detach()
        for d in range(tensor.dim()):
            sid = analysis.graph.slot_space.get((f"attr:{node.target}", 0, d))
            if sid in changed:
                new = new.index_select(d, changed[sid])
        if new is not tensor.detach():
            set_tensor(gm, node.target, new.contiguous())


def _rewrite_sites(gm: fx.GraphModule, analysis: DependencyAnalysis, changed: dict[int, torch.Tensor]) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    split_sizes: dict[str, dict[int, int]] = {}
    for sid, kept in changed.items():
        for node_name, arg_index, position in analysis.graph.spaces[sid].sites:
            node = nodes[node_name]
            if isinstance(position, tuple):  # ("split", part)
                split_sizes.setdefault(node_name, {})[position[1]] = int(kept.numel())
                continue
            args = list(node.args)
            if position is None:
                args[arg_index] = int(kept.numel())
            elif isinstance(position, int):
                values = list(args[arg_index])
                values[position] = int(kept.numel())
                args[arg_index] = values
            else:
                raise TypeError(f"site position {position!r} of {node_name} is neither None, a split part nor a list index")
            node.args = tuple(args)
    for node_name, new_sizes in split_sizes.items():
        node = nodes[node_name]
        dim = node.args[2] if len(node.args) > 2 else 0
        sizes = [int(v.shape[dim]) for v in node.meta["val"]]
        for part, size in new_sizes.items():
            sizes[part] = size
        node.target = aten.split_with_sizes.default
        node.args = (node.args[0], sizes, dim)


def _propagate_shapes(gm: fx.GraphModule) -> None:
    """Recompute every node's FakeTensor (``meta['val']``) with the new weight shapes."""
    inputs = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    fake = next((v for v in inputs if isinstance(v, torch._subclasses.FakeTensor)), None)
    if fake is None:
        return
    mode = fake.fake_mode
    allowed = mode.allow_non_fake_inputs
    mode.allow_non_fake_inputs = True
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)
    finally:
        mode.allow_non_fake_inputs = allowed

"""Graph surgery, owned once: tensors by name, new constants, node replacement with
provenance, and the clean-up every changed program gets.

Passes read and write a program's tensors and nodes only through these functions (and
rewrite rules, :mod:`graphopt.rewrite`, which use them), so that shared weights stay shared,
parameters stay parameters, every created node says which pass made it and from which
module it came, and the clean-up after a change is the same for every pass.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.fx.node import Argument

# Node metadata a replacement inherits from the node it replaces: where it came from in the
# model, so reports, near-miss lists and the exporter's metadata keep pointing at the source.
PROVENANCE_META = ("nn_module_stack", "graphopt_module_path", "stack_trace", "source_fn_stack")
CREATED_BY = "graphopt_created_by"


# ---- tensors -------------------------------------------------------------------------------
def get_tensor(gm: torch.nn.Module, name: str) -> Any:
    """The attribute at dotted path ``name`` (a parameter, buffer or plain tensor attribute).

    Raises ``AttributeError`` naming the path when it does not exist."""
    value: Any = gm
    for part in name.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise AttributeError(f"the program has no tensor '{name}' (no attribute '{part}')") from None
    return value


def has_tensor(gm: torch.nn.Module, name: str) -> bool:
    try:
        get_tensor(gm, name)
    except AttributeError:
        return False
    return True


def set_tensor(gm: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Store ``value`` at ``name``, keeping what the old attribute was: a parameter (with its
    ``requires_grad``), a buffer, or a plain attribute. A new name becomes a buffer."""
    owner_path, _, attr = name.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    old = getattr(owner, attr, None)
    if attr in owner._parameters or isinstance(old, torch.nn.Parameter):
        requires_grad = old.requires_grad if isinstance(old, torch.Tensor) else False
        owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=requires_grad and value.is_floating_point())
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    elif old is None:
        owner.register_buffer(attr, value)
    else:
        setattr(owner, attr, value)


def free_attr_name(gm: torch.nn.Module, base: str) -> str:
    """``base`` made a valid name, or with ``_1``, ``_2``, ...: the first that is not taken."""
    base = re.sub(r"[^0-9A-Za-z_]", "_", base)
    name, suffix = base, 1
    while hasattr(gm, name):
        name, suffix = f"{base}_{suffix}", suffix + 1
    return name


def remove_unused_tensors(gm: fx.GraphModule) -> list[str]:
    """Delete parameters and buffers that no ``get_attr`` node reads; return their names."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    names = [n for n, _ in gm.named_parameters(remove_duplicate=False)] + [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    removed = []
    for name in names:
        if name in used:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        if hasattr(owner, attr):
            delattr(owner, attr)
            removed.append(name)
    return removed


def tensor_readers(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Every ``get_attr`` node, by the tensor name it reads."""
    readers: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            readers.setdefault(str(node.target), []).append(node)
    return readers


# ---- nodes ---------------------------------------------------------------------------------
def fake_mode(graph: fx.Graph) -> Any:
    """The FakeTensorMode of the graph's ``meta['val']`` values, or None."""
    for node in graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch._subclasses.FakeTensor):
            return val.fake_mode
    return None


def add_constant(gm: fx.GraphModule, base_name: str, tensor: torch.Tensor, *, registered: dict[int, str] | None = None) -> fx.Node:
    """Register ``tensor`` as a buffer and return a ``get_attr`` node reading it (at the
    graph's insertion point), with its FakeTensor in ``meta['val']``.

    ``registered`` (id of tensor -> buffer name) lets a caller store a tensor that several
    nodes read once: the second call reads the first buffer."""
    name = registered.get(id(tensor)) if registered is not None else None
    if name is None:
        name = free_attr_name(gm, base_name)
        gm.register_buffer(name, tensor)
        if registered is not None:
            registered[id(tensor)] = name
    node = gm.graph.get_attr(name)
    mode = fake_mode(gm.graph)
    if mode is not None:
        node.meta["val"] = mode.from_tensor(tensor, static_shapes=True)
    return node


def add_parameter(gm: fx.GraphModule, base_name: str, tensor: torch.Tensor) -> fx.Node:
    """Register ``tensor`` as a trainable parameter (requires_grad off until a training stage
    turns it on) and return a ``get_attr`` node reading it, with its FakeTensor in
    ``meta['val']``. Distillation trains every floating-point parameter of the program."""
    name = free_attr_name(gm, base_name)
    gm.register_parameter(name, torch.nn.Parameter(tensor.detach().clone(), requires_grad=False))
    node = gm.graph.get_attr(name)
    mode = fake_mode(gm.graph)
    if mode is not None:
        node.meta["val"] = mode.from_tensor(getattr(gm, name).data, static_shapes=True)
    return node


def stamp(created: fx.Node, created_by: str, source: fx.Node | None = None) -> fx.Node:
    """Mark ``created`` as made by ``created_by`` (``"pass:rule"``) and give it ``source``'s
    module provenance."""
    created.meta[CREATED_BY] = created_by
    if source is not None:
        for key in PROVENANCE_META:
            if key in source.meta:
                created.meta.setdefault(key, source.meta[key])
    return created


def replace_node(old: fx.Node, new: fx.Node, created_by: str) -> fx.Node:
    """Route every use of ``old`` to ``new``, stamp ``new``'s provenance, erase ``old``."""
    stamp(new, created_by, old)
    old.replace_all_uses_with(new)
    old.graph.erase_node(old)
    return new


# ---- typed node arguments ------------------------------------------------------------------
# torch.fx types every ``node.args[i]`` as ``Argument`` (any value a graph can hold). A rule
# that knows what an argument of an op must be reads it through these: each checks the type
# at run time and raises a TypeError naming the node and its target when the graph is not
# what the rule expects (a ValueError when the argument is missing), instead of the rule
# going on with a wrong value. ``name`` is the keyword the argument may be given as instead.
def describe_node(node: fx.Node) -> str:
    """``node 'name' (target)``, for error messages."""
    target = node.target
    if isinstance(target, str):
        shown = target
    elif isinstance(target, torch._ops.OpOverload):
        shown = str(target)  # aten.view.default
    else:
        shown = getattr(target, "__name__", repr(target))
    return f"node '{node.name}' ({shown})"


def _shown(value: object) -> str:
    if isinstance(value, fx.Node):
        return f"node '{value.name}'"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 80 else text[:77] + '...'}"


def _wrong_type(node: fx.Node, what: str, value: object, expected: str) -> TypeError:
    return TypeError(f"{describe_node(node)}: {what} is {_shown(value)}, expected {expected}")


def _what(i: int, name: str | None) -> str:
    return f"argument {i}" + (f" ('{name}')" if name else "")


def _has_arg(node: fx.Node, i: int, name: str | None) -> bool:
    return i < len(node.args) or (name is not None and name in node.kwargs)


def node_arg(node: fx.Node, i: int, name: str | None = None) -> Argument:
    """Positional argument ``i`` of ``node``, else its keyword argument ``name``."""
    if i < len(node.args):
        return node.args[i]
    if name is not None and name in node.kwargs:
        return node.kwargs[name]
    raise ValueError(f"{describe_node(node)} has no {_what(i, name)}")


def as_node(node: fx.Node, value: object, what: str) -> fx.Node:
    if not isinstance(value, fx.Node):
        raise _wrong_type(node, what, value, "a node")
    return value


def as_int(node: fx.Node, value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _wrong_type(node, what, value, "an int")
    return value


def as_float(node: fx.Node, value: object, what: str) -> float:
    """An int or float argument as a float."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _wrong_type(node, what, value, "a number")
    return float(value)


def as_list(node: fx.Node, value: object, what: str) -> list[Argument]:
    """A list or tuple argument (its items unchecked: sizes may be ints or nodes)."""
    if not isinstance(value, (list, tuple)):
        raise _wrong_type(node, what, value, "a list")
    return list(value)


def as_ints(node: fx.Node, value: object, what: str) -> list[int]:
    return [as_int(node, item, f"{what}[{k}]") for k, item in enumerate(as_list(node, value, what))]


def arg_node(node: fx.Node, i: int, name: str | None = None) -> fx.Node:
    """Argument ``i`` (or keyword ``name``) of ``node``, which must be a node."""
    return as_node(node, node_arg(node, i, name), _what(i, name))


def arg_optional_node(node: fx.Node, i: int, name: str | None = None) -> fx.Node | None:
    """Argument ``i`` (or keyword ``name``) of ``node``: a node, or None when it is None or not given."""
    if not _has_arg(node, i, name):
        return None
    value = node_arg(node, i, name)
    return None if value is None else as_node(node, value, _what(i, name))


def arg_int(node: fx.Node, i: int, name: str | None = None, *, default: int | None = None) -> int:
    """Argument ``i`` (or keyword ``name``) of ``node``, an int; ``default`` when it is not given
    (required when ``default`` is None)."""
    if default is not None and not _has_arg(node, i, name):
        return default
    return as_int(node, node_arg(node, i, name), _what(i, name))


def arg_ints(node: fx.Node, i: int, name: str | None = None, *, default: Sequence[int] | None = None) -> list[int]:
    """Argument ``i`` (or keyword ``name``) of ``node``, a list of ints (dims, a permutation)."""
    if default is not None and not _has_arg(node, i, name):
        return list(default)
    return as_ints(node, node_arg(node, i, name), _what(i, name))


def arg_float(node: fx.Node, i: int, name: str | None = None, *, default: float | None = None) -> float:
    """Argument ``i`` (or keyword ``name``) of ``node``, an int or float, as a float."""
    if default is not None and not _has_arg(node, i, name):
        return default
    return as_float(node, node_arg(node, i, name), _what(i, name))


def arg_list(node: fx.Node, i: int, name: str | None = None) -> list[Argument]:
    """Argument ``i`` (or keyword ``name``) of ``node``, a list or tuple (items unchecked)."""
    return as_list(node, node_arg(node, i, name), _what(i, name))


def owning_module(node: fx.Node) -> fx.GraphModule:
    """The GraphModule whose graph holds ``node``."""
    gm = node.graph.owning_module
    if gm is None:
        raise ValueError(f"{describe_node(node)} is in a graph that no module owns")
    return gm


# ---- clean-up ------------------------------------------------------------------------------
@dataclass(frozen=True)
class CleanupStats:
    dead_nodes: int
    tensors_removed: int


def cleanup(gm: fx.GraphModule) -> CleanupStats:
    """What every changed program gets after its pass: dead nodes erased, tensors no node
    reads any more deleted, the graph linted and the module's code regenerated."""
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    dead = before - len(gm.graph.nodes)
    removed = remove_unused_tensors(gm)
    gm.graph.lint()
    gm.recompile()
    return CleanupStats(dead, len(removed))

"""Graph surgery, owned once: tensors by name, new constants, node replacement with
provenance, and the clean-up every changed program gets.

Passes read and write a program's tensors and nodes only through these functions (and
rewrite rules, :mod:`graphopt.rewrite`, which use them), so that shared weights stay shared,
parameters stay parameters, every created node says which pass made it and from which
module it came, and the clean-up after a change is the same for every pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

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

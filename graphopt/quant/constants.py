"""New stored tensors for rewritten graphs: registered as buffers, read by ``get_attr`` nodes."""

from __future__ import annotations

import re

import torch
import torch.fx as fx


def constant_node(
    graph: fx.Graph, gm: fx.GraphModule, owner: str, key: str, tensor: torch.Tensor, registered: dict[int, str], prefix: str = "quant"
) -> fx.Node:
    name = registered.get(id(tensor))
    if name is None:
        name = free_attr_name(gm, f"{prefix}_{re.sub(r'[^0-9A-Za-z_]', '_', owner)}_{key}")
        gm.register_buffer(name, tensor)
        registered[id(tensor)] = name
    node = graph.get_attr(name)
    mode = _fake_mode(graph)
    if mode is not None:
        node.meta["val"] = mode.from_tensor(tensor, static_shapes=True)
    return node


def free_attr_name(gm: torch.nn.Module, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ...: the first name not yet an attribute of ``gm``."""
    name, suffix = base, 1
    while hasattr(gm, name):
        name, suffix = f"{base}_{suffix}", suffix + 1
    return name


def _fake_mode(graph: fx.Graph):
    for node in graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch._subclasses.FakeTensor):
            return val.fake_mode
    return None

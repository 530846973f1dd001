"""Finding the linear layers of a graph: ``x @ W + b`` with ``W`` a constant.

A :class:`LinearSite` is one node computing a linear layer, whichever way the model wrote it:

* ``aten.linear(x, W[N, K], b?)`` (``nn.Linear``),
* ``aten.addmm(b, x, W[K, N])`` (GPT-2's ``Conv1D``),
* ``aten.matmul(x, W[K, N])`` / ``aten.mm``, with ``W`` possibly read through ``t()`` /
  ``transpose(-2, -1)`` / ``permute([1, 0])`` of a stored ``[N, K]`` tensor.

:func:`find_linear_sites` returns the sites and, for anchors that are not linear layers (a
matmul of two activations, an integer or fp16 input), a :class:`NotLinear` saying why not.
Quantization, clustering's calibration-aware coding and anything else that treats "the
linear layers" alike read this one analysis.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx

from graphopt.program import Program, module_path
from graphopt.rewrite import NoMatch, fake
from graphopt.surgery import arg_int, arg_ints, get_tensor, owning_module

aten = torch.ops.aten

LINEAR_ANCHORS = frozenset({aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default})
_TRANSPOSES = frozenset({aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default})


@dataclass(frozen=True)
class LinearSite:
    node: str  # the fx node's name
    module_path: str
    weight_name: str  # the get_attr target holding W
    transposed: bool  # True: stored as [N, K] (nn.Linear); False: stored as [K, N]
    bias_name: str | None  # constant bias (get_attr target), if any
    bias_node: str | None  # a non-constant bias (addmm's input), added after the op
    in_features: int
    out_features: int

    def weight(self, gm: fx.GraphModule) -> torch.Tensor:
        """W as ``[N, K]`` (out, in)."""
        w = get_tensor(gm, self.weight_name).detach()
        return w if self.transposed else w.T

    def bias(self, gm: fx.GraphModule) -> torch.Tensor | None:
        return get_tensor(gm, self.bias_name).detach() if self.bias_name else None


@dataclass(frozen=True)
class NotLinear:
    """An anchor (linear / addmm / mm / matmul) that is not a linear layer, and why."""

    node: str
    module_path: str
    check: str
    reason: str


def matches_path(path: str, pattern: str) -> bool:
    """``pattern`` (fnmatch) names the module ``path`` itself or a suffix of it after a dot."""
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, f"*.{pattern}") or path == pattern


def filtered_out(site: LinearSite, include: Sequence[str], exclude: Sequence[str]) -> str:
    """Why ``include`` / ``exclude`` patterns (a pass's options) leave ``site`` out, or ""."""
    path = site.module_path or site.node
    if include and not any(matches_path(path, p) for p in include):
        return f"not selected by include={list(include)}"
    for pattern in exclude:
        if matches_path(path, pattern):
            return f"excluded by pattern {pattern!r}"
    return ""


def find_linear_sites(program: Program) -> tuple[list[LinearSite], list[NotLinear]]:
    """(sites in graph order, the anchors that are not sites with the failed check)."""
    sites: list[LinearSite] = []
    rejected: list[NotLinear] = []
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target not in LINEAR_ANCHORS:
            continue
        site = match_linear(node)
        if isinstance(site, NoMatch):
            rejected.append(NotLinear(node.name, module_path(node), site.check, str(site)))
        else:
            sites.append(site)
    return sites, rejected


def match_linear(node: fx.Node) -> LinearSite | NoMatch:
    """The linear layer ``node`` computes, or which check it fails."""
    if node.target is aten.linear.default:
        x, w = node.args[:2]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        weight = _constant(w)
        if weight is None:
            return NoMatch("constant_weight", f"'{node.name}' multiplies by {_describe(w)}, not a stored weight")
        return _site(node, x, weight, True, b)
    if node.target is aten.addmm.default:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1 or len(node.args) > 3:
            return NoMatch("addmm_scalars", f"'{node.name}' scales its terms (beta/alpha)")
        b, x, w = node.args[:3]
        return _matmul_site(node, x, w, b)
    x, w = node.args[:2]
    return _matmul_site(node, x, w, None)


def _matmul_site(node: fx.Node, x, w, bias) -> LinearSite | NoMatch:
    stored = _constant(w)
    if stored is not None:
        return _site(node, x, stored, False, bias)
    if isinstance(w, fx.Node) and w.target in _TRANSPOSES and _swaps_2d(w):
        stored = _constant(w.args[0])
        if stored is not None:
            return _site(node, x, stored, True, bias)
    return NoMatch("constant_weight", f"'{node.name}' multiplies {_describe(x)} by {_describe(w)}, not by a stored 2-D weight")


def _site(node: fx.Node, x, weight_node: fx.Node, transposed: bool, bias) -> LinearSite | NoMatch:
    gm = owning_module(node)
    weight = get_tensor(gm, str(weight_node.target))
    if weight.dim() != 2:
        return NoMatch("weight_rank", f"'{node.name}' weight is {weight.dim()}-D, not a 2-D matrix")
    if weight.dtype != torch.float32:
        return NoMatch("dtype", f"'{node.name}' weight is {weight.dtype}; only float32 weights are quantized")
    x_val = fake(x)
    if x_val is None or x_val.dtype != torch.float32:
        return NoMatch("dtype", f"'{node.name}' input is {getattr(x_val, 'dtype', 'unknown')}, not float32")
    out_features, in_features = weight.shape if transposed else weight.shape[::-1]
    if x_val.shape[-1] != in_features:
        return NoMatch("shape", f"'{node.name}' input width {x_val.shape[-1]} != weight's {in_features}")
    bias_name = bias_node = None
    if bias is not None:
        stored = _constant(bias)
        b = get_tensor(gm, str(stored.target)) if stored is not None else None
        if stored is not None and b is not None and b.dim() == 1 and b.shape[0] == out_features:
            bias_name = str(stored.target)
        elif isinstance(bias, fx.Node):
            bias_node = bias.name
        else:
            return NoMatch("bias", f"'{node.name}' bias is {_describe(bias)}")
    return LinearSite(node.name, module_path(node), str(weight_node.target), transposed, bias_name, bias_node, int(in_features), int(out_features))


def _constant(value) -> fx.Node | None:
    return value if isinstance(value, fx.Node) and value.op == "get_attr" else None


def _swaps_2d(node: fx.Node) -> bool:
    val = fake(node.args[0])
    if val is None or val.dim() != 2:
        return False
    if node.target is aten.transpose.int:
        return {arg_int(node, 1) % 2, arg_int(node, 2) % 2} == {0, 1}
    if node.target is aten.permute.default:
        return arg_ints(node, 1) in ([1, 0], [-1, -2], [1, -2], [-1, 0])
    return True


def _describe(value) -> str:
    if isinstance(value, fx.Node):
        return f"'{value.name}' ({getattr(value.target, '__name__', value.target)})"
    return repr(value)

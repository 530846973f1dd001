"""Rotary position embedding -> one ``RotaryEmbedding`` kernel per query and key (exact).

transformers applies rotary as ``x * cos + rotate_half(x) * sin`` on ``(batch, heads, seq,
head_dim)`` queries and keys, with ``cos``/``sin`` built as ``cat(freqs, freqs)`` from the
positions. Exported, that is six ONNX nodes per tensor (Mul, two Slices, Neg, Concat, Mul,
Add), twice a layer; this pass replaces each by ``graphopt::rotary``
(:mod:`graphopt.attention.rotary`), one ``com.microsoft.RotaryEmbedding``. It checks that the
tables really are ``cat(f, f)`` of one tensor (so either half holds all of them); the
interleaved and partial-dimension forms are left alone, with a reason.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import fx

import graphopt.attention  # noqa: F401  (graphopt::rotary and its lowering)
from graphopt.context import PassContext
from graphopt.passbase import Pass, PassConfig, PassInfo, PassResult, register_pass
from graphopt.program import Program
from graphopt.rewrite import Match, NoMatch, RewriteRule, apply_rules, emit, fake

aten = torch.ops.aten
_VALUE_PRESERVING = (aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default, aten.contiguous.default)
_LAST = (-1, 3)


def _call(node: Any, *targets: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _slice(node: Any, x: fx.Node, start: int, end: int) -> bool:
    """``node`` is ``x[..., start:end]`` (``end`` past the axis: to its end)."""
    if not (_call(node, aten.slice.Tensor) and node.args[0] is x):
        return False
    dim = node.args[1] if len(node.args) > 1 else 0
    lo = node.args[2] if len(node.args) > 2 else 0
    hi = node.args[3] if len(node.args) > 3 else None
    return dim in _LAST and lo == start and (hi == end or (end > 0 and isinstance(hi, int) and hi >= end))


def _rotate_half(node: Any, x: fx.Node, half: int, dim: int) -> bool:
    """``node`` is ``cat(-x[..., half:], x[..., :half])``."""
    if not (_call(node, aten.cat.default) and len(node.args[0]) == 2 and (node.args[1] if len(node.args) > 1 else 0) in _LAST):
        return False
    first, second = node.args[0]
    return _call(first, aten.neg.default) and _slice(first.args[0], x, half, dim) and _slice(second, x, 0, half)


def _table(node: Any, fn: Any) -> tuple[fx.Node, fx.Node] | NoMatch:
    """``node`` is ``unsqueeze(T, 1)`` with ``T = fn(cat(f, f)) [* scalar]`` (dtype casts
    allowed): returns ``(T, the cat)``."""
    if not (_call(node, aten.unsqueeze.default) and node.args[1] == 1):
        return NoMatch("table", f"the rotary table '{getattr(node, 'name', node)}' is not a (batch, seq, dim) table unsqueezed at the head axis")
    table = node.args[0]
    walk = table
    for _ in range(8):
        if _call(walk, *_VALUE_PRESERVING) or (_call(walk, aten.mul.Tensor) and isinstance(walk.args[1], (int, float))):
            walk = walk.args[0]
        else:
            break
    if not (_call(walk, fn) and _call(walk.args[0], aten.cat.default)):
        return NoMatch("table", f"the rotary table '{table.name}' is not {fn.__name__}(cat(freqs, freqs)) (times a scale)")
    cat = walk.args[0]
    parts, dim = cat.args[0], cat.args[1] if len(cat.args) > 1 else 0
    if not (len(parts) == 2 and parts[0] is parts[1] and dim in (-1, 2)):
        return NoMatch("halves", f"'{cat.name}' does not repeat one frequency table twice: the halves of the table may differ")
    return table, cat


def rotary_rule() -> RewriteRule:
    halves: dict[tuple[fx.Node, str], fx.Node] = {}  # one half table per full table (and batch), shared by every layer

    def match(node: fx.Node) -> Match | NoMatch:
        a: Any = node.args[0]
        b: Any = node.args[1] if len(node.args) > 1 else None
        if len(node.args) > 2 or node.kwargs.get("alpha", 1) != 1:
            return NoMatch("add", f"'{node.name}' scales its second operand")
        for cos_term, sin_term in ((a, b), (b, a)):
            if not (_call(cos_term, aten.mul.Tensor) and _call(sin_term, aten.mul.Tensor)):
                continue
            for x, cos_u in (cos_term.args, cos_term.args[::-1]):
                if not isinstance(x, fx.Node):
                    continue
                x_val = fake(x)
                if x_val is None or x_val.dim() != 4 or not isinstance(x_val.shape[-1], int) or x_val.shape[-1] % 2:
                    continue
                dim = x_val.shape[-1]
                rotated: Any
                for rotated, sin_u in (sin_term.args, sin_term.args[::-1]):
                    if not _rotate_half(rotated, x, dim // 2, dim):
                        continue
                    cos_table, sin_table = _table(cos_u, aten.cos.default), _table(sin_u, aten.sin.default)
                    for found in (cos_table, sin_table):
                        if isinstance(found, NoMatch):
                            return found
                    assert isinstance(cos_table, tuple) and isinstance(sin_table, tuple)
                    if cos_table[1] is not sin_table[1]:
                        return NoMatch("tables", f"'{node.name}': cos and sin come from different frequency tables")
                    cos_val = fake(cos_table[0])
                    if cos_val is None or cos_val.dim() != 3 or cos_val.shape[-1] != dim:
                        return NoMatch("partial", f"'{node.name}': the table covers {None if cos_val is None else cos_val.shape[-1]} of {dim} dims "
                                                  "(partial rotary is left alone)")
                    return Match(root=node, nodes=(node, cos_term, sin_term, rotated),
                                 bindings={"x": x, "cos": cos_table[0], "sin": sin_table[0], "half": dim // 2})
        return NoMatch("pattern", f"'{node.name}' is not x * cos + rotate_half(x) * sin")

    def half_of(graph: fx.Graph, table: fx.Node, half: int, x: fx.Node) -> fx.Node:
        """The first half of ``table``, at ``x``'s batch: a table of batch 1 (position_ids of
        batch 1) is expanded once here, since ORT's kernel wants one position row per batch row."""
        batch = fake(x).shape[0]
        key = (table, str(batch))
        if key not in halves:  # the rules run in graph order: the first use comes first
            piece = emit(graph, aten.slice.Tensor, (table, -1, 0, half))
            if str(fake(table).shape[0]) != str(batch):
                size = emit(graph, aten.sym_size.int, (x, 0))
                piece = emit(graph, aten.expand.default, (piece, [size, -1, -1]))
            halves[key] = piece
        return halves[key]

    def replace(graph: fx.Graph, m: Match) -> fx.Node:
        x = m.bindings["x"]
        cos, sin = half_of(graph, m.bindings["cos"], m.bindings["half"], x), half_of(graph, m.bindings["sin"], m.bindings["half"], x)
        return emit(graph, torch.ops.graphopt.rotary.default, (x, cos, sin))

    return RewriteRule("rotary", frozenset({aten.add.Tensor}), match, replace)


class RotaryConfig(PassConfig):
    pass


class RotaryInfo(PassInfo):
    fused: int = 0


@register_pass
class Rotary(Pass):
    """Fuse each rotary position embedding (queries and keys) into one kernel."""

    name: ClassVar[str] = "rotary"
    Config: ClassVar[type[PassConfig]] = RotaryConfig
    Info: ClassVar[type[PassInfo]] = RotaryInfo
    requires_ir = ("aten",)

    @classmethod
    def is_exact(cls, config: RotaryConfig) -> bool:
        return True

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        stats = apply_rules(program.module, [rotary_rule()], provenance=self.name)
        reason = "no x * cos + rotate_half(x) * sin on (batch, heads, seq, head_dim) tensors (a rotary decoder's queries and keys)"
        return PassResult.of(program, stats.total > 0, RotaryInfo(fused=stats.total), reason)

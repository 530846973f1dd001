"""Packed Q/K/V and rotary into GroupQueryAttention (exact).

After ``gqa-attention``, ``rotary`` and ``pack-linears`` a decoder layer's attention reads one
packed projection through a split, three head views and two ``RotaryEmbedding`` ops. ORT's
``GroupQueryAttention`` can read the packed projection itself and apply rotary inside
(``do_rotary``), with ``position_ids`` numbering the rows of the rotary tables it is given.
This pass replaces the split, the views, the two rotary ops and the attention by
``graphopt::gqa_rotary_attention`` (:mod:`graphopt.attention.gqa`): per layer one kernel
instead of a Split, two RotaryEmbedding and the attention. The tables stay the ones the graph
computed for this step, so left-padded rows keep their own positions (measured on ORT 1.32:
prefill and decode steps of a left-padded batch match the unfused kernels within 4e-7).
Run it after ``pack-linears``.
"""

from __future__ import annotations

import operator
from typing import Any, ClassVar

import torch
from torch import fx

import graphopt.attention  # noqa: F401  (graphopt::gqa_rotary_attention and its lowering)
from graphopt.context import PassContext
from graphopt.passbase import Pass, PassConfig, PassInfo, PassResult, register_pass
from graphopt.program import Program
from graphopt.rewrite import Match, NoMatch, RewriteRule, apply_rules, describe_near_misses, emit, fake

aten = torch.ops.aten
_custom = torch.ops.graphopt


def _single_user(node: fx.Node) -> bool:
    return len(node.users) == 1


def _head_view(node: Any, heads: int, dim: int) -> tuple[fx.Node, int] | NoMatch:
    """``transpose(view(getitem(split, i), [batch, seq, heads or -1, dim]), 1, 2)`` -> (split, i)."""
    if not (isinstance(node, fx.Node) and node.target is aten.transpose.int and tuple(node.args[1:]) in ((1, 2), (2, 1))):
        return NoMatch("heads", f"'{getattr(node, 'name', node)}' is not the (batch, heads, seq, dim) transpose of a head view")
    view = node.args[0]
    if not (isinstance(view, fx.Node) and view.target in (aten.view.default, aten.reshape.default) and _single_user(view) and _single_user(node)):
        return NoMatch("heads", f"'{node.name}' does not transpose a head view read only here")
    shape = view.args[1]
    if not (isinstance(shape, (list, tuple)) and len(shape) == 4 and shape[3] == dim and shape[2] in (heads, -1)):
        return NoMatch("heads", f"'{view.name}' views {shape}, not (batch, seq, {heads}, {dim})")
    piece = view.args[0]
    if not (isinstance(piece, fx.Node) and piece.target is operator.getitem and _single_user(piece)):
        return NoMatch("split", f"'{view.name}' does not view one piece of a split")
    split, index = piece.args
    if not (isinstance(split, fx.Node) and split.target is aten.split_with_sizes.default and isinstance(index, int)):
        return NoMatch("split", f"'{piece.name}' is not a piece of split_with_sizes")
    return split, index


def _flattened(node: fx.Node, width: int) -> fx.Node | NoMatch:
    """The ``reshape(transpose(attention, 1, 2), [batch, seq, heads * dim])`` that reads the
    attention output (``getitem(node, 0)``), through views that keep its shape and the
    ``contiguous`` copy eager attention makes of the transpose."""
    outs = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
    if len(outs) != 1:
        return NoMatch("output", f"'{node.name}': its attention output is not read once")
    current, shape = outs[0], fake(outs[0])
    while len(current.users) == 1:
        user = next(iter(current.users))
        if user.target in (aten.view.default, aten.reshape.default, aten.clone.default, aten.contiguous.default) and fake(user) is not None \
                and shape is not None and tuple(fake(user).shape) == tuple(shape.shape):
            current = user
            continue
        if user.target is aten.transpose.int and tuple(user.args[1:]) in ((1, 2), (2, 1)) and len(user.users) == 1:
            flat = next(iter(user.users))
            # eager attention copies the transposed heads before flattening them
            while flat.target in (aten.clone.default, aten.contiguous.default) and len(flat.users) == 1:
                flat = next(iter(flat.users))
            val = fake(flat)
            if flat.target in (aten.view.default, aten.reshape.default) and val is not None and val.dim() == 3 and val.shape[-1] == width:
                return flat
        break
    return NoMatch("output", f"'{node.name}': its attention is not flattened to (batch, seq, heads * dim) for the output projection")


def gqa_rotary_rule() -> RewriteRule:
    def match(node: fx.Node) -> Match | NoMatch:
        args: Any = node.args
        q, k, v, past_k, past_v, bias, scale, heads, kv_heads = args
        for name, value in (("queries", q), ("keys", k)):
            if not (isinstance(value, fx.Node) and value.target is _custom.rotary.default and _single_user(value)):
                return NoMatch("rotary", f"'{node.name}': its {name} are not one graphopt::rotary read only here (run rotary first)")
        assert isinstance(q, fx.Node) and isinstance(k, fx.Node)
        if q.args[1:] != k.args[1:]:
            return NoMatch("rotary", f"'{node.name}': queries and keys are turned by different tables")
        q_val = fake(q)
        if q_val is None or q_val.dim() != 4 or not isinstance(q_val.shape[-1], int):
            return NoMatch("shapes", f"'{node.name}' has no 4-D query shape recorded")
        dim = int(q_val.shape[-1])
        if dim % 16:
            return NoMatch("head_dim", f"'{node.name}': head dim {dim}; ORT's GroupQueryAttention applies rotary only to multiples of 16")
        pieces = [_head_view(q.args[0], heads, dim), _head_view(k.args[0], kv_heads, dim), _head_view(v, kv_heads, dim)]
        for piece in pieces:
            if isinstance(piece, NoMatch):
                return piece
        splits = {p[0] for p in pieces if not isinstance(p, NoMatch)}
        indices = [p[1] for p in pieces if not isinstance(p, NoMatch)]
        if len(splits) != 1 or indices != [0, 1, 2]:
            return NoMatch("split", f"'{node.name}': queries, keys and values are not pieces 0, 1, 2 of one split (run pack-linears first)")
        split = next(iter(splits))
        split_args: Any = split.args
        sizes, axis = split_args[1], split_args[2] if len(split_args) > 2 else 0
        if list(sizes) != [heads * dim, kv_heads * dim, kv_heads * dim] or axis not in (-1, 2) or len(split.users) != 3:
            return NoMatch("split", f"'{split.name}' splits {list(sizes)} along {axis}, not the packed q, k, v of this attention alone")
        flat = _flattened(node, heads * dim)
        if isinstance(flat, NoMatch):
            return flat
        cos, sin = q.args[1], q.args[2]
        return Match(root=node, nodes=(node,), bindings={"qkv": split.args[0], "past_k": past_k, "past_v": past_v, "bias": bias, "cos": cos,
                                                         "sin": sin, "scale": scale, "heads": heads, "kv_heads": kv_heads, "flat": flat})

    def replace(graph: fx.Graph, m: Match) -> fx.Node:
        b = m.bindings
        fused = emit(graph, _custom.gqa_rotary_attention.default,
                     (b["qkv"], b["past_k"], b["past_v"], b["bias"], b["cos"], b["sin"], b["scale"], b["heads"], b["kv_heads"]))
        # the op's attention is already (batch, seq, heads * dim): what read the flattening
        # reads it, and the old getitem -> transpose -> reshape chain dies with the attention
        b["flat"].replace_all_uses_with(emit(graph, operator.getitem, (fused, 0)))
        return fused

    return RewriteRule("gqa_rotary", frozenset({_custom.gqa_attention.default}), match, replace)


class GqaRotaryConfig(PassConfig):
    pass


class GqaRotaryInfo(PassInfo):
    fused: int = 0
    near_misses: list[dict[str, str]] = []


@register_pass
class GqaRotary(Pass):
    """Feed the packed Q/K/V projection to GroupQueryAttention and let it apply rotary."""

    name: ClassVar[str] = "gqa-rotary"
    Config: ClassVar[type[PassConfig]] = GqaRotaryConfig
    Info: ClassVar[type[PassInfo]] = GqaRotaryInfo
    requires_ir = ("aten",)

    @classmethod
    def is_exact(cls, config: GqaRotaryConfig) -> bool:
        return True

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        stats = apply_rules(program.module, [gqa_rotary_rule()], provenance=self.name)
        misses = [m.to_dict() for m in stats.near_misses[:8]]
        reason = "no GroupQueryAttention reads rotary queries and keys of one packed projection (run gqa-attention, rotary and pack-linears first)"
        if stats.near_misses:
            reason += "; near misses: " + describe_near_misses(stats.near_misses, 3)
        return PassResult.of(program, stats.total > 0, GqaRotaryInfo(fused=stats.total, near_misses=misses), reason)

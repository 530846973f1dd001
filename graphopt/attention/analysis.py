"""What the attention passes need to know about each ``aten.scaled_dot_product_attention`` node.

* :func:`sdpa_nodes`: the SDPA nodes in graph order, with a layer index and module path.
* :func:`sdpa_values`: their concrete inputs on the program's example inputs (an fx
  Interpreter run), cached on the program as an analysis.
* :func:`classify_mask`: what a mask *does* on those inputs: nothing, key padding (every
  query row the same), or causal plus key padding, for additive and boolean masks alike.
  Approximate attention keeps only a key bias, so it must know; the classification is evidence from the example inputs, which
  the pass records in its info.
* :func:`projection_of` and :func:`heads_merged_output`: the head split of a Q/K/V
  projection and the head merge after attention, the two ends every "pack the projections
  into one kernel" rule (fp32 here, int8 in :mod:`graphopt.quant.attention`) matches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from graphopt.attention.masks import additive_values
from graphopt.program import Program, module_path
from graphopt.rewrite import NoMatch, fake, only_user
from graphopt.surgery import arg_int, arg_node, arg_optional_node, as_float

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
IDENTITIES = frozenset({aten.contiguous.default, aten.clone.default})
RESHAPES = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})
# A mask entry at or below this is "masked out"; above it, it must be exactly 0.
MASKED = -1e4


@dataclass(frozen=True)
class SDPASite:
    node: fx.Node
    layer: int
    module_path: str

    @property
    def mask(self) -> fx.Node | None:
        return arg_optional_node(self.node, 3, "attn_mask")

    def option(self, name: str, position: int, default):
        node = self.node
        return node.args[position] if len(node.args) > position else node.kwargs.get(name, default)

    @property
    def dropout(self) -> float:
        return self.option("dropout_p", 4, 0.0)

    @property
    def is_causal(self) -> bool:
        return bool(self.option("is_causal", 5, False))

    @property
    def enable_gqa(self) -> bool:
        return bool(self.node.kwargs.get("enable_gqa", False))

    def scale(self) -> float:
        scale = self.node.kwargs.get("scale")
        if scale is None:
            scale = self.node.args[6] if len(self.node.args) > 6 else None
        return as_float(self.node, scale, "scale") if scale is not None else 1.0 / math.sqrt(arg_node(self.node, 0).meta["val"].shape[-1])


def sdpa_nodes(program: Program) -> list[SDPASite]:
    nodes = [n for n in program.graph.nodes if n.op == "call_function" and n.target is SDPA]
    return [SDPASite(node, index, module_path(node)) for index, node in enumerate(nodes)]


def sdpa_values(program: Program) -> dict[str, tuple]:
    """{node name: (q, k, v, mask or None)} on the program's example inputs (cached)."""
    return program.analysis("sdpa_values", _capture_values)


def _capture_values(program: Program) -> dict[str, tuple]:
    captured: dict[str, tuple] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if node.op == "call_function" and node.target is SDPA:
                args, kwargs = self.fetch_args_kwargs_from_env(node)
                mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
                captured[node.name] = (args[0], args[1], args[2], mask)
            return result

    flat_args = _flat_inputs(program)
    with torch.no_grad():
        Recorder(program.module).run(*flat_args)
    return captured


def _flat_inputs(program: Program) -> list:
    """The example inputs flattened the way the graph's placeholders take them."""
    return flat_inputs(program, program.args, program.kwargs)


def flat_inputs(program: Program, args: tuple, kwargs: dict) -> list:
    """``(args, kwargs)`` for ``program`` flattened the way its graph's placeholders take them
    (what an ``fx.Interpreter`` over ``program.module`` runs on)."""
    from torch.utils import _pytree as pytree

    info = getattr(program.module.graph._codegen, "pytree_info", None)
    if info is None or info.in_spec is None:  # a plain fx graph: positional placeholders
        return list(args) + list(kwargs.values())
    keys = info.in_spec.child(1).context if info.in_spec.num_children == 2 else list(kwargs)
    return pytree.tree_leaves((tuple(args), {key: kwargs[key] for key in keys}))


@dataclass(frozen=True)
class MaskKind:
    kind: str  # "none", "key", "causal+key", or "general"
    reason: str = ""


def classify_mask(mask: torch.Tensor | None, seq_q: int, seq_k: int) -> MaskKind:
    """What ``mask`` (concrete values, SDPA layout) does to ``seq_q`` queries over ``seq_k`` keys."""
    if mask is None:
        return MaskKind("none")
    mask = additive_values(mask)  # a boolean mask (True = attend) acts as where(mask, 0, finfo.min)
    if mask.dim() != 4:
        return MaskKind("general", f"{mask.dim()}-D mask, expected (batch, heads, q_seq, k_seq)")
    if mask.shape[1] != 1 and not bool((mask == mask[:, :1]).all()):
        return MaskKind("general", "the mask differs between heads")
    values = mask[:, :1].expand(-1, 1, seq_q, seq_k)
    if not bool(((values == 0) | (values <= MASKED)).all()):
        return MaskKind("general", f"mask values other than 0 and <= {MASKED:g} (a soft bias)")
    last = values[:, :, -1:, :]
    if bool((values == last).all()):
        return MaskKind("key")
    keep = torch.ones(seq_q, seq_k, dtype=torch.bool).tril(seq_k - seq_q)
    causal = torch.where(keep, last.expand_as(values), torch.full_like(values, torch.finfo(values.dtype).min))
    if bool(((values <= MASKED) == (causal <= MASKED)).all()):
        return MaskKind("causal+key")
    return MaskKind("general", "the mask is neither key padding nor causal plus key padding on the example inputs")


# ---- the two ends of a packed-projection pattern ----------------------------------------
def projection_of(operand, projection, stored: tuple[int, ...] = (1, 2, 3), what: str = "a dynamic-int8 projection (fp32 layer, or another mode)") -> tuple[fx.Node, list[fx.Node]] | NoMatch:
    """transpose(view(p, [B, S, heads, d]), 1, 2) with p a ``projection`` node whose arguments at
    ``stored`` are stored tensors (get_attr; a missing optional one is fine), single users."""
    if not (isinstance(operand, fx.Node) and operand.target is aten.transpose.int and _swaps_heads(operand)):
        return NoMatch("head_split", f"{_name(operand)} is not transpose(·, 1, 2) of the heads view")
    view = operand.args[0]
    if not (isinstance(view, fx.Node) and view.target in RESHAPES):
        return NoMatch("head_split", f"{_name(view)} is not a view into heads")
    source = view.args[0]
    if not (isinstance(source, fx.Node) and source.target is projection):
        return NoMatch("projection", f"{_name(source)} is not {what}")
    for node in (source, view):
        user = only_user(node)
        if isinstance(user, NoMatch):
            return user
    for i in stored:
        if i >= len(source.args) or source.args[i] is None:
            continue
        arg = source.args[i]
        if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
            return NoMatch("projection", f"{_name(source)} reads a computed weight")
    user = only_user(operand)
    if isinstance(user, NoMatch):
        return user
    return source, [view, operand]


def heads_merged_output(sdpa: fx.Node) -> tuple[fx.Node, list[fx.Node]] | NoMatch:
    """reshape([contiguous](transpose(o, 1, 2)), [B, S, -1]) -> (the reshape, the chain).

    A reshape of ``o`` to its own shape may come first: transformers' SDPA attention writes
    ``o.reshape(batch, -1, q_len, head_dim)`` before the transpose."""
    chain: list[fx.Node] = []
    user = only_user(sdpa)
    while not isinstance(user, NoMatch) and _same_shape_reshape(user):
        chain.append(user)
        user = only_user(user)
    if isinstance(user, NoMatch):
        return user
    if not (user.target is aten.transpose.int and _swaps_heads(user)):
        return NoMatch("head_merge", f"attention output feeds {_name(user)}, not transpose(·, 1, 2)")
    chain.append(user)
    while True:
        user = only_user(chain[-1])
        if isinstance(user, NoMatch):
            return user
        if user.target not in IDENTITIES:
            break
        chain.append(user)
    out = fake(user)
    if user.target not in RESHAPES or out is None or out.dim() != 3:
        return NoMatch("head_merge", f"heads are merged by {_name(user)}, not a reshape to [B, S, hidden]")
    chain.append(user)
    return user, chain


def _swaps_heads(transpose: fx.Node) -> bool:
    """Whether a 4-D ``aten.transpose.int`` swaps dims 1 and 2."""
    return sorted(arg_int(transpose, i) % 4 for i in (1, 2)) == [1, 2]


def _same_shape_reshape(node: fx.Node) -> bool:
    if node.target not in RESHAPES:
        return False
    before, after = fake(node.args[0]), fake(node)
    return before is not None and after is not None and str(tuple(before.shape)) == str(tuple(after.shape))


def _name(value) -> str:
    return f"'{value.name}' ({getattr(value.target, '__name__', value.target)})" if isinstance(value, fx.Node) else repr(value)

"""SDPA masks as the attention kernels take them: additive float biases.

``scaled_dot_product_attention`` takes a boolean mask (True = attend) or an additive float
one. transformers 5 hands SDPA attention a boolean ``(batch, 1, q, k)`` mask and eager
attention the additive ``where(mask, 0, finfo.min)``; ORT's MultiHeadAttention and
Attention, and the Nyström and LSH ops, take an additive bias only. So a boolean mask is
converted in the graph, once per attention node, to ``where(mask, 0, finfo(dtype).min)``.

That is exact wherever a query row keeps at least one key: ``finfo.min + s − max``
underflows ``exp`` to exactly 0 in fp32, the same 0 SDPA's ``-inf`` gives (measured: zero
difference on random q, k, v). A row that keeps no key differs: SDPA returns 0 there, the
additive form the mean of v (what HF's eager attention returns). Such rows are the padded
queries of a causal model with left padding, and exact passes are held to every position
(verification has a left-padded batch), so :func:`zero_unattended` multiplies the fused
output by whether its row keeps any key: then the rewrite is exact there too.
"""

from __future__ import annotations

from typing import overload

import torch
from torch import fx

from graphopt.rewrite import emit, fake

aten = torch.ops.aten
MASK_CONVERSION = aten.where.ScalarOther  # the op additive_mask builds


def is_boolean(mask: fx.Node | None) -> bool:
    value = fake(mask) if mask is not None else None
    return value is not None and value.dtype == torch.bool


@overload
def additive_values(mask: torch.Tensor, dtype: torch.dtype = ...) -> torch.Tensor: ...
@overload
def additive_values(mask: None, dtype: torch.dtype = ...) -> None: ...
@overload
def additive_values(mask: torch.Tensor | None, dtype: torch.dtype = ...) -> torch.Tensor | None: ...
def additive_values(mask: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """A concrete mask as an additive bias (boolean: True -> 0, False -> finfo.min)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.where(mask, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)


def additive_mask(graph: fx.Graph, mask: fx.Node, dtype: torch.dtype) -> fx.Node:
    """``mask`` as an additive bias of ``dtype``, built at the graph's insertion point
    (a float mask is returned as it is)."""
    if not is_boolean(mask):
        return mask
    # The same two nodes HF's eager attention builds, which the exporter lowers to one Where.
    zero = emit(graph, aten.scalar_tensor.default, (0.0,), {"dtype": dtype, "device": fake(mask).device})
    return emit(graph, MASK_CONVERSION, (mask, zero, torch.finfo(dtype).min))


def zero_unattended(graph: fx.Graph, out: fx.Node, mask: fx.Node | None, *, merged_heads: bool) -> fx.Node:
    """``out`` with the rows whose boolean ``mask`` keeps no key set to 0, as SDPA returns
    them (a float mask is left alone: SDPA itself gives the additive form's answer).

    ``out`` is ``(batch, heads, q, d)``, or with ``merged_heads`` ``(batch, q, heads * d)``,
    which needs a mask with one head (axis 1 of size 1)."""
    if not is_boolean(mask):
        return out
    keeps = emit(graph, aten.any.dim, (mask, -1, True))  # (batch, 1 | heads, q, 1)
    if merged_heads:
        keeps = emit(graph, aten.squeeze.dim, (emit(graph, aten.transpose.int, (keeps, 1, 2)), -1))  # (batch, q, 1)
    keeps = emit(graph, aten._to_copy.default, (keeps,), {"dtype": fake(out).dtype})
    return emit(graph, aten.mul.Tensor, (out, keeps))

"""Hedgehog attention (exact local window + learned linear attention) as a custom op::

    graphopt::hedgehog_attention(q, k, v, key_bias, wq, bq, wk, bk, mix, *, scale, block, sinks, causal, threshold)

The feature-map weights ``wq, bq, wk, bk`` and the per-head ``mix`` are trainable
parameters of the program (:mod:`graphopt.attention.transfer` fits them to the exact
attention, ``distill`` fine-tunes them end to end), so the op has a backward: it recomputes
:func:`graphopt.attention.reference.hedgehog_attention` under autograd (one extra forward,
no saved intermediates). The ONNX lowering, in standard ops, is
:mod:`graphopt.attention.hedgehog_lowering`.
"""

from __future__ import annotations

import torch

from graphopt.attention import reference
from graphopt.attention.autograd import recompute_backward


@torch.library.custom_op("graphopt::hedgehog_attention", mutates_args=())
def hedgehog_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor, wk: torch.Tensor,
    bk: torch.Tensor, mix: torch.Tensor, scale: float, block: int, sinks: int, causal: bool, threshold: int,
) -> torch.Tensor:
    return reference.hedgehog_attention(q, k, v, key_bias, wq, bq, wk, bk, mix, scale, block, sinks, causal, threshold)


@hedgehog_attention.register_fake
def _(q, k, v, key_bias, wq, bq, wk, bk, mix, scale, block, sinks, causal, threshold):
    return torch.empty_like(q)


recompute_backward(hedgehog_attention, reference.hedgehog_attention, tensors=9)  # q, k, v, key_bias, wq, bq, wk, bk, mix

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


@torch.library.custom_op("graphopt::hedgehog_attention", mutates_args=())
def hedgehog_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor, wk: torch.Tensor,
    bk: torch.Tensor, mix: torch.Tensor, scale: float, block: int, sinks: int, causal: bool, threshold: int,
) -> torch.Tensor:
    return reference.hedgehog_attention(q, k, v, key_bias, wq, bq, wk, bk, mix, scale, block, sinks, causal, threshold)


@hedgehog_attention.register_fake
def _(q, k, v, key_bias, wq, bq, wk, bk, mix, scale, block, sinks, causal, threshold):
    return torch.empty_like(q)


TENSORS = 9  # q, k, v, key_bias, wq, bq, wk, bk, mix


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:TENSORS])
    ctx.options = inputs[TENSORS:]


def _backward(ctx, grad):
    tensors = [t.detach().requires_grad_(t.is_floating_point()) for t in ctx.saved_tensors]
    with torch.enable_grad():
        out = reference.hedgehog_attention(*tensors, *ctx.options)
        wanted = [t for t in tensors if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
    return (*(next(grads) if t.requires_grad else None for t in tensors), *(None,) * len(ctx.options))


hedgehog_attention.register_autograd(_backward, setup_context=_setup)

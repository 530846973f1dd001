"""Backward passes for the trainable attention ops: recompute the eager reference under autograd.

The ops' forward runs the reference without saving intermediates; the backward runs it again
with autograd on (one forward more per step, no activation memory kept between the two).
"""

from __future__ import annotations

import torch


def recompute_backward(op, fn, tensors: int) -> None:
    """Register a backward for ``op`` that recomputes ``fn`` (its reference) under autograd:
    the first ``tensors`` inputs are tensors, the rest options."""

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:tensors])
        ctx.options = inputs[tensors:]

    def backward(ctx, grad):
        saved = [t.detach().requires_grad_(t.is_floating_point()) for t in ctx.saved_tensors]
        with torch.enable_grad():
            out = fn(*saved, *ctx.options)
            wanted = [t for t in saved if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        return (*(next(grads) if t.requires_grad else None for t in saved), *(None,) * len(ctx.options))

    op.register_autograd(backward, setup_context=setup)

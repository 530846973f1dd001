"""``graphopt::clustered_weight``: rebuild a dense tensor from packed codes and a codebook.

The codebook is trainable (its gradient sums the gradient of every weight that uses each
centroid), so a clustered program can be distilled: the codes stay, the centroids move.
"""

from __future__ import annotations

import math

import torch

from graphopt.cluster.packing import unpack_codes

LIB = "graphopt"


@torch.library.custom_op(f"{LIB}::clustered_weight", mutates_args=())
def clustered_weight(codes: torch.Tensor, codebook: torch.Tensor, shape: list[int], bits: int) -> torch.Tensor:
    """Dense tensor of ``shape``: ``codebook[row, code]`` with codebook [rows, 2**bits].
    A float16 codebook (half the storage) gives a float32 tensor."""
    index = unpack_codes(codes, bits, math.prod(shape)).reshape(codebook.shape[0], -1)
    return torch.gather(codebook, 1, index).reshape(shape).to(_dense_dtype(codebook))


@clustered_weight.register_fake
def _(codes, codebook, shape, bits):
    return codebook.new_empty(shape, dtype=_dense_dtype(codebook))


def _dense_dtype(codebook: torch.Tensor) -> torch.dtype:
    return torch.float32 if codebook.dtype == torch.float16 else codebook.dtype


def _setup(ctx, inputs, output):
    codes, codebook, shape, bits = inputs
    ctx.save_for_backward(codes)
    ctx.book_shape, ctx.book_dtype, ctx.shape, ctx.bits = tuple(codebook.shape), codebook.dtype, list(shape), bits


def _backward(ctx, grad):
    (codes,) = ctx.saved_tensors
    rows = ctx.book_shape[0]
    index = unpack_codes(codes, ctx.bits, math.prod(ctx.shape)).reshape(rows, -1)
    book_grad = grad.new_zeros(ctx.book_shape).scatter_add_(1, index, grad.reshape(rows, -1))
    return None, book_grad.to(ctx.book_dtype), None, None


clustered_weight.register_autograd(_backward, setup_context=_setup)

"""GPTQ-style error-compensating rounding for group-wise n-bit weights (Frantar et al., 2022).

Weight-only int4 rounds every weight on its own; GPTQ rounds one input column at a time and
pushes each column's rounding error onto the columns not yet rounded, weighted by the inverse
of ``H = X^T X`` (the calibration activations' second moment), so the layer's *output* error
on the calibration data is what gets minimised. Group scales and zero points are chosen when a
group's first column is reached, from the weights as updated so far. The result is stored in
exactly MatMulNBits' layout, so the kernel and the eager reference are unchanged.
"""

from __future__ import annotations

import torch

from graphopt.quant.packing import NBitsWeight, _search_block_params, pack_codes, pack_zero_points

DAMPING = 0.01  # fraction of the mean diagonal added to H, as in the paper


def gptq_nbits(weight: torch.Tensor, hessian: torch.Tensor, bits: int, block_size: int, symmetric: bool = False) -> NBitsWeight:
    """``weight [N, K]`` (K a multiple of ``block_size``), ``hessian [K, K]`` -> MatMulNBits weight."""
    w = weight.detach().double().clone()
    N, K = w.shape
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += DAMPING * torch.diag(h).mean() * torch.eye(K, dtype=h.dtype)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    levels = 2**bits - 1
    blocks = K // block_size
    codes = torch.zeros(N, K, dtype=torch.uint8)
    scales = torch.zeros(N, blocks, dtype=torch.float32)
    zeros = torch.zeros(N, blocks, dtype=torch.float32)
    for column in range(K):
        group = column // block_size
        if column % block_size == 0:
            group_weights = w[:, column : column + block_size].float().reshape(N, 1, block_size)
            s, z = _search_block_params(group_weights, bits, symmetric)
            scales[:, group], zeros[:, group] = s[:, 0], z[:, 0]
        s, z = scales[:, group].double(), zeros[:, group].double()
        q = torch.clamp(torch.round(w[:, column] / s) + z, 0, levels)
        codes[:, column] = q.to(torch.uint8)
        error = (w[:, column] - (q - z) * s) / h_inv[column, column]
        w[:, column + 1 :] -= error[:, None] * h_inv[column, column + 1 :][None, :]
    packed = pack_codes(codes, bits).reshape(N, blocks, block_size * bits // 8)
    return NBitsWeight(packed, scales, pack_zero_points(zeros.to(torch.uint8), bits), K, N, bits, block_size, 0)


class HessianObserver:
    """Accumulates ``X^T X`` of a layer's input over the calibration batches."""

    def __init__(self) -> None:
        self.hessian: torch.Tensor | None = None
        self.rows = 0

    def update(self, x: torch.Tensor) -> None:
        x2d = x.detach().reshape(-1, x.shape[-1]).double()
        product = x2d.T @ x2d
        self.hessian = product if self.hessian is None else self.hessian + product
        self.rows += x2d.shape[0]

"""Nyström attention as a custom op (eager reference + fake)::

    graphopt::nystrom_attention(q, k, v, key_bias, *, scale, landmarks, iterations, threshold)

``key_bias`` broadcasts to ``(batch, 1, 1, seq)`` (zeros of shape (1, 1, 1, 1) when there
is no mask). At most ``threshold`` tokens the op is exact attention. The ONNX lowering, in
standard ops, is :mod:`graphopt.attention.nystrom_lowering`.
"""

from __future__ import annotations

import torch

from graphopt.attention import reference


@torch.library.custom_op("graphopt::nystrom_attention", mutates_args=())
def nystrom_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor, scale: float, landmarks: int, iterations: int, threshold: int
) -> torch.Tensor:
    return reference.nystrom_attention(q, k, v, key_bias, scale, landmarks, iterations, threshold)


@nystrom_attention.register_fake
def _(q, k, v, key_bias, scale, landmarks, iterations, threshold):
    return torch.empty_like(q)

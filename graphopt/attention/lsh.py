"""LSH (bucketed) attention as a custom op (eager reference + fake)::

    graphopt::lsh_attention(q, k, v, key_bias, rotations, *, scale, chunk, causal, threshold)

``rotations`` (rounds, head_dim, buckets / 2) are the random projections of angular LSH,
stored with the model as a constant; all-zero rotations mean one bucket. At most
``threshold`` tokens the op is exact attention. The ONNX lowering, in standard ops, is
:mod:`graphopt.attention.lsh_lowering`.
"""

from __future__ import annotations

import torch

from graphopt.attention import reference


@torch.library.custom_op("graphopt::lsh_attention", mutates_args=())
def lsh_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor, rotations: torch.Tensor, scale: float, chunk: int, causal: bool, threshold: int
) -> torch.Tensor:
    return reference.lsh_attention(q, k, v, key_bias, rotations, scale, chunk, causal, threshold)


@lsh_attention.register_fake
def _(q, k, v, key_bias, rotations, scale, chunk, causal, threshold):
    return torch.empty_like(q)

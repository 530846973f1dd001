"""Attention kernels as custom ops: exact fused (ORT MultiHeadAttention), Nyström, LSH.

Importing the package registers the ``graphopt::`` ops with ``torch.library`` (eager
reference + fake) and their ONNX lowerings with :mod:`graphopt.export.lowerings`.
"""

from graphopt.attention import fused, lsh, nystrom, packed  # noqa: F401  (registers the ops)
from graphopt.attention.reference import (
    exact_attention,
    lsh_attention,
    lsh_rotations,
    newton_pinv,
    nystrom_attention,
    relative_error,
)

__all__ = ["exact_attention", "nystrom_attention", "lsh_attention", "lsh_rotations", "newton_pinv", "relative_error"]

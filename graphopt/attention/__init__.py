"""Attention kernels as custom ops: exact fused (ORT MultiHeadAttention / Attention), Nyström, LSH.

Importing the package registers the ``graphopt::`` ops with ``torch.library`` (eager
reference + fake) and declares the modules holding their ONNX lowerings
(:mod:`graphopt.attention.lowering`, ``nystrom_lowering``, ``lsh_lowering``), which the
exporter imports; so importing the ops loads neither onnxscript nor onnxruntime.
"""

from graphopt.attention import fused, gqa, hedgehog, lsh, nystrom, packed, pooled, rotary  # noqa: F401  (registers the ops)
from graphopt.attention.reference import (
    exact_attention,
    lsh_attention,
    lsh_rotations,
    newton_pinv,
    nystrom_attention,
    relative_error,
)
from graphopt.lowerings import declare_lowerings

for _module in ("lowering", "nystrom_lowering", "lsh_lowering", "hedgehog_lowering", "pooled_lowering"):
    declare_lowerings(f"graphopt.attention.{_module}")

__all__ = ["exact_attention", "lsh_attention", "lsh_rotations", "newton_pinv", "nystrom_attention", "relative_error"]

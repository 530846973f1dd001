"""Rotary position embedding as one op: ``com.microsoft.RotaryEmbedding`` in ONNX.

    graphopt::rotary(x, cos, sin) -> x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)

``x`` is ``(batch, heads, seq, head_dim)``; ``cos`` and ``sin`` are the half tables
``(batch, seq, head_dim / 2)`` of the positions being embedded, at x's batch (transformers builds the full
tables as ``cat(freqs, freqs)``, so each half holds the same values). ``rotate_half(x)`` is
``cat(-x2, x1)`` of the two halves of the last axis (Llama / Qwen / Mistral's
non-interleaved form). In PyTorch the op computes exactly what the graph it replaces did.

The lowering gives ORT's kernel the tables of this step itself: ``cos_cache`` is ``cos``
flattened to ``(batch * seq, head_dim / 2)`` and ``position_ids`` numbers its rows, so each
row of a left-padded batch keeps its own positions (the graph computed them from
``position_ids``), where a table indexed by position would need the model's maximum length.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("graphopt::rotary", mutates_args=())
def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    c = torch.cat([cos, cos], dim=-1).unsqueeze(1)
    s = torch.cat([sin, sin], dim=-1).unsqueeze(1)
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * c + rotated * s


@rotary.register_fake
def _(x, cos, sin):
    return torch.empty_like(x)

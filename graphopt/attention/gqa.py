"""Decoder attention with its KV cache as one op: ``com.microsoft.GroupQueryAttention`` in ONNX.

    graphopt::gqa_attention(q, k, v, past_k, past_v, bias, *, scale, heads, kv_heads) -> (out, present_k, present_v)

``q`` is ``(batch, heads, seq, head_dim)`` after rotary, ``k`` and ``v`` the new tokens'
``(batch, kv_heads, seq, head_dim)``, ``past_k`` and ``past_v`` the cache ``(batch, kv_heads,
past, head_dim)``, ``bias`` the additive mask ``(batch or 1, 1, seq, past + seq)`` (causal and
padding together, as transformers builds it). In PyTorch it concatenates the cache, repeats
the kv heads and runs SDPA, which is what the graph it replaces did; in ONNX
(:mod:`graphopt.attention.lowering`) the cache update, the grouped heads and the attention are
one CPU kernel that never materialises the repeated keys.

How the lowering drives GroupQueryAttention for left-padded batches (measured on ORT 1.32's
CPU kernel; ``seqlens_k`` alone cannot express left padding): every row gets ``seqlens_k =
T - 1`` and ``total_sequence_length = T`` (T = past + seq), the padding is masked through
``attention_bias`` (a query row that sees no key, a padding position at prefill, comes out
0, here as in the kernel; SDPA would average the values there, which nothing reads), ``query_seqlens`` gives every row ``seq`` (needed for batch > 1 with
several new tokens on a cache), and rotary stays in the graph (``do_rotary=0``: GQA's own
rotary reads the positions of row 0 only at the first prompt).
"""

from __future__ import annotations

import torch


@torch.library.custom_op("graphopt::gqa_attention", mutates_args=())
def gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, bias: torch.Tensor,
                  scale: float, heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    present_k = torch.cat([past_k, k], dim=2)
    present_v = torch.cat([past_v, v], dim=2)
    groups = heads // kv_heads
    keys = present_k.repeat_interleave(groups, dim=1) if groups > 1 else present_k
    values = present_v.repeat_interleave(groups, dim=1) if groups > 1 else present_v
    out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=scale)
    # A query row that sees no key (a left-padding position at prefill) is 0, as in the kernel.
    visible = bias.any(-1, keepdim=True) if bias.dtype == torch.bool else (bias > torch.finfo(bias.dtype).min).any(-1, keepdim=True)
    return torch.where(visible, out, 0.0), present_k, present_v


@gqa_attention.register_fake
def _(q, k, v, past_k, past_v, bias, scale, heads, kv_heads):
    present = past_k.new_empty((k.shape[0], k.shape[1], past_k.shape[2] + k.shape[2], k.shape[3]))
    return torch.empty_like(q), present, torch.empty_like(present)


@torch.library.custom_op("graphopt::gqa_rotary_attention", mutates_args=())
def gqa_rotary_attention(qkv: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, bias: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         scale: float, heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`gqa_attention` on the packed projection ``qkv`` ``(batch, seq, (heads + 2 kv_heads)
    head_dim)``, with rotary (:func:`graphopt.attention.rotary.rotary`, half tables ``cos``,
    ``sin`` of ``(batch, seq, head_dim / 2)``) on its queries and keys: what the split, the head
    views and the two rotary ops it replaces computed. The attention comes out flat, ``(batch,
    seq, heads * head_dim)``, as the output projection reads it. In ONNX it is one
    GroupQueryAttention that reads the packed projection and applies rotary itself."""
    from graphopt.attention.rotary import rotary

    batch, seq, width = qkv.shape
    dim = width // (heads + 2 * kv_heads)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q = rotary(q.view(batch, seq, heads, dim).transpose(1, 2), cos, sin)
    k = rotary(k.view(batch, seq, kv_heads, dim).transpose(1, 2), cos, sin)
    v = v.view(batch, seq, kv_heads, dim).transpose(1, 2)
    out, present_k, present_v = gqa_attention(q, k, v, past_k, past_v, bias, scale, heads, kv_heads)
    return out.transpose(1, 2).reshape(batch, seq, heads * dim), present_k, present_v


@gqa_rotary_attention.register_fake
def _(qkv, past_k, past_v, bias, cos, sin, scale, heads, kv_heads):
    batch, seq, width = qkv.shape
    dim = width // (heads + 2 * kv_heads)
    present = past_k.new_empty((batch, kv_heads, past_k.shape[2] + seq, dim))
    return qkv.new_empty((batch, seq, heads * dim)), present, torch.empty_like(present)

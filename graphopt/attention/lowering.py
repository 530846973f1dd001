"""ONNX lowerings of the exact attention ops to ORT's ``com.microsoft`` kernels (imported by
the exporter through :func:`graphopt.lowerings.lowering_table`, never by the ops).

- ``graphopt::fused_attention[_biased]`` -> ``MultiHeadAttention`` on ``(batch, seq,
  heads * head_dim)`` views of SDPA-layout q, k, v (:mod:`graphopt.attention.fused`);
- ``graphopt::attention_qkv[_biased]`` -> ``Attention``: the packed projection, the bias
  and the attention in one CPU kernel (:mod:`graphopt.attention.packed`).

Both kernels take a ``(batch or 1, heads or 1, q_seq, k_seq)`` additive bias; SDPA masks
often leave the query axis at 1, so the lowerings broadcast it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from onnxscript import FLOAT, script
from onnxscript import opset18 as op
from onnxscript.values import Opset

from graphopt.attention import fused, gqa, packed, rotary  # noqa: F401  (defines the ops the lowerings are registered for)
from graphopt.lowerings import register_lowering

msft = Opset("com.microsoft", 1)


@script()
def fused_attention_onnx(q: FLOAT, k: FLOAT, v: FLOAT, scale: float, causal: bool, heads: int) -> FLOAT:
    # (b, h, s, d) -> (b, s, h * d) and back; nested script calls would not be inlined.
    flat = op.Constant(value_ints=[0, 0, -1])
    q3 = op.Reshape(op.Transpose(q, perm=[0, 2, 1, 3]), flat)
    k3 = op.Reshape(op.Transpose(k, perm=[0, 2, 1, 3]), flat)
    v3 = op.Reshape(op.Transpose(v, perm=[0, 2, 1, 3]), flat)
    out = msft.MultiHeadAttention(q3, k3, v3, num_heads=heads, scale=scale, unidirectional=causal)
    split = op.Concat(op.Constant(value_ints=[0, 0]), op.Shape(q, start=1, end=2), op.Shape(v, start=3, end=4), axis=0)
    return op.Transpose(op.Reshape(out, split), perm=[0, 2, 1, 3])


@script()
def fused_attention_biased_onnx(q: FLOAT, k: FLOAT, v: FLOAT, bias: FLOAT, scale: float, causal: bool, heads: int) -> FLOAT:
    q_seq = op.Shape(q, start=2, end=3)
    k_seq = op.Shape(k, start=2, end=3)
    full = op.Expand(bias, op.Concat(op.Constant(value_ints=[1, 1]), q_seq, k_seq, axis=0))
    flat = op.Constant(value_ints=[0, 0, -1])
    q3 = op.Reshape(op.Transpose(q, perm=[0, 2, 1, 3]), flat)
    k3 = op.Reshape(op.Transpose(k, perm=[0, 2, 1, 3]), flat)
    v3 = op.Reshape(op.Transpose(v, perm=[0, 2, 1, 3]), flat)
    out = msft.MultiHeadAttention(q3, k3, v3, None, None, full, num_heads=heads, scale=scale, unidirectional=causal)
    split = op.Concat(op.Constant(value_ints=[0, 0]), op.Shape(q, start=1, end=2), op.Shape(v, start=3, end=4), axis=0)
    return op.Transpose(op.Reshape(out, split), perm=[0, 2, 1, 3])


# qkv_sizes (qkv_hidden_sizes) lets the projection width differ from the input's (pruned heads).
@script()
def attention_qkv_onnx(x: FLOAT, w_qkv: FLOAT, bias: FLOAT, scale: float, causal: bool, heads: int, qkv_sizes: Sequence[int]) -> FLOAT:
    return msft.Attention(x, w_qkv, bias, num_heads=heads, scale=scale, unidirectional=causal, qkv_hidden_sizes=qkv_sizes)


@script()
def attention_qkv_biased_onnx(x: FLOAT, w_qkv: FLOAT, bias: FLOAT, mask: FLOAT, scale: float, causal: bool, heads: int, qkv_sizes: Sequence[int]) -> FLOAT:
    seq = op.Shape(x, start=1, end=2)
    full = op.Expand(mask, op.Concat(op.Constant(value_ints=[1, 1]), seq, seq, axis=0))
    return msft.Attention(x, w_qkv, bias, None, None, full, num_heads=heads, scale=scale, unidirectional=causal, qkv_hidden_sizes=qkv_sizes)


@script()
def gqa_attention_onnx(q: FLOAT, k: FLOAT, v: FLOAT, past_k: FLOAT, past_v: FLOAT, bias: FLOAT, scale: float, heads: int, kv_heads: int) -> tuple[FLOAT, FLOAT, FLOAT]:
    # (b, h, s, d) -> (b, s, h * d); the cache stays (b, kv_heads, T, d). See graphopt.attention.gqa.
    flat = op.Constant(value_ints=[0, 0, -1])
    q3 = op.Reshape(op.Transpose(q, perm=[0, 2, 1, 3]), flat)
    k3 = op.Reshape(op.Transpose(k, perm=[0, 2, 1, 3]), flat)
    v3 = op.Reshape(op.Transpose(v, perm=[0, 2, 1, 3]), flat)
    # The lengths come from the mask (batch, 1, seq, T) alone: every layer shares it, so ORT
    # computes them once (common subexpressions) instead of once per layer from its cache.
    batch = op.Shape(bias, start=0, end=1)
    seq = op.Shape(bias, start=2, end=3)
    total = op.Shape(bias, start=3, end=4)
    seqlens_k = op.Cast(op.Expand(op.Sub(total, op.Constant(value_ints=[1])), batch), to=6)  # int32, T - 1 for every row
    total_length = op.Cast(op.Squeeze(total), to=6)
    query_seqlens = op.Cast(op.Expand(seq, batch), to=6)
    out, present_k, present_v = msft.GroupQueryAttention(q3, k3, v3, past_k, past_v, seqlens_k, total_length, None, None, None, bias,
                                                         None, None, None, None, None, query_seqlens,
                                                         num_heads=heads, kv_num_heads=kv_heads, scale=scale)
    split = op.Concat(op.Constant(value_ints=[0, 0]), op.Shape(q, start=1, end=2), op.Shape(q, start=3, end=4), axis=0)
    return op.Transpose(op.Reshape(out, split), perm=[0, 2, 1, 3]), present_k, present_v


@script()
def gqa_rotary_attention_onnx(qkv: FLOAT, past_k: FLOAT, past_v: FLOAT, bias: FLOAT, cos: FLOAT, sin: FLOAT, scale: float, heads: int,
                              kv_heads: int) -> tuple[FLOAT, FLOAT, FLOAT]:
    # GroupQueryAttention on the packed projection, rotary inside (do_rotary). Lengths as in
    # gqa_attention_onnx. The rotary tables are this step's own rows, (batch * seq, head_dim / 2),
    # numbered by position_ids (as rotary_onnx gives RotaryEmbedding), so each row of a
    # left-padded batch keeps its positions; the kernel wants at least total_sequence_length
    # rows, so zero rows pad them to that (they are never indexed).
    batch = op.Shape(bias, start=0, end=1)
    seq = op.Shape(bias, start=2, end=3)
    total = op.Shape(bias, start=3, end=4)
    seqlens_k = op.Cast(op.Expand(op.Sub(total, op.Constant(value_ints=[1])), batch), to=6)
    total_length = op.Cast(op.Squeeze(total), to=6)
    query_seqlens = op.Cast(op.Expand(seq, batch), to=6)
    rows = op.Concat(op.Constant(value_ints=[-1]), op.Shape(cos, start=2, end=3), axis=0)
    cos_rows = op.Reshape(cos, rows)
    sin_rows = op.Reshape(sin, rows)
    extra = op.Max(op.Sub(total, op.Shape(cos_rows, start=0, end=1)), op.Constant(value_ints=[0]))
    pads = op.Concat(op.Constant(value_ints=[0, 0]), extra, op.Constant(value_ints=[0]), axis=0)
    count = op.ReduceProd(op.Shape(cos, start=0, end=2), keepdims=1)
    positions = op.Reshape(op.Range(op.Constant(value_int=0), op.Squeeze(count), op.Constant(value_int=1)), op.Shape(cos, start=0, end=2))
    out, present_k, present_v = msft.GroupQueryAttention(qkv, None, None, past_k, past_v, seqlens_k, total_length, op.Pad(cos_rows, pads),
                                                         op.Pad(sin_rows, pads), positions, bias, None, None, None, None, None, query_seqlens,
                                                         num_heads=heads, kv_num_heads=kv_heads, scale=scale, do_rotary=1, rotary_interleaved=0)
    return out, present_k, present_v  # (batch, seq, heads * head_dim), as the op returns it


@script()
def rotary_onnx(x: FLOAT, cos: FLOAT, sin: FLOAT) -> FLOAT:
    # this step's own tables, one row per (batch, position): see graphopt.attention.rotary.
    # The kernel runs on (batch, seq, heads * dim): ORT cancels the transposes around it with
    # the ones that made x (batch, heads, seq, dim) and the ones GroupQueryAttention's lowering adds.
    rows = op.Constant(value_ints=[-1])
    table = op.Concat(rows, op.Shape(cos, start=2, end=3), axis=0)
    count = op.ReduceProd(op.Shape(cos, start=0, end=2), keepdims=1)
    positions = op.Reshape(op.Range(op.Constant(value_int=0), op.Squeeze(count), op.Constant(value_int=1)), op.Shape(cos, start=0, end=2))
    flat = op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))
    turned = msft.RotaryEmbedding(flat, positions, op.Reshape(cos, table), op.Reshape(sin, table), interleaved=0)
    split = op.Concat(op.Constant(value_ints=[0, 0]), op.Shape(x, start=1, end=2), op.Shape(x, start=3, end=4), axis=0)
    return op.Transpose(op.Reshape(turned, split), perm=[0, 2, 1, 3])


custom = torch.ops.graphopt
register_lowering(custom.rotary.default, rotary_onnx)
register_lowering(custom.gqa_attention.default, gqa_attention_onnx)
register_lowering(custom.gqa_rotary_attention.default, gqa_rotary_attention_onnx)
register_lowering(custom.fused_attention.default, fused_attention_onnx)
register_lowering(custom.fused_attention_biased.default, fused_attention_biased_onnx)
register_lowering(custom.attention_qkv.default, attention_qkv_onnx)
register_lowering(custom.attention_qkv_biased.default, attention_qkv_biased_onnx)

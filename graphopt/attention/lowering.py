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

from graphopt.attention import fused, packed  # noqa: F401  (defines the ops the lowerings are registered for)
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


custom = torch.ops.graphopt
register_lowering(custom.fused_attention.default, fused_attention_onnx)
register_lowering(custom.fused_attention_biased.default, fused_attention_biased_onnx)
register_lowering(custom.attention_qkv.default, attention_qkv_onnx)
register_lowering(custom.attention_qkv_biased.default, attention_qkv_biased_onnx)

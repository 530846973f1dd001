"""``aten.scaled_dot_product_attention`` with a boolean mask: a query row that may attend to
no key gives 0, as in PyTorch.

torch.onnx lowers SDPA through onnxscript's torch_lib, which fills masked scores with the
dtype's lowest value rather than -inf: a row whose mask is all False then gets a uniform
softmax and returns mean(V), where PyTorch returns 0. Such rows occur in decoders with SDPA
attention on padded batches: left padding (the padded query rows of a causal mask see no
key) and sliding windows shorter than a padding run (Mistral, Qwen2). Measured on a tiny
Mistral (sliding_window 8) on a (3, 19) right-padded batch: max abs 0.66 between ORT and the
program before, 4.8e-7 after. Only boolean masks change: the product below is exact (x 1 or
x 0) and float masks, which carry -inf themselves, keep torch_lib's lowering untouched.
"""

from __future__ import annotations

import torch
from onnxscript import ir
from onnxscript import opset18 as op
from onnxscript.function_libs.torch_lib.ops.nn import aten_scaled_dot_product_attention

from graphopt.lowerings import register_lowering


def sdpa_zero_for_masked_rows(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    out = aten_scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    if attn_mask is None or attn_mask.dtype != ir.DataType.BOOL:
        return out
    # 1 where the query row sees at least one key, 0 where its whole row is masked
    sees_a_key = op.ReduceMax(op.Cast(attn_mask, to=ir.DataType.FLOAT), op.Constant(value_ints=[-1]), keepdims=1)
    return op.Mul(out, op.CastLike(sees_a_key, out))


register_lowering(torch.ops.aten.scaled_dot_product_attention.default, sdpa_zero_for_masked_rows)

"""ONNX lowerings of the quantized-linear ops to ONNX Runtime's integer kernels.

Registered with :func:`graphopt.lowerings.register_lowering` when graphopt.export collects the lowerings, so ``to_onnx`` applies
them to any program that holds the ops. Each is an ``onnxscript.script`` function (with a
return annotation, which the exporter needs to count outputs).
"""

from __future__ import annotations

import onnxscript
import torch
from onnxscript import FLOAT, INT8, INT64, UINT8
from onnxscript import opset18 as op

from graphopt.lowerings import register_lowering
from graphopt.quant import ops  # noqa: F401  (defines the torch.ops.graphopt ops)

msft = onnxscript.values.Opset("com.microsoft", 1)


@onnxscript.script(default_opset=op)
def dynamic_int8(x: FLOAT, w_q: INT8, w_scale: FLOAT, bias: FLOAT) -> FLOAT:
    # One kernel: quantize x to uint8, u8 x s8 integer GEMM, scale per column, add bias.
    return msft.DynamicQuantizeMatMul(x, w_q, w_scale, None, bias)


@onnxscript.script(default_opset=op)
def static_int8(x: FLOAT, x_scale: FLOAT, x_zero_point: UINT8, w_q: INT8, w_scale: FLOAT, w_zero_point: INT8, bias: FLOAT) -> FLOAT:
    # QuantizeLinear with the calibrated scale, then the integer kernel that dequantizes its
    # int32 result. (The QDQ spelling, DQ -> MatMul <- DQ, is fused into the same kernel by
    # ORT only for 3-D inputs: on 2-D ones MatMul + Add becomes a Gemm first and stays fp32.)
    x_q = op.QuantizeLinear(x, x_scale, x_zero_point)
    return msft.MatMulIntegerToFloat(x_q, w_q, x_scale, w_scale, x_zero_point, w_zero_point, bias)


@onnxscript.script(default_opset=op)
def nbits(
    x: FLOAT, w_packed: UINT8, scales: FLOAT, zero_points: UINT8, bias: FLOAT, K: int, N: int, bits: int, block_size: int, accuracy_level: int
) -> FLOAT:
    return msft.MatMulNBits(
        x, w_packed, scales, zero_points, None, bias, K=K, N=N, bits=bits, block_size=block_size, accuracy_level=accuracy_level
    )


@onnxscript.script(default_opset=op)
def bias_gelu(x: FLOAT, bias: FLOAT) -> FLOAT:
    return msft.BiasGelu(x, bias)


@onnxscript.script(default_opset=op)
def embedding_int8(table_q: INT8, scales: FLOAT, indices: INT64) -> FLOAT:
    rows = op.Cast(op.Gather(table_q, indices), to=1)
    return op.Mul(rows, op.Gather(scales, indices))


@onnxscript.script(default_opset=op)
def embedding_nbits(table_packed: UINT8, scales: FLOAT, zero_points: UINT8, indices: INT64, block_size: int, bits: int) -> FLOAT:
    return msft.GatherBlockQuantized(table_packed, indices, scales, zero_points, gather_axis=0, quantize_axis=1, block_size=block_size, bits=bits)


@onnxscript.script(default_opset=op)
def refine_topk_int8(coarse: FLOAT, x: FLOAT, table_q: INT8, scales: FLOAT, k: int) -> FLOAT:
    # TopK picks the candidates, Gather + Cast + Mul dequantize their rows, one batched MatMul
    # takes the dot products, ScatterElements writes them over the coarse logits.
    _, index = op.TopK(coarse, op.Reshape(op.Constant(value_int=k), op.Constant(value_ints=[1])), axis=-1, largest=1, sorted=0)
    rows = op.Mul(op.Cast(op.Gather(table_q, index), to=1), op.Gather(scales, index))
    fine = op.Squeeze(op.MatMul(rows, op.Unsqueeze(x, op.Constant(value_ints=[-1]))), op.Constant(value_ints=[-1]))
    return op.ScatterElements(coarse, index, fine, axis=-1)


@onnxscript.script(default_opset=op)
def attention_int8(x: FLOAT, w_qkv: INT8, w_scale: FLOAT, bias: FLOAT, mask: FLOAT, num_heads: int, scale: float) -> FLOAT:
    # One integer GEMM for Q, K and V, then ORT's fused attention on [B, S, hidden] inputs.
    qkv = msft.DynamicQuantizeMatMul(x, w_qkv, w_scale, None, bias)
    q, k, v = op.Split(qkv, axis=-1, num_outputs=3)
    return msft.MultiHeadAttention(q, k, v, None, None, mask, num_heads=num_heads, scale=scale)


@onnxscript.script(default_opset=op)
def attention_static_int8(
    x: FLOAT, x_scale: FLOAT, x_zero_point: UINT8, w_qkv: INT8, w_scale: FLOAT, w_zero_point: INT8, bias: FLOAT, mask: FLOAT, num_heads: int, scale: float
) -> FLOAT:
    # One QuantizeLinear and one integer GEMM for Q, K and V, then ORT's fused attention.
    x_q = op.QuantizeLinear(x, x_scale, x_zero_point)
    qkv = msft.MatMulIntegerToFloat(x_q, w_qkv, x_scale, w_scale, x_zero_point, w_zero_point, bias)
    q, k, v = op.Split(qkv, axis=-1, num_outputs=3)
    return msft.MultiHeadAttention(q, k, v, None, None, mask, num_heads=num_heads, scale=scale)


_ops = torch.ops.graphopt
register_lowering(_ops.linear_dynamic_int8.default, dynamic_int8)
register_lowering(_ops.linear_static_int8.default, static_int8)
register_lowering(_ops.linear_nbits.default, nbits)
register_lowering(_ops.embedding_int8.default, embedding_int8)
register_lowering(_ops.bias_gelu.default, bias_gelu)
register_lowering(_ops.embedding_nbits.default, embedding_nbits)
register_lowering(_ops.refine_topk_int8.default, refine_topk_int8)
register_lowering(_ops.attention_int8.default, attention_int8)
register_lowering(_ops.attention_static_int8.default, attention_static_int8)

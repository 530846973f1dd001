"""ONNX lowering of ``graphopt::nystrom_attention`` in standard ops (imported by the exporter).

The ``threshold`` choice is an ``If`` on the runtime sequence length, so one exported graph
serves every length.
"""

from __future__ import annotations

import torch
from onnxscript import FLOAT, script
from onnxscript import opset18 as op

import graphopt.attention.nystrom  # noqa: F401  (defines the op the lowering is registered for)
from graphopt.lowerings import register_lowering

FLOAT_MIN = float(torch.finfo(torch.float32).min)


@script()
def nystrom_attention_onnx(q: FLOAT, k: FLOAT, v: FLOAT, key_bias: FLOAT, scale: float, landmarks: int, iterations: int, threshold: int) -> FLOAT:
    n = op.Shape(q, start=2, end=3)
    n0 = op.Squeeze(n)
    scale_t = op.CastLike(op.Constant(value_float=scale), q)
    k_t = op.Transpose(k, perm=[0, 1, 3, 2])
    if op.Greater(n0, op.Constant(value_int=threshold)):
        # Landmark i averages the valid tokens of [floor(i n / m), floor((i + 1) n / m)).
        m = op.Min(n0, op.Constant(value_int=landmarks))
        zero = op.Constant(value_int=0)
        one = op.Constant(value_int=1)
        bounds = op.Div(op.Mul(op.Range(zero, op.Add(m, one), one), n0), m)
        lo = op.Unsqueeze(op.Slice(bounds, op.Constant(value_ints=[0]), op.Constant(value_ints=[-1])), op.Constant(value_ints=[1]))
        hi = op.Unsqueeze(op.Slice(bounds, op.Constant(value_ints=[1]), op.Constant(value_ints=[9223372036854775807])), op.Constant(value_ints=[1]))
        position = op.Unsqueeze(op.Range(zero, n0, one), op.Constant(value_ints=[0]))
        member = op.CastLike(op.And(op.GreaterOrEqual(position, lo), op.Less(position, hi)), q)  # (m, n)
        valid = op.CastLike(op.Greater(key_bias, op.CastLike(op.Constant(value_float=-1e4), q)), q)  # (b, 1, 1, n or 1)
        weights = op.Mul(member, valid)  # (b, 1, m, n)
        counts = op.ReduceSum(weights, op.Constant(value_ints=[-1]), keepdims=1)
        average = op.Div(weights, op.Max(counts, op.CastLike(op.Constant(value_float=1.0), q)))
        landmark_bias = op.Transpose(
            op.Where(op.Greater(counts, op.CastLike(op.Constant(value_float=0.0), q)), op.CastLike(op.Constant(value_float=0.0), q), op.CastLike(op.Constant(value_float=FLOAT_MIN), q)),
            perm=[0, 1, 3, 2],
        )
        q_l = op.MatMul(average, q)
        k_l_t = op.Transpose(op.MatMul(average, k), perm=[0, 1, 3, 2])
        kernel_q = op.Softmax(op.Add(op.Mul(op.MatMul(q, k_l_t), scale_t), landmark_bias), axis=-1)
        landmark_valid = op.CastLike(op.Greater(counts, op.CastLike(op.Constant(value_float=0.0), q)), q)
        kernel_l = op.Mul(op.Softmax(op.Add(op.Mul(op.MatMul(q_l, k_l_t), scale_t), landmark_bias), axis=-1), landmark_valid)
        kernel_k = op.Softmax(op.Add(op.Mul(op.MatMul(q_l, k_t), scale_t), key_bias), axis=-1)
        # Newton–Schulz pseudo-inverse of kernel_l (see reference.newton_pinv).
        eye = op.CastLike(op.EyeLike(op.ConstantOfShape(op.Concat(op.Unsqueeze(m, op.Constant(value_ints=[0])), op.Unsqueeze(m, op.Constant(value_ints=[0])), axis=0))), q)
        magnitude = op.Abs(kernel_l)
        norm = op.Mul(
            op.ReduceMax(op.ReduceSum(magnitude, op.Constant(value_ints=[-2]), keepdims=1), op.Constant(value_ints=[-1]), keepdims=1),
            op.ReduceMax(op.ReduceSum(magnitude, op.Constant(value_ints=[-1]), keepdims=1), op.Constant(value_ints=[-2]), keepdims=1),
        )
        z = op.Div(op.Transpose(kernel_l, perm=[0, 1, 3, 2]), norm)
        c7 = op.Mul(eye, op.CastLike(op.Constant(value_float=7.0), q))
        c13 = op.Mul(eye, op.CastLike(op.Constant(value_float=13.0), q))
        c15 = op.Mul(eye, op.CastLike(op.Constant(value_float=15.0), q))
        quarter = op.CastLike(op.Constant(value_float=0.25), q)
        for _ in range(iterations):
            az = op.MatMul(kernel_l, z)
            z = op.Mul(quarter, op.MatMul(z, op.Sub(c13, op.MatMul(az, op.Sub(c15, op.MatMul(az, op.Sub(c7, az)))))))
        out = op.MatMul(kernel_q, op.MatMul(z, op.MatMul(kernel_k, v)))
    else:
        out = op.MatMul(op.Softmax(op.Add(op.Mul(op.MatMul(q, k_t), scale_t), key_bias), axis=-1), v)
    return out


register_lowering(torch.ops.graphopt.nystrom_attention.default, nystrom_attention_onnx)

"""ONNX lowerings of ``graphopt::linformer_attention`` and ``graphopt::nystrom_learned_attention``
in standard ops (imported by the exporter).

The same computation as :func:`graphopt.attention.pooled.linformer_reference` and
:func:`~graphopt.attention.pooled.nystrom_learned_reference`: the learned (m, n_max)
matrix is sliced to the runtime length, padded keys' columns are zeroed, rows are divided
by their L1 norm (rows left empty get the landmark bias). The ``threshold`` choice is an
``If`` on the runtime sequence length, so one exported graph serves every length. A length
above n_max fails in ONNX Runtime (the sliced matrix has n_max columns, the MatMul with the
n keys cannot broadcast); the eager op raises ``ValueError``.
"""

from __future__ import annotations

import torch
from onnxscript import FLOAT, script
from onnxscript import opset18 as op

import graphopt.attention.pooled  # noqa: F401  (defines the ops the lowerings are registered for)
from graphopt.lowerings import register_lowering

FLOAT_MIN = float(torch.finfo(torch.float32).min)


@script()
def linformer_attention_onnx(q: FLOAT, k: FLOAT, v: FLOAT, key_bias: FLOAT, proj_k: FLOAT, proj_v: FLOAT, scale: float, threshold: int) -> FLOAT:
    n1 = op.Shape(q, start=2, end=3)
    n = op.Squeeze(n1)
    scale_t = op.CastLike(op.Constant(value_float=scale), q)
    if op.Greater(n, op.Constant(value_int=threshold)):
        zero_f = op.CastLike(op.Constant(value_float=0.0), q)
        one_f = op.CastLike(op.Constant(value_float=1.0), q)
        last1 = op.Constant(value_ints=[-1])
        valid = op.CastLike(op.Greater(key_bias, op.CastLike(op.Constant(value_float=-1e4), q)), q)  # (b, 1, 1, n or 1)
        # pooling: the first n columns, padded keys zeroed, rows divided by their L1 norm
        weights_k = op.Mul(op.Slice(op.CastLike(proj_k, q), op.Constant(value_ints=[0]), n1, op.Constant(value_ints=[1])), valid)  # (b, 1, m, n)
        weights_v = op.Mul(op.Slice(op.CastLike(proj_v, q), op.Constant(value_ints=[0]), n1, op.Constant(value_ints=[1])), valid)
        norm_k = op.ReduceSum(op.Abs(weights_k), last1, keepdims=1)  # (b, 1, m, 1)
        norm_v = op.ReduceSum(op.Abs(weights_v), last1, keepdims=1)
        present_k = op.Greater(norm_k, zero_f)
        present_v = op.Greater(norm_v, zero_f)
        pool_k = op.Div(weights_k, op.Where(present_k, norm_k, one_f))
        pool_v = op.Div(weights_v, op.Where(present_v, norm_v, one_f))
        landmark_bias = op.Transpose(op.Where(op.And(present_k, present_v), zero_f, op.CastLike(op.Constant(value_float=FLOAT_MIN), q)), perm=[0, 1, 3, 2])  # (b, 1, 1, m)
        k_l_t = op.Transpose(op.MatMul(pool_k, k), perm=[0, 1, 3, 2])
        v_l = op.MatMul(pool_v, v)
        out = op.MatMul(op.Softmax(op.Add(op.Mul(op.MatMul(q, k_l_t), scale_t), landmark_bias), axis=-1), v_l)
    else:
        out = op.MatMul(op.Softmax(op.Add(op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), scale_t), key_bias), axis=-1), v)
    return out


@script()
def nystrom_learned_attention_onnx(q: FLOAT, k: FLOAT, v: FLOAT, key_bias: FLOAT, pool: FLOAT, scale: float, iterations: int, threshold: int) -> FLOAT:
    n1 = op.Shape(q, start=2, end=3)
    n = op.Squeeze(n1)
    scale_t = op.CastLike(op.Constant(value_float=scale), q)
    k_t = op.Transpose(k, perm=[0, 1, 3, 2])
    if op.Greater(n, op.Constant(value_int=threshold)):
        zero_f = op.CastLike(op.Constant(value_float=0.0), q)
        one_f = op.CastLike(op.Constant(value_float=1.0), q)
        last1 = op.Constant(value_ints=[-1])
        valid = op.CastLike(op.Greater(key_bias, op.CastLike(op.Constant(value_float=-1e4), q)), q)  # (b, 1, 1, n or 1)
        # learned landmarks: the first n columns, padded keys zeroed, rows divided by their L1 norm
        weights = op.Mul(op.Slice(op.CastLike(pool, q), op.Constant(value_ints=[0]), n1, op.Constant(value_ints=[1])), valid)  # (b, 1, m, n)
        norm = op.ReduceSum(op.Abs(weights), last1, keepdims=1)  # (b, 1, m, 1)
        present = op.Greater(norm, zero_f)
        average = op.Div(weights, op.Where(present, norm, one_f))
        landmark_bias = op.Transpose(op.Where(present, zero_f, op.CastLike(op.Constant(value_float=FLOAT_MIN), q)), perm=[0, 1, 3, 2])  # (b, 1, 1, m)
        landmark_valid = op.CastLike(present, q)
        q_l = op.MatMul(average, q)
        k_l_t = op.Transpose(op.MatMul(average, k), perm=[0, 1, 3, 2])
        kernel_q = op.Softmax(op.Add(op.Mul(op.MatMul(q, k_l_t), scale_t), landmark_bias), axis=-1)
        kernel_l = op.Mul(op.Softmax(op.Add(op.Mul(op.MatMul(q_l, k_l_t), scale_t), landmark_bias), axis=-1), landmark_valid)
        kernel_k = op.Softmax(op.Add(op.Mul(op.MatMul(q_l, k_t), scale_t), key_bias), axis=-1)
        # Newton–Schulz pseudo-inverse of kernel_l (see reference.newton_pinv).
        m1 = op.Shape(pool, start=0, end=1)
        eye = op.CastLike(op.EyeLike(op.ConstantOfShape(op.Concat(m1, m1, axis=0))), q)
        magnitude = op.Abs(kernel_l)
        norm_l = op.Mul(
            op.ReduceMax(op.ReduceSum(magnitude, op.Constant(value_ints=[-2]), keepdims=1), last1, keepdims=1),
            op.ReduceMax(op.ReduceSum(magnitude, last1, keepdims=1), op.Constant(value_ints=[-2]), keepdims=1),
        )
        z = op.Div(op.Transpose(kernel_l, perm=[0, 1, 3, 2]), norm_l)
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


register_lowering(torch.ops.graphopt.linformer_attention.default, linformer_attention_onnx)
register_lowering(torch.ops.graphopt.nystrom_learned_attention.default, nystrom_learned_attention_onnx)

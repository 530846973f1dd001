"""LSH (bucketed) attention as a custom op with an ONNX lowering in standard ops::

    graphopt::lsh_attention(q, k, v, key_bias, rotations, *, scale, chunk, causal, threshold)

``rotations`` (rounds, head_dim, buckets / 2) are the random projections of angular LSH,
stored with the model as a constant; all-zero rotations mean one bucket. Sorting is
``TopK(largest=0)`` on ``bucket * n + position`` in ONNX, ``argsort`` in PyTorch; both
give the same order because the keys are distinct. At most ``threshold`` tokens the op is
exact attention (an ``If`` on the runtime length in ONNX).
"""

from __future__ import annotations

import torch
from onnxscript import FLOAT, script
from onnxscript import opset18 as op

from graphopt.attention import reference
from graphopt.export.lowerings import register_lowering

FLOAT_MIN = float(torch.finfo(torch.float32).min)


@torch.library.custom_op("graphopt::lsh_attention", mutates_args=())
def lsh_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor, rotations: torch.Tensor, scale: float, chunk: int, causal: bool, threshold: int
) -> torch.Tensor:
    return reference.lsh_attention(q, k, v, key_bias, rotations, scale, chunk, causal, threshold)


@lsh_attention.register_fake
def _(q, k, v, key_bias, rotations, scale, chunk, causal, threshold):
    return torch.empty_like(q)


@script()
def lsh_attention_onnx(q: FLOAT, k: FLOAT, v: FLOAT, key_bias: FLOAT, rotations: FLOAT, scale: float, chunk: int, causal: bool, threshold: int) -> FLOAT:
    n1 = op.Shape(q, start=2, end=3)
    n = op.Squeeze(n1)
    low = op.CastLike(op.Constant(value_float=FLOAT_MIN), q)
    scale_t = op.CastLike(op.Constant(value_float=scale), q)
    causal_t = op.Cast(op.Constant(value_int=causal), to=9)
    axis_last = op.Constant(value_ints=[-1])
    bhn = op.Shape(q, start=0, end=3)
    d1 = op.Shape(q, start=3, end=4)
    if op.Greater(n, op.Constant(value_int=threshold)):
        one = op.Constant(value_int=1)
        one1 = op.Constant(value_ints=[1])
        c = op.Min(n, op.Constant(value_int=chunk))
        chunks = op.Div(op.Sub(op.Add(n, c), one), c)
        total = op.Mul(chunks, c)
        c1 = op.Unsqueeze(c, op.Constant(value_ints=[0]))
        chunks1 = op.Unsqueeze(chunks, op.Constant(value_ints=[0]))
        total1 = op.Unsqueeze(total, op.Constant(value_ints=[0]))
        position = op.Range(op.Constant(value_int=0), n, one)
        rot = op.Unsqueeze(rotations, op.Constant(value_ints=[1, 2]))  # (r, 1, 1, d, buckets / 2)
        eps = op.CastLike(op.Constant(value_float=1e-6), q)
        # sorted orders (r, b, h, total), padded with index n (a dummy token)
        q_proj = op.MatMul(op.Unsqueeze(op.Div(q, op.Max(op.ReduceL2(q, axis_last, keepdims=1), eps)), op.Constant(value_ints=[0])), rot)
        q_key = op.Add(op.Mul(op.ArgMax(op.Concat(q_proj, op.Neg(q_proj), axis=-1), axis=-1, keepdims=0), n), position)
        q_sorted, q_order0 = op.TopK(q_key, n1, axis=-1, largest=0, sorted=1)
        k_proj = op.MatMul(op.Unsqueeze(op.Div(k, op.Max(op.ReduceL2(k, axis_last, keepdims=1), eps)), op.Constant(value_ints=[0])), rot)
        k_key = op.Add(op.Mul(op.ArgMax(op.Concat(k_proj, op.Neg(k_proj), axis=-1), axis=-1, keepdims=0), n), position)
        k_sorted, k_order0 = op.TopK(k_key, n1, axis=-1, largest=0, sorted=1)
        rbh = op.Shape(q_order0, start=0, end=3)
        dummies = op.Expand(n, op.Concat(rbh, op.Sub(total1, n1), axis=0))
        q_order = op.Concat(q_order0, dummies, axis=-1)
        k_order = op.Concat(k_order0, dummies, axis=-1)
        # rows gathered in sorted order; index n reads a zero row
        zero_row = op.Expand(op.CastLike(op.Constant(value_float=0.0), q), op.Concat(op.Shape(q, start=0, end=2), one1, d1, axis=0))
        rbhn1d = op.Concat(rbh, op.Add(n1, one1), d1, axis=0)
        q_ext = op.Expand(op.Unsqueeze(op.Concat(q, zero_row, axis=2), op.Constant(value_ints=[0])), rbhn1d)
        k_ext = op.Expand(op.Unsqueeze(op.Concat(k, zero_row, axis=2), op.Constant(value_ints=[0])), rbhn1d)
        v_ext = op.Expand(op.Unsqueeze(op.Concat(v, zero_row, axis=2), op.Constant(value_ints=[0])), rbhn1d)
        rbhtd = op.Concat(rbh, total1, d1, axis=0)
        q_index = op.Expand(op.Unsqueeze(q_order, axis_last), rbhtd)
        k_index = op.Expand(op.Unsqueeze(k_order, axis_last), rbhtd)
        split = op.Concat(op.Constant(value_ints=[0, 0, 0]), chunks1, c1, op.Constant(value_ints=[-1]), axis=0)
        split_scalar = op.Concat(op.Constant(value_ints=[0, 0, 0]), chunks1, c1, axis=0)
        qs = op.Reshape(op.GatherElements(q_ext, q_index, axis=3), split)
        ks_now = op.Reshape(op.GatherElements(k_ext, k_index, axis=3), split)
        vs_now = op.Reshape(op.GatherElements(v_ext, k_index, axis=3), split)
        own_k = op.Reshape(op.GatherElements(k_ext, q_index, axis=3), split)
        own_v = op.Reshape(op.GatherElements(v_ext, q_index, axis=3), split)
        # key bias per token, a dummy column of -inf-like at index n
        bias = op.Expand(op.Squeeze(key_bias, op.Constant(value_ints=[2])), bhn)
        bias = op.Concat(bias, op.Expand(low, op.Concat(op.Shape(q, start=0, end=2), one1, axis=0)), axis=-1)
        bias = op.Expand(op.Unsqueeze(bias, op.Constant(value_ints=[0])), op.Concat(rbh, op.Add(n1, one1), axis=0))
        kb_now = op.Reshape(op.GatherElements(bias, k_order, axis=3), split_scalar)
        own_bias = op.Reshape(op.GatherElements(bias, q_order, axis=3), split_scalar)
        kp_now = op.Reshape(k_order, split_scalar)
        q_pos = op.Reshape(q_order, split_scalar)
        # each chunk of keys with the one before it (cyclic): axis 3 is the chunk axis
        first = op.Constant(value_ints=[0])
        last = op.Constant(value_ints=[-1])
        big = op.Constant(value_ints=[9223372036854775807])
        chunk_axis = op.Constant(value_ints=[3])
        ks = op.Concat(op.Concat(op.Slice(ks_now, last, big, chunk_axis), op.Slice(ks_now, first, last, chunk_axis), axis=3), ks_now, axis=4)
        vs = op.Concat(op.Concat(op.Slice(vs_now, last, big, chunk_axis), op.Slice(vs_now, first, last, chunk_axis), axis=3), vs_now, axis=4)
        kb = op.Concat(op.Concat(op.Slice(kb_now, last, big, chunk_axis), op.Slice(kb_now, first, last, chunk_axis), axis=3), kb_now, axis=4)
        kp = op.Concat(op.Concat(op.Slice(kp_now, last, big, chunk_axis), op.Slice(kp_now, first, last, chunk_axis), axis=3), kp_now, axis=4)
        scores = op.Add(op.Mul(op.MatMul(qs, op.Transpose(ks, perm=[0, 1, 2, 3, 5, 4])), scale_t), op.Unsqueeze(kb, op.Constant(value_ints=[-2])))
        kp_row = op.Unsqueeze(kp, op.Constant(value_ints=[-2]))
        qp_col = op.Unsqueeze(q_pos, axis_last)
        hidden = op.Equal(kp_row, qp_col)
        duplicate = op.And(op.Equal(chunks, one), op.Less(op.Range(op.Constant(value_int=0), op.Mul(c, op.Constant(value_int=2)), one), c))
        hidden = op.Or(hidden, duplicate)
        hidden = op.Or(hidden, op.And(causal_t, op.Greater(kp_row, qp_col)))
        scores = op.Where(hidden, low, scores)
        own = op.Add(op.Mul(op.ReduceSum(op.Mul(qs, own_k), axis_last, keepdims=1), scale_t), op.Unsqueeze(own_bias, axis_last))
        scores = op.Concat(scores, own, axis=-1)
        peak = op.ReduceMax(scores, axis_last, keepdims=1)
        lse = op.Add(peak, op.Log(op.ReduceSum(op.Exp(op.Sub(scores, peak)), axis_last, keepdims=1)))
        probs = op.Exp(op.Sub(scores, lse))
        out = op.Add(op.MatMul(op.Slice(probs, first, last, axis_last), vs), op.Mul(op.Slice(probs, last, big, axis_last), own_v))
        # back to token order; rounds merged by the softmax of their log-sum-exps
        inv_sorted, inverse_all = op.TopK(q_order, total1, axis=-1, largest=0, sorted=1)
        inverse = op.Slice(inverse_all, first, n1, axis_last)
        out = op.GatherElements(op.Reshape(out, rbhtd), op.Expand(op.Unsqueeze(inverse, axis_last), op.Concat(rbh, n1, d1, axis=0)), axis=3)
        lse = op.GatherElements(op.Reshape(lse, op.Concat(rbh, total1, axis=0)), inverse, axis=3)
        weights = op.Unsqueeze(op.Softmax(lse, axis=0), axis_last)
        result = op.ReduceSum(op.Mul(out, weights), op.Constant(value_ints=[0]), keepdims=0)
    else:
        scores = op.Add(op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), scale_t), key_bias)
        square = op.Concat(n1, n1, axis=0)
        keep = op.Cast(op.Trilu(op.Expand(op.Constant(value_int=1), square), upper=0), to=9)
        scores = op.Where(op.Or(keep, op.Not(causal_t)), scores, low)
        result = op.MatMul(op.Softmax(scores, axis=-1), v)
    return result


register_lowering(torch.ops.graphopt.lsh_attention.default, lsh_attention_onnx)

"""ONNX lowering of ``graphopt::lsh_attention`` in standard ops (imported by the exporter).

Sorting is ``TopK(largest=0)`` on ``bucket * n + position`` in ONNX, ``argsort`` in PyTorch;
both give the same order because the keys are distinct. At most ``threshold`` tokens the
op is exact attention: an ``If`` on the runtime length, so one graph serves every length.
"""

from __future__ import annotations

import torch
from onnxscript import FLOAT, script
from onnxscript import opset18 as op

import graphopt.attention.lsh  # noqa: F401  (defines the op the lowering is registered for)
from graphopt.lowerings import register_lowering

FLOAT_MIN = float(torch.finfo(torch.float32).min)


@script()
def lsh_attention_onnx(q: FLOAT, k: FLOAT, v: FLOAT, key_bias: FLOAT, rotations: FLOAT, scale: float, chunk: int, threshold: int) -> FLOAT:
    n1 = op.Shape(q, start=2, end=3)
    n = op.Squeeze(n1)
    low = op.CastLike(op.Constant(value_float=FLOAT_MIN), q)
    scale_t = op.CastLike(op.Constant(value_float=scale), q)
    axis_last = op.Constant(value_ints=[-1])
    if op.Greater(n, op.Constant(value_int=threshold)):
        zero = op.Constant(value_int=0)
        one = op.Constant(value_int=1)
        one1 = op.Constant(value_ints=[1])
        c = op.Min(n, op.Constant(value_int=chunk))
        chunks = op.Div(op.Sub(op.Add(n, c), one), c)
        total1 = op.Unsqueeze(op.Mul(chunks, c), op.Constant(value_ints=[0]))
        d1 = op.Shape(q, start=3, end=4)
        rounds1 = op.Shape(rotations, start=0, end=1)
        position = op.Range(zero, n, one)
        rot = op.Unsqueeze(rotations, op.Constant(value_ints=[1, 2]))  # (r, 1, 1, d, buckets / 2)
        eps = op.CastLike(op.Constant(value_float=1e-6), q)
        # sorted orders (r, b, h, total): positions by (bucket, position), padded with n (a dummy)
        q_proj = op.MatMul(op.Unsqueeze(op.Div(q, op.Max(op.ReduceL2(q, axis_last, keepdims=1), eps)), op.Constant(value_ints=[0])), rot)
        q_key = op.Add(op.Mul(op.ArgMax(op.Concat(q_proj, op.Neg(q_proj), axis=-1), axis=-1, keepdims=0), n), position)
        _q_sorted, q_order0 = op.TopK(q_key, n1, axis=-1, largest=0, sorted=1)
        k_proj = op.MatMul(op.Unsqueeze(op.Div(k, op.Max(op.ReduceL2(k, axis_last, keepdims=1), eps)), op.Constant(value_ints=[0])), rot)
        k_key = op.Add(op.Mul(op.ArgMax(op.Concat(k_proj, op.Neg(k_proj), axis=-1), axis=-1, keepdims=0), n), position)
        _k_sorted, k_order0 = op.TopK(k_key, n1, axis=-1, largest=0, sorted=1)
        rbh = op.Shape(q_order0, start=0, end=3)
        dummies = op.Expand(n, op.Concat(rbh, op.Sub(total1, n1), axis=0))
        q_order = op.Concat(q_order0, dummies, axis=-1)
        k_order = op.Concat(k_order0, dummies, axis=-1)
        # rows in sorted order: Gather on (b * h * (n + 1), d); row n of each head is zeros
        bh1 = op.Mul(op.Shape(q, start=0, end=1), op.Shape(q, start=1, end=2))
        bh = op.Squeeze(bh1)
        n_ext1 = op.Add(n1, one1)
        head_shape = op.Concat(one1, op.Shape(q, start=0, end=2), one1, axis=0)
        base = op.Reshape(op.Mul(op.Range(zero, bh, one), op.Squeeze(n_ext1)), head_shape)
        q_index = op.Add(q_order, base)
        k_index = op.Add(k_order, base)
        zero_row = op.Expand(op.CastLike(op.Constant(value_float=0.0), q), op.Concat(op.Shape(q, start=0, end=2), one1, d1, axis=0))
        flat_rows = op.Concat(op.Mul(bh1, n_ext1), d1, axis=0)
        q_flat = op.Reshape(op.Concat(op.Mul(q, scale_t), zero_row, axis=2), flat_rows)
        k_flat = op.Reshape(op.Concat(k, zero_row, axis=2), flat_rows)
        v_flat = op.Reshape(op.Concat(v, zero_row, axis=2), flat_rows)
        bias = op.Expand(op.Squeeze(key_bias, op.Constant(value_ints=[2])), op.Shape(q, start=0, end=3))
        bias_flat = op.Reshape(op.Concat(bias, op.Expand(low, op.Concat(op.Shape(q, start=0, end=2), one1, axis=0)), axis=-1), axis_last)
        split = op.Concat(op.Constant(value_ints=[0, 0, 0]), op.Unsqueeze(chunks, op.Constant(value_ints=[0])), op.Unsqueeze(c, op.Constant(value_ints=[0])), axis_last, axis=0)
        split_scalar = op.Concat(op.Constant(value_ints=[0, 0, 0]), op.Unsqueeze(chunks, op.Constant(value_ints=[0])), op.Unsqueeze(c, op.Constant(value_ints=[0])), one1, axis=0)
        first = op.Constant(value_ints=[0])
        last = op.Constant(value_ints=[-1])
        big = op.Constant(value_ints=[9223372036854775807])
        chunk_axis = op.Constant(value_ints=[3])
        qs = op.Reshape(op.Gather(q_flat, q_index, axis=0), split)
        ks_now = op.Reshape(op.Gather(k_flat, k_index, axis=0), split)
        vs_now = op.Reshape(op.Gather(v_flat, k_index, axis=0), split)
        kb_now = op.Reshape(op.Gather(bias_flat, k_index, axis=0), split_scalar)
        # each chunk of keys with the one before it (cyclic); axis 3 is the chunk axis
        ks = op.Concat(op.Concat(op.Slice(ks_now, last, big, chunk_axis), op.Slice(ks_now, first, last, chunk_axis), axis=3), ks_now, axis=4)
        vs = op.Concat(op.Concat(op.Slice(vs_now, last, big, chunk_axis), op.Slice(vs_now, first, last, chunk_axis), axis=3), vs_now, axis=4)
        kb = op.Concat(op.Concat(op.Slice(kb_now, last, big, chunk_axis), op.Slice(kb_now, first, last, chunk_axis), axis=3), kb_now, axis=4)
        # the only chunk looks back at itself: count its keys once
        duplicate = op.And(op.Equal(chunks, one), op.Less(op.Range(zero, op.Mul(c, op.Constant(value_int=2)), one), c))
        kb = op.Where(op.Unsqueeze(duplicate, axis_last), low, kb)  # (r, b, h, chunks, 2c, 1)
        # q·k + bias in one MatMul: q gets a column of ones, k the bias as its last column
        ones = op.Expand(op.CastLike(op.Constant(value_float=1.0), q), op.Concat(op.Shape(qs, start=0, end=5), one1, axis=0))
        scores = op.MatMul(op.Concat(qs, ones, axis=-1), op.Transpose(op.Concat(ks, kb, axis=-1), perm=[0, 1, 2, 3, 5, 4]))
        # log-sum-exp from the softmax: lse = s_j - log p_j at the row maximum (ORT's
        # ReduceLogSumExp is slow, and Softmax is one pass)
        probs = op.Softmax(scores, axis=-1)
        lse = op.Sub(op.ReduceMax(scores, axis_last, keepdims=1), op.Log(op.ReduceMax(probs, axis_last, keepdims=1)))
        out = op.MatMul(probs, vs)
        # back to token order; rounds merged by the softmax of their log-sum-exps
        _inv_sorted, inverse_all = op.TopK(q_order, total1, axis=-1, largest=0, sorted=1)
        total_base = op.Reshape(op.Mul(op.Range(zero, bh, one), op.Squeeze(total1)), head_shape)
        inverse = op.Add(op.Slice(inverse_all, first, n1, axis_last), total_base)  # (r, b, h, n)
        out_flat = op.Reshape(out, op.Concat(rounds1, last, d1, axis=0))  # (r, b * h * total, d)
        lse_flat = op.Reshape(lse, op.Concat(rounds1, last, axis=0))
        rounds_index = op.Reshape(op.Range(zero, op.Squeeze(rounds1), one), op.Constant(value_ints=[-1, 1, 1, 1]))
        # Gather per round: flatten (round, row) so one Gather does every round
        flat_index = op.Add(inverse, op.Mul(rounds_index, op.Mul(bh, op.Squeeze(total1))))
        out = op.Gather(op.Reshape(out_flat, op.Concat(last, d1, axis=0)), flat_index, axis=0)  # (r, b, h, n, d)
        lse = op.Gather(op.Reshape(lse_flat, last), flat_index, axis=0)  # (r, b, h, n)
        weights = op.Unsqueeze(op.Softmax(lse, axis=0), axis_last)
        result = op.ReduceSum(op.Mul(out, weights), op.Constant(value_ints=[0]), keepdims=0)
    else:
        result = op.MatMul(op.Softmax(op.Add(op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), scale_t), key_bias), axis=-1), v)
    return result


@script()
def lsh_attention_causal_onnx(q: FLOAT, k: FLOAT, v: FLOAT, key_bias: FLOAT, rotations: FLOAT, scale: float, chunk: int, threshold: int) -> FLOAT:
    n1 = op.Shape(q, start=2, end=3)
    n = op.Squeeze(n1)
    low = op.CastLike(op.Constant(value_float=FLOAT_MIN), q)
    scale_t = op.CastLike(op.Constant(value_float=scale), q)
    axis_last = op.Constant(value_ints=[-1])
    if op.Greater(n, op.Constant(value_int=threshold)):
        zero = op.Constant(value_int=0)
        one = op.Constant(value_int=1)
        one1 = op.Constant(value_ints=[1])
        c = op.Min(n, op.Constant(value_int=chunk))
        chunks = op.Div(op.Sub(op.Add(n, c), one), c)
        total1 = op.Unsqueeze(op.Mul(chunks, c), op.Constant(value_ints=[0]))
        d1 = op.Shape(q, start=3, end=4)
        rounds1 = op.Shape(rotations, start=0, end=1)
        position = op.Range(zero, n, one)
        rot = op.Unsqueeze(rotations, op.Constant(value_ints=[1, 2]))  # (r, 1, 1, d, buckets / 2)
        eps = op.CastLike(op.Constant(value_float=1e-6), q)
        # sorted orders (r, b, h, total): positions by (bucket, position), padded with n (a dummy)
        q_proj = op.MatMul(op.Unsqueeze(op.Div(q, op.Max(op.ReduceL2(q, axis_last, keepdims=1), eps)), op.Constant(value_ints=[0])), rot)
        q_key = op.Add(op.Mul(op.ArgMax(op.Concat(q_proj, op.Neg(q_proj), axis=-1), axis=-1, keepdims=0), n), position)
        _q_sorted, q_order0 = op.TopK(q_key, n1, axis=-1, largest=0, sorted=1)
        k_proj = op.MatMul(op.Unsqueeze(op.Div(k, op.Max(op.ReduceL2(k, axis_last, keepdims=1), eps)), op.Constant(value_ints=[0])), rot)
        k_key = op.Add(op.Mul(op.ArgMax(op.Concat(k_proj, op.Neg(k_proj), axis=-1), axis=-1, keepdims=0), n), position)
        _k_sorted, k_order0 = op.TopK(k_key, n1, axis=-1, largest=0, sorted=1)
        rbh = op.Shape(q_order0, start=0, end=3)
        dummies = op.Expand(n, op.Concat(rbh, op.Sub(total1, n1), axis=0))
        q_order = op.Concat(q_order0, dummies, axis=-1)
        k_order = op.Concat(k_order0, dummies, axis=-1)
        # rows in sorted order: Gather on (b * h * (n + 1), d); row n of each head is zeros
        bh1 = op.Mul(op.Shape(q, start=0, end=1), op.Shape(q, start=1, end=2))
        bh = op.Squeeze(bh1)
        n_ext1 = op.Add(n1, one1)
        head_shape = op.Concat(one1, op.Shape(q, start=0, end=2), one1, axis=0)
        base = op.Reshape(op.Mul(op.Range(zero, bh, one), op.Squeeze(n_ext1)), head_shape)
        q_index = op.Add(q_order, base)
        k_index = op.Add(k_order, base)
        zero_row = op.Expand(op.CastLike(op.Constant(value_float=0.0), q), op.Concat(op.Shape(q, start=0, end=2), one1, d1, axis=0))
        flat_rows = op.Concat(op.Mul(bh1, n_ext1), d1, axis=0)
        q_flat = op.Reshape(op.Concat(op.Mul(q, scale_t), zero_row, axis=2), flat_rows)
        k_flat = op.Reshape(op.Concat(k, zero_row, axis=2), flat_rows)
        v_flat = op.Reshape(op.Concat(v, zero_row, axis=2), flat_rows)
        bias = op.Expand(op.Squeeze(key_bias, op.Constant(value_ints=[2])), op.Shape(q, start=0, end=3))
        bias_flat = op.Reshape(op.Concat(bias, op.Expand(low, op.Concat(op.Shape(q, start=0, end=2), one1, axis=0)), axis=-1), axis_last)
        split = op.Concat(op.Constant(value_ints=[0, 0, 0]), op.Unsqueeze(chunks, op.Constant(value_ints=[0])), op.Unsqueeze(c, op.Constant(value_ints=[0])), axis_last, axis=0)
        split_scalar = op.Concat(op.Constant(value_ints=[0, 0, 0]), op.Unsqueeze(chunks, op.Constant(value_ints=[0])), op.Unsqueeze(c, op.Constant(value_ints=[0])), one1, axis=0)
        first = op.Constant(value_ints=[0])
        last = op.Constant(value_ints=[-1])
        big = op.Constant(value_ints=[9223372036854775807])
        chunk_axis = op.Constant(value_ints=[3])
        qs = op.Reshape(op.Gather(q_flat, q_index, axis=0), split)
        ks_now = op.Reshape(op.Gather(k_flat, k_index, axis=0), split)
        vs_now = op.Reshape(op.Gather(v_flat, k_index, axis=0), split)
        kb_now = op.Reshape(op.Gather(bias_flat, k_index, axis=0), split_scalar)
        # each chunk of keys with the one before it (cyclic); axis 3 is the chunk axis
        ks = op.Concat(op.Concat(op.Slice(ks_now, last, big, chunk_axis), op.Slice(ks_now, first, last, chunk_axis), axis=3), ks_now, axis=4)
        vs = op.Concat(op.Concat(op.Slice(vs_now, last, big, chunk_axis), op.Slice(vs_now, first, last, chunk_axis), axis=3), vs_now, axis=4)
        kb = op.Concat(op.Concat(op.Slice(kb_now, last, big, chunk_axis), op.Slice(kb_now, first, last, chunk_axis), axis=3), kb_now, axis=4)
        # the only chunk looks back at itself: count its keys once
        duplicate = op.And(op.Equal(chunks, one), op.Less(op.Range(zero, op.Mul(c, op.Constant(value_int=2)), one), c))
        kb = op.Where(op.Unsqueeze(duplicate, axis_last), low, kb)  # (r, b, h, chunks, 2c, 1)
        # q·k + bias in one MatMul: q gets a column of ones, k the bias as its last column
        ones = op.Expand(op.CastLike(op.Constant(value_float=1.0), q), op.Concat(op.Shape(qs, start=0, end=5), one1, axis=0))
        scores = op.MatMul(op.Concat(qs, ones, axis=-1), op.Transpose(op.Concat(ks, kb, axis=-1), perm=[0, 1, 2, 3, 5, 4]))
        # later keys and the query's own key (merged below) are hidden
        k_pos_now = op.Reshape(k_order, split_scalar)
        k_pos = op.Concat(op.Concat(op.Slice(k_pos_now, last, big, chunk_axis), op.Slice(k_pos_now, first, last, chunk_axis), axis=3), k_pos_now, axis=4)
        q_pos = op.Reshape(q_order, split_scalar)  # (r, b, h, chunks, c, 1)
        scores = op.Where(op.GreaterOrEqual(op.Transpose(k_pos, perm=[0, 1, 2, 3, 5, 4]), q_pos), low, scores)
        probs = op.Softmax(scores, axis=-1)
        lse_window = op.Sub(op.ReduceMax(scores, axis_last, keepdims=1), op.Log(op.ReduceMax(probs, axis_last, keepdims=1)))
        out_window = op.MatMul(probs, vs)
        own_k = op.Reshape(op.Gather(k_flat, q_index, axis=0), split)
        own_v = op.Reshape(op.Gather(v_flat, q_index, axis=0), split)
        own = op.Add(op.ReduceSum(op.Mul(qs, own_k), axis_last, keepdims=1), op.Reshape(op.Gather(bias_flat, q_index, axis=0), split_scalar))
        peak = op.Max(lse_window, own)
        lse = op.Add(peak, op.Log(op.Add(op.Exp(op.Sub(lse_window, peak)), op.Exp(op.Sub(own, peak)))))
        out = op.Add(op.Mul(op.Exp(op.Sub(lse_window, lse)), out_window), op.Mul(op.Exp(op.Sub(own, lse)), own_v))
        # back to token order; rounds merged by the softmax of their log-sum-exps
        _inv_sorted, inverse_all = op.TopK(q_order, total1, axis=-1, largest=0, sorted=1)
        total_base = op.Reshape(op.Mul(op.Range(zero, bh, one), op.Squeeze(total1)), head_shape)
        inverse = op.Add(op.Slice(inverse_all, first, n1, axis_last), total_base)  # (r, b, h, n)
        out_flat = op.Reshape(out, op.Concat(rounds1, last, d1, axis=0))  # (r, b * h * total, d)
        lse_flat = op.Reshape(lse, op.Concat(rounds1, last, axis=0))
        rounds_index = op.Reshape(op.Range(zero, op.Squeeze(rounds1), one), op.Constant(value_ints=[-1, 1, 1, 1]))
        # Gather per round: flatten (round, row) so one Gather does every round
        flat_index = op.Add(inverse, op.Mul(rounds_index, op.Mul(bh, op.Squeeze(total1))))
        out = op.Gather(op.Reshape(out_flat, op.Concat(last, d1, axis=0)), flat_index, axis=0)  # (r, b, h, n, d)
        lse = op.Gather(op.Reshape(lse_flat, last), flat_index, axis=0)  # (r, b, h, n)
        weights = op.Unsqueeze(op.Softmax(lse, axis=0), axis_last)
        result = op.ReduceSum(op.Mul(out, weights), op.Constant(value_ints=[0]), keepdims=0)
    else:
        scores = op.Add(op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), scale_t), key_bias)
        keep = op.Cast(op.Trilu(op.Expand(op.Constant(value_int=1), op.Concat(n1, n1, axis=0)), upper=0), to=9)
        result = op.MatMul(op.Softmax(op.Where(keep, scores, low), axis=-1), v)
    return result


def lsh_attention_lowering(q, k, v, key_bias, rotations, scale: float, chunk: int, causal: bool, threshold: int):
    # Two graphs rather than a runtime switch: the causal mask costs full-size passes.
    lowering = lsh_attention_causal_onnx if causal else lsh_attention_onnx
    return lowering(q, k, v, key_bias, rotations, scale=scale, chunk=chunk, threshold=threshold)


register_lowering(torch.ops.graphopt.lsh_attention.default, lsh_attention_lowering)

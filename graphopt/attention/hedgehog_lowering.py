"""ONNX lowering of ``graphopt::hedgehog_attention`` in standard ops (imported by the exporter).

The same blocked computation as :func:`graphopt.attention.reference.hedgehog_attention`:
pad to whole blocks, one MatMul for the local window and the sinks, one for the far keys'
per-block states. Values carry a ones column, so each MatMul yields numerator and
normaliser together. ``causal`` selects a running sum of the states (CumSum) instead of
their total; it is a Where on a constant, over tensors of (blocks x features x head_dim)
per head, so one function serves both. At most ``threshold`` tokens it is exact attention
(an ``If`` on the runtime length).
"""

from __future__ import annotations

import torch
from onnxscript import FLOAT, script
from onnxscript import opset18 as op

import graphopt.attention.hedgehog  # noqa: F401  (defines the op the lowering is registered for)
from graphopt.lowerings import register_lowering

FLOAT_MIN = float(torch.finfo(torch.float32).min)


@script()
def hedgehog_attention_onnx(
    q: FLOAT, k: FLOAT, v: FLOAT, key_bias: FLOAT, wq: FLOAT, bq: FLOAT, wk: FLOAT, bk: FLOAT, mix: FLOAT,
    scale: float, block: int, sinks: int, causal: int, threshold: int,
) -> FLOAT:
    n1 = op.Shape(q, start=2, end=3)
    n = op.Squeeze(n1)
    low = op.CastLike(op.Constant(value_float=FLOAT_MIN), q)
    scale_t = op.CastLike(op.Constant(value_float=scale), q)
    if op.Greater(n, op.Constant(value_int=threshold)):
        zero1 = op.Constant(value_ints=[0])
        one1 = op.Constant(value_ints=[1])
        last1 = op.Constant(value_ints=[-1])
        big1 = op.Constant(value_ints=[9223372036854775807])
        block0 = op.Constant(value_int=block)
        block1 = op.Unsqueeze(block0, zero1)
        axis2 = op.Constant(value_ints=[2])
        chunks1 = op.Div(op.Sub(op.Add(n1, block1), one1), block1)
        total1 = op.Mul(chunks1, block1)
        pad1 = op.Sub(total1, n1)
        s1 = op.Min(n1, op.Unsqueeze(op.Constant(value_int=sinks), zero1))
        d1 = op.Shape(q, start=3, end=4)
        bh = op.Shape(q, start=0, end=2)
        # pad to whole blocks; v gets a ones column (numerator and normaliser in one MatMul)
        seq_pads = op.Concat(zero1, zero1, zero1, zero1, zero1, zero1, pad1, zero1, axis=0)
        ones = op.Expand(op.CastLike(op.Constant(value_float=1.0), q), op.Concat(bh, n1, one1, axis=0))
        v1 = op.Concat(v, ones, axis=-1)
        blocks = op.Concat(bh, chunks1, block1, last1, axis=0)
        qb = op.Reshape(op.Pad(q, seq_pads), blocks)
        kb = op.Reshape(op.Pad(k, seq_pads), blocks)
        vb = op.Reshape(op.Pad(v1, seq_pads), blocks)  # (b, h, C, B, d + 1)
        # key bias (b or 1, 1, 1, n) -> (b or 1, 1, C, 1, B), padding at low
        bias_n = op.Expand(key_bias, op.Concat(op.Constant(value_ints=[1, 1, 1]), n1, axis=0))
        bias = op.Pad(bias_n, op.Concat(zero1, zero1, zero1, zero1, zero1, zero1, zero1, pad1, axis=0), low)
        bias_b = op.Reshape(bias, op.Concat(op.Constant(value_ints=[0, 1]), chunks1, one1, block1, axis=0))
        valid = op.CastLike(op.Greater(bias_b, op.CastLike(op.Constant(value_float=-1e4), q)), q)  # (b or 1, 1, C, 1, B)
        block_index = op.Range(op.Constant(value_int=0), op.Squeeze(chunks1), op.Constant(value_int=1))
        far = op.CastLike(op.Reshape(op.GreaterOrEqual(block_index, op.Constant(value_int=2)), op.Constant(value_ints=[1, 1, -1, 1, 1])), q)
        # exact part: previous block, own block, sinks (sinks only from block 2 on)
        prev_bias = op.Concat(op.Add(op.Mul(op.Slice(bias_b, zero1, one1, axis2), op.CastLike(op.Constant(value_float=0.0), q)), low),
                              op.Slice(bias_b, zero1, last1, axis2), axis=2)
        sink_bias = op.Add(op.Reshape(op.Slice(bias, zero1, s1, op.Constant(value_ints=[3])), op.Concat(op.Constant(value_ints=[0, 1, 1, 1]), s1, axis=0)),
                           op.Mul(op.Sub(op.CastLike(op.Constant(value_float=1.0), q), far), low))
        sink_bias = op.Expand(sink_bias, op.Concat(op.Shape(bias_b, start=0, end=2), chunks1, one1, s1, axis=0))
        bias_loc = op.Concat(prev_bias, bias_b, sink_bias, axis=-1)  # (b or 1, 1, C, 1, 2B + s)
        q_pos = op.Unsqueeze(op.Range(op.Constant(value_int=0), block0, op.Constant(value_int=1)), one1)
        k_pos = op.Unsqueeze(op.Concat(op.Sub(op.Range(op.Constant(value_int=0), op.Mul(block0, op.Constant(value_int=2)), op.Constant(value_int=1)), block0),
                                       op.Expand(op.Neg(block1), s1), axis=0), zero1)
        later = op.And(op.Greater(k_pos, q_pos), op.Cast(op.Constant(value_int=causal), to=9))  # (B, 2B + s)
        bias_loc = op.Add(bias_loc, op.Where(later, low, op.CastLike(op.Constant(value_float=0.0), q)))
        sink_shape = op.Concat(bh, one1, s1, last1, axis=0)
        k_sink = op.Expand(op.Reshape(op.Slice(k, zero1, s1, axis2), sink_shape), op.Concat(bh, chunks1, s1, d1, axis=0))
        v_sink = op.Expand(op.Reshape(op.Slice(v1, zero1, s1, axis2), sink_shape), op.Concat(bh, chunks1, s1, op.Add(d1, one1), axis=0))
        k_prev = op.Concat(op.Mul(op.Slice(kb, zero1, one1, axis2), op.CastLike(op.Constant(value_float=0.0), q)), op.Slice(kb, zero1, last1, axis2), axis=2)
        v_prev = op.Concat(op.Mul(op.Slice(vb, zero1, one1, axis2), op.CastLike(op.Constant(value_float=0.0), q)), op.Slice(vb, zero1, last1, axis2), axis=2)
        k_loc = op.Concat(k_prev, kb, k_sink, axis=3)
        v_loc = op.Concat(v_prev, vb, v_sink, axis=3)
        scores = op.Add(op.Mul(op.MatMul(qb, op.Transpose(k_loc, perm=[0, 1, 2, 4, 3])), scale_t), bias_loc)
        weights = op.Exp(op.Sub(scores, op.ReduceMax(scores, last1, keepdims=1)))
        exact_part = op.MatMul(weights, v_loc)  # (b, h, C, B, d + 1)
        # linear part: feature maps, per-block states of the far keys
        # [softmax(y), softmax(-y)] as one MatMul on [w, -w] and one Softmax over (2, f): no Concat of features
        axes02 = op.Constant(value_ints=[0, 2])
        halves = op.Constant(value_ints=[0, 0, 0, 0, 2, -1])
        joined = op.Constant(value_ints=[0, 0, 0, 0, -1])
        wq2 = op.Unsqueeze(op.Concat(wq, op.Neg(wq), axis=-1), axes02)
        bq2 = op.Unsqueeze(op.Concat(bq, op.Neg(bq), axis=-1), axes02)
        wk2 = op.Unsqueeze(op.Concat(wk, op.Neg(wk), axis=-1), axes02)
        bk2 = op.Unsqueeze(op.Concat(bk, op.Neg(bk), axis=-1), axes02)
        fq = op.Reshape(op.Softmax(op.Reshape(op.Add(op.MatMul(qb, wq2), bq2), halves), axis=-1), joined)
        fk = op.Mul(op.Reshape(op.Softmax(op.Reshape(op.Add(op.MatMul(kb, wk2), bk2), halves), axis=-1), joined),
                    op.Transpose(valid, perm=[0, 1, 2, 4, 3]))
        state = op.MatMul(op.Transpose(fk, perm=[0, 1, 2, 4, 3]), vb)  # (b, h, C, F, d + 1)
        fk0 = op.Slice(op.Squeeze(op.Slice(fk, zero1, one1, axis2), axis2), zero1, s1, axis2)  # (b, h, s, F)
        vb0 = op.Slice(op.Squeeze(op.Slice(vb, zero1, one1, axis2), axis2), zero1, s1, axis2)
        sink_state = op.Unsqueeze(op.MatMul(op.Transpose(fk0, perm=[0, 1, 3, 2]), vb0), axis2)  # (b, h, 1, F, d + 1)
        # only the taken branch runs (a Where computed both, then copied one); onnxscript needs an if statement, not a ternary
        if op.Cast(op.Constant(value_int=causal), to=9):  # noqa: SIM108
            seen = op.CumSum(state, op.Constant(value_int=2))
        else:
            seen = op.ReduceSum(state, axis2, keepdims=1)
        state_prev = op.Concat(op.Mul(op.Slice(state, zero1, one1, axis2), op.CastLike(op.Constant(value_float=0.0), q)), op.Slice(state, zero1, last1, axis2), axis=2)
        far_state = op.Sub(op.Sub(op.Sub(seen, state), state_prev), op.Mul(far, sink_state))
        gamma = op.Reshape(op.Exp(mix), op.Constant(value_ints=[1, -1, 1, 1, 1]))
        combined = op.Add(exact_part, op.Mul(gamma, op.MatMul(fq, far_state)))
        out = op.Div(op.Slice(combined, zero1, d1, last1), op.Slice(combined, d1, big1, last1))
        result = op.Slice(op.Reshape(out, op.Concat(bh, total1, d1, axis=0)), zero1, n1, axis2)
    else:
        scores = op.Add(op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), scale_t), key_bias)
        later = op.And(op.Cast(op.Trilu(op.Expand(op.Constant(value_int=1), op.Concat(n1, n1, axis=0)), upper=1, k=op.Constant(value_int=1)), to=9),
                       op.Cast(op.Constant(value_int=causal), to=9))
        result = op.MatMul(op.Softmax(op.Where(later, low, scores), axis=-1), v)
    return result


def hedgehog_attention_lowering(q, k, v, key_bias, wq, bq, wk, bk, mix, scale: float, block: int, sinks: int, causal: bool, threshold: int):
    return hedgehog_attention_onnx(q, k, v, key_bias, wq, bq, wk, bk, mix, scale=scale, block=block, sinks=sinks, causal=int(causal), threshold=threshold)


register_lowering(torch.ops.graphopt.hedgehog_attention.default, hedgehog_attention_lowering)

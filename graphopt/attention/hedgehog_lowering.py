"""ONNX lowering of ``graphopt::hedgehog_attention`` in standard ops (imported by the exporter).

The same blocked computation as :func:`graphopt.attention.reference.hedgehog_attention`:
pad to whole blocks; gather each block's local keys and values (the block before, its own,
the sinks) in one copy; one Softmax and one MatMul for that window; one MatMul each for the
feature maps and for the far keys' per-block states. Values carry a ones column, so each
MatMul with them yields numerator and normaliser together. ``causal`` selects a running sum
of the states (CumSum) instead of their total, an ``If`` on a constant, so one function
serves both. At most ``threshold`` tokens it is exact attention (an ``If`` on the runtime
length).

Where the ops differ from the reference's, the numbers do not (tests/test_attention_ops.py):
- The window weights ``exp(s - max)`` come from one Softmax, ``exp(s - max) / Z``, and the
  linear part, weighted relative to ``exp(max)``, is scaled by the largest of them, ``1 / Z``.
- Block 0's previous block gathers row 0, and v's padding rows are ones, where the reference
  has zero keys and values at bias ``low``; here their bias is ``-inf``, so they weigh nothing,
  which is what the zero values made of them there (padded queries, whose every key is masked,
  included).
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
    none = op.CastLike(op.Constant(value_float=float("-inf")), q)  # a slot with no key: weight 0 even where every key is masked
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
        blocks = op.Concat(bh, chunks1, block1, last1, axis=0)
        # pad to whole blocks, one Pad each (a column-adding Pad is a slow strided copy, so only v's adds one: the ones
        # that make every MatMul with the values yield numerator and normaliser together; the padded rows' ones are
        # never weighted, padded keys are masked in both parts)
        seq_pads = op.Concat(zero1, zero1, zero1, zero1, zero1, zero1, pad1, zero1, axis=0)
        q_p = op.Pad(q, seq_pads)  # (b, h, C * B, d)
        k_p = op.Pad(k, seq_pads)
        v_p = op.Pad(v, op.Concat(zero1, zero1, zero1, zero1, zero1, zero1, pad1, one1, axis=0), op.CastLike(op.Constant(value_float=1.0), q))
        qb = op.Reshape(q_p, blocks)
        vb = op.Reshape(v_p, blocks)  # (b, h, C, B, d + 1)
        # feature maps [softmax(y), softmax(-y)]: one MatMul on [w, -w] per head over all rows (one GEMM per head,
        # not one per block) and one Softmax over (2, f), no Concat of the halves
        axis0 = op.Constant(value_ints=[0])
        halves = op.Constant(value_ints=[0, 0, 0, 2, -1])
        wq2 = op.Unsqueeze(op.Concat(wq, op.Neg(wq), axis=-1), axis0)  # (1, h, d, F)
        bq2 = op.Unsqueeze(op.Concat(bq, op.Neg(bq), axis=-1), axis0)
        wk2 = op.Unsqueeze(op.Concat(wk, op.Neg(wk), axis=-1), axis0)
        bk2 = op.Unsqueeze(op.Concat(bk, op.Neg(bk), axis=-1), axis0)
        fq = op.Reshape(op.Softmax(op.Reshape(op.Add(op.MatMul(q_p, wq2), bq2), halves), axis=-1), blocks)  # (b, h, C, B, F)
        fk_b = op.Reshape(op.Softmax(op.Reshape(op.Add(op.MatMul(k_p, wk2), bk2), halves), axis=-1), blocks)
        # key bias (b or 1, 1, 1, n) -> (b or 1, 1, C, 1, B); the padding rows are no keys (-inf): in a query row whose
        # every key is masked (a padded query's), masked keys weigh 1 each and these 0, as the reference's zero rows
        bias_n = op.Expand(key_bias, op.Concat(op.Constant(value_ints=[1, 1, 1]), n1, axis=0))
        bias = op.Pad(bias_n, op.Concat(zero1, zero1, zero1, zero1, zero1, zero1, zero1, pad1, axis=0), none)
        bias_b = op.Reshape(bias, op.Concat(op.Constant(value_ints=[0, 1]), chunks1, one1, block1, axis=0))
        valid = op.CastLike(op.Greater(bias_b, op.CastLike(op.Constant(value_float=-1e4), q)), q)  # (b or 1, 1, C, 1, B)
        block_index = op.Range(op.Constant(value_int=0), op.Squeeze(chunks1), op.Constant(value_int=1))
        far = op.CastLike(op.Reshape(op.GreaterOrEqual(block_index, op.Constant(value_int=2)), op.Constant(value_ints=[1, 1, -1, 1, 1])), q)
        # exact part: previous block, own block, sinks (sinks only from block 2 on)
        prev_bias = op.Concat(op.Expand(none, op.Shape(op.Slice(bias_b, zero1, one1, axis2))),  # block 0 has no previous block
                              op.Slice(bias_b, zero1, last1, axis2), axis=2)
        sink_bias = op.Add(op.Reshape(op.Slice(bias, zero1, s1, op.Constant(value_ints=[3])), op.Concat(op.Constant(value_ints=[0, 1, 1, 1]), s1, axis=0)),
                           op.Mul(op.Sub(op.CastLike(op.Constant(value_float=1.0), q), far), low))
        sink_bias = op.Expand(sink_bias, op.Concat(op.Shape(bias_b, start=0, end=2), chunks1, one1, s1, axis=0))
        bias_loc = op.Concat(prev_bias, bias_b, sink_bias, axis=-1)  # (b or 1, 1, C, 1, 2B + s)
        two_blocks = op.Mul(block0, op.Constant(value_int=2))
        window = op.Sub(op.Range(op.Constant(value_int=0), two_blocks, op.Constant(value_int=1)), block0)  # (2B,): -B .. B-1 from the block's start
        q_pos = op.Unsqueeze(op.Range(op.Constant(value_int=0), block0, op.Constant(value_int=1)), one1)
        k_pos = op.Unsqueeze(op.Concat(window, op.Expand(op.Neg(block1), s1), axis=0), zero1)
        later = op.And(op.Greater(k_pos, q_pos), op.Cast(op.Constant(value_int=causal), to=9))  # (B, 2B + s)
        bias_loc = op.Add(bias_loc, op.Where(later, low, op.CastLike(op.Constant(value_float=0.0), q)))
        # the local keys and values of every block, gathered in one copy each: the block before (none for block 0),
        # the own block, the sinks; block 0's previous block is row 0 again (its bias is -inf)
        rows = op.Concat(window, op.Range(op.Constant(value_int=0), op.Squeeze(s1), op.Constant(value_int=1)), axis=0)  # (2B + s,)
        moves = op.Concat(op.Expand(op.Constant(value_int=1), op.Unsqueeze(two_blocks, zero1)), op.Expand(op.Constant(value_int=0), s1), axis=0)
        starts = op.Unsqueeze(op.Mul(block_index, block0), one1)  # (C, 1): the window moves with the block, the sinks do not
        index = op.Max(op.Add(op.Mul(starts, op.Unsqueeze(moves, zero1)), op.Unsqueeze(rows, zero1)), zero1)  # (C, 2B + s)
        k_loc = op.Gather(k_p, index, axis=2)  # (b, h, C, 2B + s, d)
        v_loc = op.Gather(v_p, index, axis=2)
        scores = op.Add(op.Mul(op.MatMul(qb, op.Transpose(k_loc, perm=[0, 1, 2, 4, 3])), scale_t), bias_loc)
        # exp(s - max) / Z as one Softmax; its largest weight is exp(0) / Z, so the linear part, whose weight is
        # relative to exp(max), is scaled by it instead of the exact part by Z
        weights = op.Softmax(scores, axis=-1)
        exact_part = op.MatMul(weights, v_loc)  # (b, h, C, B, d + 1)
        inv_z = op.ReduceMax(weights, last1, keepdims=1)
        # linear part: feature maps, per-block states of the far keys
        # padded keys leave the states through the values (d + 1 wide) rather than the features (F wide): same product
        vb_valid = op.Mul(vb, op.Transpose(valid, perm=[0, 1, 2, 4, 3]))
        state = op.MatMul(op.Transpose(fk_b, perm=[0, 1, 2, 4, 3]), vb_valid)  # (b, h, C, F, d + 1)
        fk0 = op.Slice(op.Squeeze(op.Slice(fk_b, zero1, one1, axis2), axis2), zero1, s1, axis2)  # (b, h, s, F)
        vb0 = op.Slice(op.Squeeze(op.Slice(vb_valid, zero1, one1, axis2), axis2), zero1, s1, axis2)
        sink_state = op.Unsqueeze(op.MatMul(op.Transpose(fk0, perm=[0, 1, 3, 2]), vb0), axis2)  # (b, h, 1, F, d + 1)
        # only the taken branch runs (a Where computed both, then copied one); onnxscript needs an if statement, not a ternary
        if op.Cast(op.Constant(value_int=causal), to=9):  # noqa: SIM108
            seen = op.CumSum(state, op.Constant(value_int=2))
        else:
            seen = op.ReduceSum(state, axis2, keepdims=1)
        state_prev = op.Concat(op.Mul(op.Slice(state, zero1, one1, axis2), op.CastLike(op.Constant(value_float=0.0), q)), op.Slice(state, zero1, last1, axis2), axis=2)
        far_state = op.Sub(op.Sub(op.Sub(seen, state), state_prev), op.Mul(far, sink_state))
        gamma = op.Reshape(op.Exp(mix), op.Constant(value_ints=[1, -1, 1, 1, 1]))
        combined = op.Add(exact_part, op.Mul(op.Mul(gamma, inv_z), op.MatMul(fq, far_state)))
        # divide by the normaliser column, then one Slice drops it and the padded rows
        out = op.Reshape(op.Div(combined, op.Slice(combined, d1, big1, last1)), op.Concat(bh, total1, op.Add(d1, one1), axis=0))
        result = op.Slice(out, op.Constant(value_ints=[0, 0]), op.Concat(n1, d1, axis=0), op.Constant(value_ints=[2, 3]))
    else:
        scores = op.Add(op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), scale_t), key_bias)
        later = op.And(op.Cast(op.Trilu(op.Expand(op.Constant(value_int=1), op.Concat(n1, n1, axis=0)), upper=1, k=op.Constant(value_int=1)), to=9),
                       op.Cast(op.Constant(value_int=causal), to=9))
        result = op.MatMul(op.Softmax(op.Where(later, low, scores), axis=-1), v)
    return result


def hedgehog_attention_lowering(q, k, v, key_bias, wq, bq, wk, bk, mix, scale: float, block: int, sinks: int, causal: bool, threshold: int):
    return hedgehog_attention_onnx(q, k, v, key_bias, wq, bq, wk, bk, mix, scale=scale, block=block, sinks=sinks, causal=int(causal), threshold=threshold)


register_lowering(torch.ops.graphopt.hedgehog_attention.default, hedgehog_attention_lowering)

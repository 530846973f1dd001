"""ONNX lowering of ``clustered_weight``: shifts, masks and one GatherElements.

Every input is an initializer, so ONNX Runtime constant-folds the whole decode at session
load (inference then runs on dense weights). The exporter's own folder leaves it alone
because the packed codes are larger than its input-size limit (8192 elements) for every
tensor worth clustering; smaller tensors may be folded back to dense at export, which is
correct and costs little.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnxscript import opset18 as op

from graphopt.cluster import ops  # noqa: F401  (defines torch.ops.graphopt.clustered_weight)
from graphopt.cluster.packing import padded_count, planes
from graphopt.lowerings import register_lowering


def _const(values, dtype) -> object:
    return op.Constant(value=ir.tensor(np.asarray(values, dtype=dtype)))


def clustered_weight(codes, codebook, shape, bits):
    n = math.prod(shape)
    total = padded_count(n)
    index = None
    offset = low = 0
    for width in planes(bits):
        size = total * width // 8
        plane = op.Slice(codes, _const([offset], np.int64), _const([offset + size], np.int64))
        if width < 8:
            shifted = op.BitShift(op.Unsqueeze(plane, _const([1], np.int64)), _const(np.arange(0, 8, width), np.uint8), direction="RIGHT")
            plane = op.BitwiseAnd(shifted, _const((1 << width) - 1, np.uint8))
        part = op.Cast(op.Reshape(plane, _const([total], np.int64)), to=ir.DataType.INT64)
        if low:
            part = op.Mul(part, _const(1 << low, np.int64))
        index = part if index is None else op.Add(index, part)
        offset += size
        low += width
    if total != n:
        index = op.Slice(index, _const([0], np.int64), _const([n], np.int64))
    rows = op.Shape(codebook, start=0, end=1)
    index = op.Reshape(index, op.Concat(rows, _const([-1], np.int64), axis=0))
    dense = op.Reshape(op.GatherElements(codebook, index, axis=1), _const(list(shape), np.int64))
    if codebook.dtype == ir.DataType.FLOAT16:
        dense = op.Cast(dense, to=ir.DataType.FLOAT)
    return dense


register_lowering(__import__("torch").ops.graphopt.clustered_weight.default, clustered_weight)

"""Measured latency of a group's matmuls at candidate widths, on an ONNX Runtime provider.

A group's 2-D weights are its block: every member ``W`` of shape ``[a, b]`` cut along
``dim`` is a ``[tokens, k] × [k, n]`` MatMul whose cut side has the candidate width (the
other side is the weight's other dim). The block is built directly as a small ONNX graph,
run on the target provider, and timed; equal blocks (every layer of a model alike) are
measured once. That is what tells a width that ORT's kernels run faster (a multiple of
their tile) from one that only has fewer FLOPs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import numpy as np
from onnx import TensorProto, helper

from graphopt.analysis.groups import Group

Block = tuple[tuple[int, int, bool], ...]  # (other dim, rows per unit, cut is the output side)


def block_of(group: Group, shapes: dict[str, tuple[int, ...]]) -> Block:
    """The matmuls of ``group``: one entry per 2-D member weight."""
    entries = []
    for member in group.members:
        shape = shapes.get(member.attr)
        if shape is None or len(shape) != 2:
            continue
        rows_per_unit = int((member.units == 0).sum()) or 1
        entries.append((shape[1 - member.dim], rows_per_unit, member.dim == 0))
    return tuple(sorted(entries))


def block_model(block: Block, units: int, tokens: int) -> bytes:
    rng = np.random.default_rng(0)
    inputs, nodes, outputs, inits = [], [], [], []
    for i, (other, per_unit, cut_is_output) in enumerate(block):
        width = units * per_unit
        k, n = (other, width) if cut_is_output else (width, other)
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [tokens, k]))
        weight = rng.standard_normal((k, n), dtype=np.float32)
        inits.append(helper.make_tensor(f"w{i}", TensorProto.FLOAT, [k, n], weight.tobytes(), raw=True))
        nodes.append(helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [tokens, n]))
    graph = helper.make_graph(nodes, "block", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


class BlockTimer:
    """Times blocks at given widths on one provider, caching equal measurements."""

    def __init__(self, provider: str = "cpu", threads: int = 1, tokens: int = 128, runs: int = 30):
        self.provider, self.threads, self.tokens, self.runs = provider, threads, tokens, runs
        self.cache: dict[tuple[Block, int], float] = {}

    def ms(self, block: Block, units: int) -> float:
        key = (block, units)
        if key not in self.cache:
            self.cache[key] = self._measure(block, units)
        return self.cache[key]

    def _measure(self, block: Block, units: int) -> float:
        from graphopt.export import make_session

        session = make_session(block_model(block, units, self.tokens), provider=self.provider, threads=self.threads)
        rng = np.random.default_rng(1)
        feed = {i.name: rng.standard_normal(i.shape, dtype=np.float32) for i in session.get_inputs()}
        for _ in range(3):
            session.run(None, feed)
        times = []
        for _ in range(self.runs):
            start = time.perf_counter()
            session.run(None, feed)
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)


def choose_width(timer: BlockTimer, block: Block, size: int, planned: int, multiple: int, tolerance: float,
                 span: int = 3) -> tuple[int, dict[int, float]]:
    """The widest width, from ``planned`` up by steps of ``multiple`` (``span`` of them), that
    runs no slower than ``planned`` (within ``tolerance``): units the kernels make free are
    kept. When even the planned cut is not measurably faster than the full width, the
    group is not cut at all: it would lose accuracy for nothing.
    """
    candidates = sorted({min(planned + k * multiple, size) for k in range(span + 1)} | {size})
    measured = {w: timer.ms(block, w) for w in candidates}
    if measured[planned] >= measured[size] * (1 - tolerance):
        return size, measured
    chosen = max(w for w, t in measured.items() if w < size and t <= measured[planned] * (1 + tolerance))
    return chosen, measured


def measured_block_ms(timer: BlockTimer, blocks: Sequence[tuple[Block, int]]) -> float:
    return sum(timer.ms(block, units) for block, units in blocks)

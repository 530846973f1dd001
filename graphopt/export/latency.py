"""Timing a group's matmul block on ONNX Runtime (latency-aware pruning).

:func:`block_model` builds a :data:`graphopt.analysis.latency.Block` at a width as a small
ONNX graph of MatMuls; :class:`BlockTimer` runs it on a provider and reports the median of
``runs`` timed runs after 3 warm-up runs, caching equal measurements (every layer of a
model alike is measured once). ``graphopt.api.default_services`` lends it to passes as
``ctx.services.block_timer``: the prune pass only sees the ``ms(block, units)`` protocol.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from onnx import TensorProto, helper

from graphopt.analysis.latency import Block

from .session import make_session


def block_model(block: Block, units: int, tokens: int) -> bytes:
    """``block`` at ``units`` units as a serialized ONNX model: one ``[tokens, k] × [k, n]``
    MatMul per entry, seeded random weights."""
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

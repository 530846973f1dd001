"""Per-layer sensitivity and a budget-driven mixed-precision plan.

Sensitivity of a layer: how far the program's outputs move on the calibration data when
that layer alone is quantized (``1 - mean per-sample cosine`` to the fp32 outputs). The
plan keeps the most sensitive layers at the fallback precision: the fewest such that
quantizing every other layer keeps the mean per-sample cosine at or above the target
(found by bisection over that count; each probe is one run over the calibration data).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import fx

from graphopt.analysis.interpret import activation_of, run_batch
from graphopt.context import Batch


def sample_cosines(reference: Sequence[tuple[torch.Tensor, ...]], candidate: Sequence[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """Cosine per sample (batch row) and output, over every calibration batch, as one vector."""
    values = []
    for ref_batch, got_batch in zip(reference, candidate):
        for ref, got in zip(ref_batch, got_batch):
            if ref.dim() == 0 or not ref.is_floating_point():
                continue
            r = ref.detach().double().reshape(ref.shape[0], -1)
            g = got.detach().double().reshape(got.shape[0], -1)
            values.append(torch.nn.functional.cosine_similarity(r, g, dim=1, eps=1e-30))
    return torch.cat(values) if values else torch.ones(1, dtype=torch.float64)


@dataclass
class PlanProbe:
    kept: int  # how many of the most sensitive layers stay at the fallback precision
    mean_cosine: float
    min_cosine: float

    def to_dict(self) -> dict:
        return {"kept": self.kept, "mean_cosine": round(self.mean_cosine, 6), "min_cosine": round(self.min_cosine, 6)}


class Simulator:
    """Runs the fp32 graph with chosen linear nodes computed by their quantized form."""

    def __init__(self, gm: fx.GraphModule, batches: Sequence[Batch], quantized: Mapping[str, Callable[[torch.Tensor], torch.Tensor]], bias_after: Mapping[str, bool]):
        self.gm = gm
        self.batches = list(batches)
        self.quantized = dict(quantized)
        self.bias_after = dict(bias_after)  # node -> True when the bias is a separate input (addmm with a computed bias)
        # Every node's fp32 value per batch: a run that changes some layers recomputes only
        # what lies downstream of them.
        runs = [run_batch(gm, args, kwargs, keep_values=True) for args, kwargs in self.batches]
        self.reference = [outputs for outputs, _ in runs]
        self.values = [values for _, values in runs]

    def outputs(self, names: Sequence[str]) -> list[tuple[torch.Tensor, ...]]:
        affected = downstream(self.gm.graph, set(names))
        override = {name: self._override(name) for name in names}
        results = []
        for (args, kwargs), values in zip(self.batches, self.values):
            kept = {node: value for node, value in values.items() if node not in affected}
            results.append(run_batch(self.gm, args, kwargs, initial_values=kept, override=override)[0])
        return results

    def cosines(self, names: Sequence[str]) -> torch.Tensor:
        return sample_cosines(self.reference, self.outputs(names))

    def _override(self, name: str):
        layer = self.quantized[name]

        def compute(node: fx.Node, args: tuple, kwargs: dict) -> torch.Tensor:
            out = layer(activation_of(node, args))
            if self.bias_after.get(name):
                out = out + args[0]
            return out

        return compute


def downstream(graph: fx.Graph, names: set[str]) -> set[fx.Node]:
    """The nodes named and every node that (transitively) uses them."""
    reached: set[fx.Node] = set()
    for node in graph.nodes:  # topological order: a user comes after what it uses
        if node.name in names or any(arg in reached for arg in node.all_input_nodes):
            reached.add(node)
    return reached


def layer_sensitivity(simulator: Simulator, names: Sequence[str]) -> dict[str, float]:
    """``1 - mean per-sample cosine`` with each layer alone quantized."""
    return {name: float(1.0 - simulator.cosines([name]).mean()) for name in names}


def plan_mixed_precision(simulator: Simulator, by_sensitivity: Sequence[str], target_cosine: float) -> tuple[int, list[PlanProbe]]:
    """(how many of the most sensitive layers to keep, the probes that decided it)."""
    probes: dict[int, PlanProbe] = {}

    def probe(kept: int) -> PlanProbe:
        if kept not in probes:
            cos = simulator.cosines(list(by_sensitivity[kept:]))
            probes[kept] = PlanProbe(kept, float(cos.mean()), float(cos.min()))
        return probes[kept]

    low, high = 0, len(by_sensitivity)
    if probe(0).mean_cosine >= target_cosine:
        return 0, list(probes.values())
    while high - low > 1:  # invariant: probe(low) misses the target, keeping `high` layers meets it
        mid = (low + high) // 2
        if probe(mid).mean_cosine >= target_cosine:
            high = mid
        else:
            low = mid
    return high, sorted(probes.values(), key=lambda p: p.kept)

"""Attention transfer: fit each trainable approximation to the exact attention it replaced.

Hedgehog (Zhang et al., ICLR 2024) and LoLCATs (ICLR 2025) linearise a pretrained model in
two steps: first every approximate layer learns, on its own, to reproduce the softmax
attention *outputs* of the original layer from that layer's real queries, keys and values
("attention transfer"); then a short end-to-end fine-tune (here ``distill``) recovers what
the per-layer errors add up to. The first step needs no end-to-end backward pass, so it
is cheap.

How: one ``fx.Interpreter`` run per batch records, at every trainable attention node,
its inputs ``q, k, v, key_bias`` and the exact attention of them, and hands the exact
output on downstream, so the activations recorded in later layers are those of the
exact program (the teacher), not of earlier approximations. Each node's parameters (the
ones :data:`TRAINABLE` names for its op) are then trained with Adam on the relative
squared error over real (non-padded) query positions, everything else frozen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import fx

from graphopt.attention import pooled, reference
from graphopt.attention.analysis import SDPA, flat_inputs
from graphopt.program import Program, module_path

Batch = tuple[tuple, dict]


@dataclass(frozen=True)
class Trainable:
    """Where a trainable attention op keeps its parameters and options among its arguments
    (``q, k, v, key_bias`` come first for every one)."""

    params: tuple[int, ...]
    scale: int
    causal: int | None = None  # the argument holding is_causal; None: the op has no causal form
    # The op's eager reference, called with the op's arguments: training differentiates it
    # directly (the op's own backward recomputes it, one forward more per step).
    reference: Callable[..., torch.Tensor] | None = None


TRAINABLE: dict[object, Trainable] = {
    torch.ops.graphopt.hedgehog_attention.default: Trainable(params=(4, 5, 6, 7, 8), scale=9, causal=12, reference=reference.hedgehog_attention),
    torch.ops.graphopt.linformer_attention.default: Trainable(params=(4, 5), scale=6, reference=pooled.linformer_reference),
    torch.ops.graphopt.nystrom_learned_attention.default: Trainable(params=(4,), scale=5, reference=pooled.nystrom_learned_reference),
}


def register_trainable(op: object, spec: Trainable) -> None:
    """Make attention transfer train ``op`` (an OpOverload) too."""
    TRAINABLE[op] = spec


@dataclass(frozen=True)
class Site:
    node: fx.Node
    layer: int  # index among the program's trainable attention nodes
    spec: Trainable

    @property
    def scale(self) -> float:
        return float(self.node.args[self.spec.scale])  # type: ignore[arg-type]

    @property
    def causal(self) -> bool:
        return bool(self.node.args[self.spec.causal]) if self.spec.causal is not None else False

    def parameters(self, gm: fx.GraphModule) -> list[torch.nn.Parameter]:
        return [gm.get_parameter(str(self.node.args[i].target)) for i in self.spec.params]  # type: ignore[union-attr]

    def exact(self, q, k, v, key_bias) -> torch.Tensor:
        return reference.exact_attention(q, k, v, key_bias, self.scale, self.causal)

    def approximate(self, q, k, v, key_bias) -> torch.Tensor:
        args = list(self.node.args)
        args[:4] = [q, k, v, key_bias]
        gm = program_module(self)
        for i in self.spec.params:
            args[i] = gm.get_parameter(str(args[i].target))  # type: ignore[union-attr]
        function = self.spec.reference or self.node.target
        return function(*args, **self.node.kwargs)  # type: ignore[operator]


def trainable_sites(program: Program) -> list[Site]:
    """The program's trainable attention nodes; ``layer`` counts every attention node
    (exact SDPA too) in graph order, as ``approx-attention``'s layer indices do."""
    attention = [n for n in program.graph.nodes if n.op == "call_function" and (n.target in TRAINABLE or n.target is SDPA)]
    return [Site(node, i, TRAINABLE[node.target]) for i, node in enumerate(attention) if node.target in TRAINABLE]


@dataclass
class Sample:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_bias: torch.Tensor
    exact: torch.Tensor

    @property
    def weight(self) -> torch.Tensor:
        """(batch or 1, 1, seq, 1): 1 at real query positions (the key-padding mask's keys)."""
        bias = self.key_bias.reshape(self.key_bias.shape[0], -1)
        valid = (bias > reference.PADDING_BIAS).to(self.exact.dtype)
        return valid.expand(-1, self.exact.shape[-2])[:, None, :, None] if valid.shape[-1] == 1 else valid[:, None, :, None]


def capture(program: Program, sites: Sequence[Site], batches: Sequence[Batch]) -> dict[str, list[Sample]]:
    """Every site's inputs and exact output on each batch, the exact output handed on."""
    wanted = {site.node: site for site in sites}
    store: dict[str, list[Sample]] = {site.node.name: [] for site in sites}

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            site = wanted.get(node)
            if site is None:
                return super().run_node(node)
            args, _ = self.fetch_args_kwargs_from_env(node)
            q, k, v, key_bias = (t.detach() for t in args[:4])
            exact = site.exact(q, k, v, key_bias)
            store[node.name].append(Sample(q, k, v, key_bias, exact))
            return exact

    with torch.no_grad():
        for args, kwargs in batches:
            Recorder(program.module).run(*flat_inputs(program, args, kwargs))
    return store


def sample_error(site: Site, samples: Sequence[Sample]) -> float:
    """‖approx − exact‖ / ‖exact‖ over the real query positions of every sample."""
    num = den = 0.0
    with torch.no_grad():
        for s in samples:
            w = s.weight
            num += float((((site.approximate(s.q, s.k, s.v, s.key_bias) - s.exact) ** 2) * w).sum())
            den += float(((s.exact**2) * w).sum())
    return math.sqrt(num / max(den, 1e-30))


def fit(site: Site, samples: Sequence[Sample], *, steps: int, lr: float, seed: int = 0, progress: Callable[[int, float], None] | None = None) -> float:
    """Train ``site``'s parameters on ``samples`` for ``steps`` steps (one sample per step,
    seeded order, Adam with cosine decay); returns the last training loss (relative MSE)."""
    params = site.parameters(program_module(site))
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    order = torch.randperm(len(samples) * max(1, -(-steps // len(samples))), generator=torch.Generator().manual_seed(seed)) % len(samples)
    loss_value = float("nan")
    try:
        for step in range(steps):
            s = samples[int(order[step])]
            w = s.weight
            loss = (((site.approximate(s.q, s.k, s.v, s.key_bias) - s.exact) ** 2) * w).sum() / ((s.exact**2) * w).sum().clamp(min=1e-30)
            if not loss.requires_grad:  # the op took its exact path: nothing of it is used at this length
                raise ValueError(f"{describe(site)}: the approximation is exact attention at the training length {s.q.shape[-2]} (its threshold), so it has nothing to learn")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_value = float(loss.detach())
            if progress is not None:
                progress(step, loss_value)
    finally:
        for p in params:
            p.requires_grad_(False)
    return loss_value


def program_module(site: Site) -> fx.GraphModule:
    gm = site.node.graph.owning_module
    if gm is None:
        raise ValueError(f"{site.node.name} belongs to no GraphModule")
    return gm


def describe(site: Site) -> str:
    return module_path(site.node) or site.node.name

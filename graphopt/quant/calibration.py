"""Activation ranges observed on calibration data (static int8's scales and zero points).

The data comes from the pass context (``PassContext.calibration_batches``); running the
program over it while observing chosen nodes is :mod:`graphopt.analysis.interpret`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ActivationRange:
    """Running min / max of a node's input over the calibration batches, and a histogram sample."""

    low: float = float("inf")
    high: float = float("-inf")
    channel_absmax: torch.Tensor | None = None
    samples: list[torch.Tensor] = field(default_factory=list)

    def update(self, x: torch.Tensor, keep_samples: bool = False) -> None:
        x = x.detach().float()
        self.low = min(self.low, float(x.min()))
        self.high = max(self.high, float(x.max()))
        per_channel = x.reshape(-1, x.shape[-1]).abs().amax(dim=0)
        self.channel_absmax = per_channel if self.channel_absmax is None else torch.maximum(self.channel_absmax, per_channel)
        if keep_samples:
            flat = x.reshape(-1)
            step = max(1, flat.numel() // 65536)
            self.samples.append(flat[::step].clone())

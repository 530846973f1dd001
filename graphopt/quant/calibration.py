"""Activation ranges observed on calibration data (static int8's scales and zero points).

The data comes from the pass context (``PassContext.calibration_batches``); running the
program over it while observing chosen nodes is :mod:`graphopt.analysis.interpret`.
"""

from __future__ import annotations

import math
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


METHODS = ("minmax", "percentile", "mse")
# Clipping candidates the MSE search tries: fractions of the observed range.
MSE_FRACTIONS = tuple(1.0 - 0.02 * i for i in range(36))  # 1.0 down to 0.30


def calibrated_range(observed: ActivationRange, method: str = "minmax", percentile: float = 99.99) -> tuple[float, float]:
    """The (low, high) a static uint8 activation covers: the observed extremes (``minmax``);
    the ``100 - percentile`` and ``percentile`` percentiles of the sampled values (``percentile``:
    a rare outlier no longer sets the step for everything else); or the fraction of the
    observed range whose quantize-dequantize round trip has the least squared error on the
    sampled values (``mse``). Ranges are widened to include 0 when they are turned into
    parameters (:func:`graphopt.quant.schemes.activation_qparams`)."""
    if method == "minmax":
        return observed.low, observed.high
    if not observed.samples:
        raise ValueError(f"calibration method {method!r} needs the sampled values (ActivationRange.update(keep_samples=True))")
    values = torch.cat(observed.samples)
    if method == "percentile":
        bounds = torch.quantile(values.double(), torch.tensor([1.0 - percentile / 100.0, percentile / 100.0], dtype=torch.float64))
        return float(bounds[0]), float(bounds[1])
    if method == "mse":
        low, high = min(observed.low, 0.0), max(observed.high, 0.0)
        best = (math.inf, low, high)
        for fraction in MSE_FRACTIONS:
            lo, hi = low * fraction, high * fraction
            error = float((_round_trip(values, lo, hi) - values).pow(2).mean())
            if error < best[0]:
                best = (error, lo, hi)
        return best[1], best[2]
    raise ValueError(f"unknown calibration method {method!r}; one of {list(METHODS)}")


def _round_trip(values: torch.Tensor, low: float, high: float) -> torch.Tensor:
    scale = (high - low) / 255.0 if high > low else 1.0
    zero_point = round(min(max(-low / scale, 0.0), 255.0))
    return (torch.clamp(torch.round(values / scale) + zero_point, 0, 255) - zero_point) * scale

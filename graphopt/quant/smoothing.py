"""SmoothQuant's per-channel scales, and the migration strength chosen by simulated int8 error.

A linear layer ``y = x Wᵀ + b`` computes the same thing as ``(x / s)(W · s)ᵀ + b`` for any
positive vector ``s`` over its input channels. Per-tensor int8 activations lose the small
channels to a few outlier channels; dividing those channels by ``s`` and multiplying the
matching weight columns by it moves the difficulty from the activation to the weight, whose
int8 scales are per output channel. SmoothQuant (Xiao et al., ICML 2023) takes
``s_k = max|x_k|^α / max|W_{:,k}|^(1-α)``.

:func:`choose_alpha` picks ``α`` for one group of layers reading one activation (Q, K and V
read the same LayerNorm output, so they share one ``s``) by simulating the int8 scheme that
will follow on calibration activations: the error of each candidate is the relative squared
error of the group's outputs, int8 against fp32, on a sample of rows, with the per-tensor
activation range taken over the whole batch (dynamic) or every batch (static), as ORT's
kernels take it. No smoothing at all is a candidate too, so a group whose activations have
no outliers is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from graphopt.quant.ops import quantize_activation_u8
from graphopt.quant.packing import quantize_per_channel_int8

DEFAULT_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)
# Rows of each calibration batch the error is measured on (the range is always the batch's).
SAMPLE_ROWS = 512
_TINY = 1e-5


@dataclass
class ActivationSample:
    """What the α search needs of one layer input over the calibration batches: per batch the
    per-channel min and max (the per-tensor range of ``x / s`` follows from them for any
    ``s > 0``), and a strided sample of rows."""

    channel_min: list[torch.Tensor] = field(default_factory=list)
    channel_max: list[torch.Tensor] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().float().reshape(-1, x.shape[-1])
        self.channel_min.append(flat.amin(dim=0))
        self.channel_max.append(flat.amax(dim=0))
        step = max(1, flat.shape[0] // SAMPLE_ROWS)
        self.rows.append(flat[::step][:SAMPLE_ROWS].clone())

    @property
    def absmax(self) -> torch.Tensor:
        return torch.maximum(torch.stack(self.channel_max).amax(0).abs(), torch.stack(self.channel_min).amin(0).abs())


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = max|x|^α / max|W|^(1-α)`` per input channel, clamped away from 0 (a channel that is
    always 0 keeps ``s = 1``)."""
    a = act_absmax.float().clamp(min=_TINY)
    w = weight_absmax.float().clamp(min=_TINY)
    s = (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=_TINY)
    return torch.where(act_absmax > 0, s, torch.ones_like(s))


def int8_error(sample: ActivationSample, weights: list[torch.Tensor], s: torch.Tensor | None, static: bool, weight_qmax: int) -> float:
    """Relative squared error of the group's int8 outputs (activations ``x / s`` uint8 per
    tensor, weights ``W · s`` int8 per output channel) against fp32, over the sampled rows."""
    inv = torch.ones_like(sample.rows[0][0]) if s is None else 1.0 / s
    lows = [(lo * inv).amin() for lo in sample.channel_min]
    highs = [(hi * inv).amax() for hi in sample.channel_max]
    if static:
        lows, highs = [min(lows)] * len(lows), [max(highs)] * len(highs)
    quantized = []
    for weight in weights:
        w_q, w_scale = quantize_per_channel_int8(weight if s is None else weight * s[None, :], weight_qmax)
        quantized.append((w_q.float(), w_scale))
    num = den = 0.0
    for rows, low, high in zip(sample.rows, lows, highs):
        low, high = torch.clamp(low, max=0.0), torch.clamp(high, min=0.0)
        scale = torch.where(high == low, torch.ones_like(high), (high - low) / 255.0)
        zero_point = torch.round(torch.clamp(-low / scale, 0.0, 255.0))
        codes = quantize_activation_u8(rows * inv, scale, zero_point) - zero_point
        for weight, (w_q, w_scale) in zip(weights, quantized):
            reference = rows @ weight.T
            got = (codes @ w_q) * (scale * w_scale)
            num += float((got - reference).pow(2).sum())
            den += float(reference.pow(2).sum())
    return num / max(den, 1e-30)


@dataclass
class AlphaChoice:
    alpha: float | None  # None: no smoothing is best
    error_before: float
    error_after: float
    errors: dict[str, float]  # candidate -> error ("none" for no smoothing)
    scales: torch.Tensor | None


def choose_alpha(
    sample: ActivationSample,
    weights: list[torch.Tensor],
    alphas: tuple[float, ...] = DEFAULT_ALPHAS,
    *,
    static: bool = False,
    weight_qmax: int = 127,
    min_gain: float = 0.05,
) -> AlphaChoice:
    """The ``α`` (or none) with the least simulated int8 error; smoothing is chosen only when it
    lowers the error by at least ``min_gain`` (relative)."""
    weight_absmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(0)
    act_absmax = sample.absmax
    before = int8_error(sample, weights, None, static, weight_qmax)
    errors = {"none": before}
    best: tuple[float, float, torch.Tensor] | None = None
    for alpha in alphas:
        s = smoothing_scales(act_absmax, weight_absmax, alpha)
        err = int8_error(sample, weights, s, static, weight_qmax)
        errors[f"{alpha:g}"] = err
        if best is None or err < best[1]:
            best = (alpha, err, s)
    if best is None or best[1] > before * (1.0 - min_gain):
        return AlphaChoice(None, before, before, errors, None)
    return AlphaChoice(best[0], before, best[1], errors, best[2])

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

:func:`choose_awq` does the same for weight-only n-bit quantization (AWQ): the candidates are
``s = mean|x|^α`` and the error is that of the group's outputs with group-wise n-bit weights
``W · s`` and float activations ``x / s``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from graphopt.quant.ops import quantize_activation_u8
from graphopt.quant.packing import dequantize_nbits, quantize_nbits, quantize_per_channel_int8

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
    return _least_error(
        lambda alpha: smoothing_scales(act_absmax, weight_absmax, alpha),
        lambda s: int8_error(sample, weights, s, static, weight_qmax),
        alphas, min_gain,
    )


# ---- weight-only n-bit: activation-aware scales (AWQ) -------------------------------------------
# AWQ (Lin et al., MLSys 2024): with weight-only quantization the activations stay in float, so
# nothing about them needs smoothing; what scaling buys is precision for the weight columns
# that meet large activations. ``s = mean|x|^α`` (normalised to a geometric mean of 1 between
# its extremes) enlarges those columns before the group-wise rounding, and the division
# of ``x`` by ``s`` shrinks the others' share of the output error. α = 0 is no scaling.
AWQ_ALPHAS = tuple(round(0.05 * i, 2) for i in range(1, 20))
# Rows the weight-only error is measured on (every batch's sample, strided down to this).
AWQ_ROWS = 2048


def activation_scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ's ``s = mean|x|^α``, divided by ``sqrt(max(s) · min(s))``; a channel that is always 0
    keeps ``s = 1``."""
    live = mean_abs > 0
    if not bool(live.any()):
        return torch.ones_like(mean_abs, dtype=torch.float32)
    s = mean_abs.float().clamp(min=_TINY).pow(alpha)
    s = s / (s[live].max() * s[live].min()).sqrt()
    return torch.where(live, s, torch.ones_like(s))


def _awq_rows(sample: ActivationSample) -> torch.Tensor:
    rows = torch.cat(sample.rows)
    return rows[:: max(1, rows.shape[0] // AWQ_ROWS)][:AWQ_ROWS]


def mean_abs(sample: ActivationSample) -> torch.Tensor:
    """Per channel, the mean ``|x|`` over the sampled rows: what AWQ's scales are powers of."""
    return _awq_rows(sample).abs().mean(dim=0)


def nbits_error_fn(sample: ActivationSample, weights: list[torch.Tensor], bits: int, block_size: int, symmetric: bool = False) -> Callable[[torch.Tensor | None], float]:
    """``s -> `` relative squared error of the group's outputs with weight-only n-bit weights
    ``W · s`` in blocks of ``block_size`` (activations ``x / s`` in float) against fp32, over
    sampled rows. The rows and the fp32 outputs' energy are taken once, for every candidate."""
    rows = _awq_rows(sample)
    energy = max(sum(float((rows @ weight.T).pow(2).sum()) for weight in weights), 1e-30)

    def error(s: torch.Tensor | None) -> float:
        num = 0.0
        for weight in weights:
            scaled = weight if s is None else weight * s[None, :]
            restored = dequantize_nbits(quantize_nbits(scaled, bits, block_size, symmetric))
            if s is not None:
                restored = restored / s[None, :]
            num += float((rows @ (restored - weight).T).pow(2).sum())
        return num / energy

    return error


def choose_awq(
    sample: ActivationSample,
    weights: list[torch.Tensor],
    alphas: tuple[float, ...] = AWQ_ALPHAS,
    *,
    bits: int = 4,
    block_size: int = 32,
    symmetric: bool = False,
    min_gain: float = 0.05,
) -> AlphaChoice:
    """The ``α`` (or none) whose activation-aware scales give the least simulated weight-only
    n-bit error; chosen only when it lowers the error by at least ``min_gain`` (relative)."""
    magnitude = mean_abs(sample)
    return _least_error(lambda alpha: activation_scales(magnitude, alpha), nbits_error_fn(sample, weights, bits, block_size, symmetric), alphas, min_gain)


def _least_error(scales_of: Callable[[float], torch.Tensor], error_of: Callable[[torch.Tensor | None], float], alphas: tuple[float, ...], min_gain: float) -> AlphaChoice:
    before = error_of(None)
    errors = {"none": before}
    best: tuple[float, float, torch.Tensor] | None = None
    for alpha in alphas:
        s = scales_of(alpha)
        err = error_of(s)
        errors[f"{alpha:g}"] = err
        if best is None or err < best[1]:
            best = (alpha, err, s)
    if best is None or best[1] > before * (1.0 - min_gain):
        return AlphaChoice(None, before, before, errors, None)
    return AlphaChoice(best[0], before, best[1], errors, best[2])

"""Quantization schemes: from a linear site's fp32 weight to the tensors of a quantized op.

A :class:`Scheme` says how one layer is stored and computed; :func:`quantize_linear` turns
a site's weight (and bias, and calibrated activation range for static int8) into a
:class:`QuantizedLinear`: the custom op, its tensor inputs and its int attributes. The
same object computes the layer in simulation (sensitivity) and becomes graph nodes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from graphopt.errors import ConfigError
from graphopt.quant import ops  # noqa: F401  (defines torch.ops.graphopt)
from graphopt.quant.packing import quantize_nbits, quantize_per_channel_int8

KINDS = ("int8_dynamic", "int8_static", "nbits", "fp32")


@dataclass(frozen=True)
class Scheme:
    kind: str  # one of KINDS
    bits: int = 8
    block_size: int = 128
    accuracy_level: int = 4
    symmetric: bool = False
    weight_qmax: int = 127

    def label(self) -> str:
        if self.kind == "fp32":
            return "fp32"
        if self.kind == "nbits":
            return f"int{self.bits} weight-only (g{self.block_size})"
        rng = "" if self.weight_qmax == 127 else f", weights ±{self.weight_qmax}"
        return f"int8 {self.kind.split('_')[1]}{rng}"


@dataclass
class QuantizedLinear:
    op: Callable[..., torch.Tensor]  # an OpOverload of torch.ops.graphopt
    tensors: dict[str, torch.Tensor]  # inputs after x, in the op's order
    attributes: tuple = ()  # trailing int arguments
    padded: int = 0  # input rows added to fill the last n-bit block

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, *self.tensors.values(), *self.attributes)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def quantize_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scheme: Scheme,
    activation_range: tuple[float, float] | None = None,
    hessian: torch.Tensor | None = None,
) -> QuantizedLinear:
    """``weight [N, K]``, ``bias [N]`` or None -> the quantized op and its tensors.

    ``hessian`` (``X^T X`` of the layer's calibration inputs) makes n-bit rounding GPTQ's."""
    N, K = weight.shape
    bias = torch.zeros(N) if bias is None else bias.detach().float().clone()
    graphopt = torch.ops.graphopt
    if scheme.kind == "int8_dynamic":
        w_q, w_scale = quantize_per_channel_int8(weight, scheme.weight_qmax)
        return QuantizedLinear(graphopt.linear_dynamic_int8.default, {"w_q": w_q, "w_scale": w_scale, "bias": bias})
    if scheme.kind == "int8_static":
        if activation_range is None:
            raise ConfigError("static int8 needs the activation range from calibration")
        x_scale, x_zero_point = activation_qparams(*activation_range)
        w_q, w_scale = quantize_per_channel_int8(weight, scheme.weight_qmax)
        w_zero_point = torch.zeros(N, dtype=torch.int8)
        tensors = {"x_scale": x_scale, "x_zero_point": x_zero_point, "w_q": w_q, "w_scale": w_scale, "w_zero_point": w_zero_point, "bias": bias}
        return QuantizedLinear(graphopt.linear_static_int8.default, tensors)
    if scheme.kind == "nbits":
        if hessian is not None and K % scheme.block_size == 0:
            from graphopt.quant.gptq import gptq_nbits

            q = gptq_nbits(weight, hessian, scheme.bits, scheme.block_size, scheme.symmetric)
        else:
            q = quantize_nbits(weight, scheme.bits, scheme.block_size, scheme.symmetric)
        tensors = {"w_packed": q.packed, "scales": q.scales, "zero_points": q.zero_points, "bias": bias}
        attributes = (K, N, scheme.bits, scheme.block_size, scheme.accuracy_level)
        return QuantizedLinear(graphopt.linear_nbits.default, tensors, attributes, q.padded)
    raise ConfigError(f"no quantized op for scheme kind {scheme.kind!r}")


def activation_qparams(low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 asymmetric (scale, zero point) covering [low, high] widened to include 0."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255.0 if high > low else 1.0
    zero_point = round(min(max(-low / scale, 0.0), 255.0))
    return torch.tensor(scale, dtype=torch.float32), torch.tensor(zero_point, dtype=torch.uint8)


def quantize_embedding(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: ``table [V, D]`` -> (codes int8 [V, D], scales fp32 [V, 1])."""
    w = table.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.clamp(torch.round(w / scales), -127, 127).to(torch.int8), scales

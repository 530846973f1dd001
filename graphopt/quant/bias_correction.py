"""Bias correction: fold each quantized layer's mean output shift into its bias.

Rounding weights and activations to int8 moves a layer's outputs on average, not only at
random: ``E[x] (W - Ŵ)ᵀ`` is a constant shift per output channel wherever the input has a
non-zero mean (LayerNorm and GELU outputs do), and the next LayerNorm does not remove it.
Bias correction (Nagel et al., "Data-Free Quantization", ICCV 2019; NNCF's fast bias
correction) measures that shift on calibration data and subtracts it.

:func:`bias_corrections` runs the fp32 graph once per calibration batch with every planned
layer computed by its quantized form, so each layer sees the input it will see once the
whole model is quantized (upstream rounding included), and compares, on that same input,
the quantized output with the fp32 layer's: the mean difference over the real tokens (a batch's
``attention_mask``, where it has one; padded positions compute outputs nothing reads) is the
correction. One run over the data for all layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import fx

from graphopt.analysis.interpret import activation_of, run_batch
from graphopt.analysis.linear import LinearSite
from graphopt.context import Batch
from graphopt.quant.schemes import QuantizedLinear


def bias_corrections(gm: fx.GraphModule, batches: Sequence[Batch], layers: Mapping[str, QuantizedLinear], sites: Mapping[str, LinearSite]) -> dict[str, torch.Tensor]:
    """Per planned node: ``mean(fp32 layer(x) - quantized layer(x))`` over the calibration rows."""
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    real: list[torch.Tensor | None] = [None]  # the current batch's real-token mask, [B, S]

    def override_for(name: str):
        site, layer = sites[name], layers[name]
        weight = site.weight(gm).float()

        def compute(node: fx.Node, args: tuple, kwargs: dict) -> torch.Tensor:
            x = activation_of(node, args)
            quantized = layer(x)
            reference = torch.nn.functional.linear(x.float(), weight, layer.tensors["bias"].float())
            diff = (reference - quantized.float()).double()
            mask = real[0]
            if mask is not None and tuple(diff.shape[:2]) == tuple(mask.shape):
                diff = diff[mask]  # padded positions compute outputs nothing reads: not part of the mean
            diff = diff.reshape(-1, quantized.shape[-1])
            sums[name] = sums[name] + diff.sum(0) if name in sums else diff.sum(0)
            rows[name] = rows.get(name, 0) + diff.shape[0]
            return quantized + args[0] if site.bias_node is not None else quantized

        return compute

    override = {name: override_for(name) for name in layers}
    for args, kwargs in batches:
        mask = kwargs.get("attention_mask")
        real[0] = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        run_batch(gm, args, kwargs, override=override)
    return {name: (sums[name] / rows[name]).float() for name in sums}


def corrected(layer: QuantizedLinear, correction: torch.Tensor) -> QuantizedLinear:
    """``layer`` with ``correction`` added to its bias (its other tensors shared, not copied)."""
    tensors = dict(layer.tensors)
    tensors["bias"] = (tensors["bias"].float() + correction).to(tensors["bias"].dtype)
    return QuantizedLinear(layer.op, tensors, layer.attributes, layer.padded)

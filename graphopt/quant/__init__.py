"""Quantization: custom ops with eager references, calibration, sensitivity; their ONNX
lowerings (graphopt.quant.lowering) are imported by graphopt.export, not here."""

from graphopt.lowerings import declare_lowerings
from graphopt.quant import ops

declare_lowerings("graphopt.quant.lowering")

__all__ = ["ops"]

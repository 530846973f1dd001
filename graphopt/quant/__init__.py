"""Quantization: custom ops with eager references, their ORT lowerings, calibration, sensitivity."""

from graphopt.quant import lowering as _lowering  # noqa: F401  (registers the ONNX lowerings)
from graphopt.quant import ops

"""The registry of ONNX lowerings for graphopt's custom ops (bottom layer: no ONNX imports).

An op package that defines ``torch.library`` custom ops (``graphopt.quant``,
``graphopt.attention``, ``graphopt.cluster``) declares the module that holds their
lowerings (onnxscript functions, typically using ``com.microsoft`` kernels) with
:func:`declare_lowerings`; the module registers each with :func:`register_lowering` when it
is imported. :func:`lowering_table` imports every declared module and returns the table
``graphopt.export.to_onnx`` passes to the exporter. So a program holding the ops exports
without further set-up, and importing the ops (or any pass) loads neither onnxscript nor
onnxruntime.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

_LOWERINGS: dict[Any, Callable] = {}
_MODULES: list[str] = []


def register_lowering(op: Any, lowering: Callable | None = None) -> Any:
    """Register ``lowering`` for ``op`` (an OpOverload); usable as a decorator."""

    def decorate(fn: Callable) -> Callable:
        _LOWERINGS[op] = fn
        return fn

    return decorate(lowering) if lowering is not None else decorate


def declare_lowerings(module: str) -> None:
    """Name a module whose import registers lowerings; imported by :func:`lowering_table`."""
    if module not in _MODULES:
        _MODULES.append(module)


def lowering_table(extra: dict | None = None) -> dict:
    """Every registered lowering (declared modules imported first), overridden by ``extra``."""
    for module in _MODULES:
        importlib.import_module(module)
    table = dict(_LOWERINGS)
    table.update(extra or {})
    return table

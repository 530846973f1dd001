"""Registry of ONNX lowerings for graphopt's custom ops.

A pass that introduces a ``torch.library`` custom op registers how that op becomes ONNX
(an ``onnxscript.script`` function, typically using ``com.microsoft`` kernels) with
:func:`register_lowering`. :func:`graphopt.export.to_onnx` passes every registered
lowering to the exporter, so a program holding the op exports without further setup.
"""

from __future__ import annotations

from typing import Any, Callable

_LOWERINGS: dict[Any, Callable] = {}


def register_lowering(op: Any, lowering: Callable | None = None):
    """Register ``lowering`` for ``op`` (an OpOverload or custom op); usable as a decorator."""

    def decorate(fn: Callable) -> Callable:
        _LOWERINGS[op] = fn
        return fn

    return decorate(lowering) if lowering is not None else decorate


def lowering_table(extra: dict | None = None) -> dict:
    """Every registered lowering, overridden by ``extra`` (the caller's own table)."""
    table = dict(_LOWERINGS)
    table.update(extra or {})
    return table

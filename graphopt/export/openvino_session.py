"""OpenVINO's own runtime behind ONNX Runtime's session interface.

ORT's OpenVINO execution provider cannot sit beside onnxruntime 1.32 (``onnxruntime-openvino``
replaces the onnxruntime package) and the ``onnxruntime-ep-openvino`` plugin lists no device on
AMD CPUs, so the ``openvino`` target reads graphopt's ONNX with OpenVINO's runtime directly.
OpenVINO reads every com.microsoft op graphopt emits. The session answers ``run``,
``get_inputs`` and ``get_outputs`` like ``ort.InferenceSession``, so parity, latency, held-out
fidelity and bundles use it unchanged.

Precision is OpenVINO's ``INFERENCE_PRECISION_HINT``: ``fp32`` runs f32 kernels, ``bf16``
bf16 ones, which is refused on a CPU without bf16 instructions (OpenVINO would silently run
f32 there).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphopt.errors import ConfigError, ExportError

RUNTIME = "OpenVINORuntime"
PRECISIONS = {"fp32": "f32", "bf16": "bf16"}

_DTYPES = {
    "f32": "tensor(float)", "f64": "tensor(double)", "f16": "tensor(float16)", "i64": "tensor(int64)",
    "i32": "tensor(int32)", "i8": "tensor(int8)", "u8": "tensor(uint8)", "boolean": "tensor(bool)",
}


def available() -> bool:
    """Whether the ``openvino`` package is importable."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def capabilities() -> list[str]:
    """OpenVINO's CPU optimization capabilities (``BF16``, ``INT8``, ...)."""
    import openvino as ov

    return [str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def resolve_precision(precision: str) -> str:
    """``"auto"``: ``"bf16"`` where OpenVINO reports bf16 kernels on this CPU (AVX-512 BF16 or
    AMX), else ``"fp32"``, as OpenVINO's own default precision hint chooses. Others unchanged."""
    if precision != "auto":
        return precision
    return "bf16" if "BF16" in capabilities() else "fp32"


def check_precision(precision: str) -> str:
    """The OpenVINO hint for ``precision``; a clear error when it is unknown or this CPU lacks it."""
    precision = resolve_precision(precision)
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {[*sorted(PRECISIONS), 'auto']} on the OpenVINO runtime, got {precision!r}")
    if precision == "bf16" and "BF16" not in capabilities():
        raise ConfigError("precision 'bf16' needs a CPU with bf16 instructions (AVX-512 BF16 or AMX); "
                          f"OpenVINO reports only {capabilities()} here, and would run f32 kernels instead")
    return PRECISIONS[precision]


@dataclass(frozen=True)
class _Arg:
    """What ``ort.NodeArg`` tells: name, shape (symbolic dimensions as names), element type."""

    name: str
    shape: list[Any]
    type: str


def _args(ports, names: Sequence[str]) -> list[_Arg]:
    args = []
    for port, name in zip(ports, names, strict=True):
        shape = [d.get_length() if d.is_static else f"d{i}" for i, d in enumerate(port.get_partial_shape())]
        args.append(_Arg(name, shape, _DTYPES.get(port.get_element_type().get_type_name(), str(port.get_element_type()))))
    return args


class OpenVINOSession:
    """An OpenVINO CPU model compiled from an ONNX file or bytes, run like an ORT session.

    Inputs and outputs keep the ONNX graph's names and order (OpenVINO may add aliases to a
    port's names; the ONNX ones are what callers feed and fetch)."""

    def __init__(self, model: str | os.PathLike | bytes | onnx.ModelProto, *, threads: int | None = None, precision: str = "fp32"):
        import openvino as ov

        hint = check_precision(precision)
        self.precision = resolve_precision(precision)
        core = ov.Core()
        with tempfile.TemporaryDirectory(prefix="graphopt-ov-") as tmp:
            path = _as_path(model, Path(tmp))
            graph = onnx.load(os.fspath(path), load_external_data=False).graph
            self._input_names = [i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}]
            self._output_names = [o.name for o in graph.output]
            try:
                read = core.read_model(os.fspath(path))
            except Exception as exc:  # OpenVINO raises its own RuntimeError subclasses
                raise ExportError(f"OpenVINO could not read the model: {exc}") from exc
            config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": hint}  # the CPU plugin's default performance hint is LATENCY
            if threads is not None:
                config["INFERENCE_NUM_THREADS"] = int(threads)
            try:  # compiled while the file still exists: the ONNX reader may map its weights
                self._compiled = core.compile_model(read, "CPU", config)
            except Exception as exc:
                raise ExportError(f"OpenVINO could not compile the model for the CPU: {exc}") from exc
        self._request = self._compiled.create_infer_request()
        self._in_ports = {name: self._port(self._compiled.inputs, name) for name in self._input_names}
        self._out_ports = {name: self._port(self._compiled.outputs, name) for name in self._output_names}

    @staticmethod
    def _port(ports, name: str):
        for port in ports:
            if name in port.get_names():
                return port
        raise ExportError(f"OpenVINO's compiled model has no port named {name!r}")

    def get_inputs(self) -> list[_Arg]:
        return _args([self._in_ports[n] for n in self._input_names], self._input_names)

    def get_outputs(self) -> list[_Arg]:
        return _args([self._out_ports[n] for n in self._output_names], self._output_names)

    def get_providers(self) -> list[str]:
        return [RUNTIME]

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, Any], run_options: Any = None) -> list[np.ndarray]:
        unknown = set(input_feed) - set(self._in_ports)
        if unknown:
            raise ExportError(f"inputs {sorted(unknown)} are not inputs of the model (it has {self._input_names})")
        feed = {self._in_ports[name]: np.ascontiguousarray(value) for name, value in input_feed.items()}
        results = self._request.infer(feed, share_inputs=False, share_outputs=False)
        names = list(output_names) if output_names else self._output_names
        return [np.asarray(results[self._out_ports[name]]) for name in names]  # share_outputs=False: already copies


def _as_path(model: str | os.PathLike | bytes | onnx.ModelProto, tmp: Path) -> Path:
    """A file OpenVINO can read: the path itself, or bytes/a proto written into ``tmp``."""
    if isinstance(model, (str, os.PathLike)):
        return Path(model)
    path = tmp / "model.onnx"
    if isinstance(model, onnx.ModelProto):
        onnx.save_model(model, os.fspath(path))
    else:
        path.write_bytes(bytes(model))
    return path

"""ONNX Runtime sessions: execution provider choice, threads, optimization level, timing."""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from graphopt.errors import ConfigError, ExportError

from . import openvino_session
from .onnx_export import (
    UnsafeExternalDataError,
    external_data_locations,
    validate_model_external_data,
)

# Short names for the providers people ask for; full ORT names are accepted as well.
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",  # ORT's EP where installed, else OpenVINO's runtime
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
}

GRAPH_OPTIMIZATION_LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}

# ORT graph fusions measured slower than the ops they replace, per provider. "auto" in
# make_session disables these; the build step re-measures each on the model it deploys
# (tune_disabled_optimizers) and keeps only what is faster there.
#
# SkipLayerNormFusion (Add + LayerNormalization -> com.microsoft.SkipLayerNormalization),
# ORT 1.32 CPU, AVX-512, one op on a (1, 128, 384) float tensor: 0.195 ms fused against
# 0.022 ms for Add + LayerNormalization at 1 thread, 0.102 against 0.044 ms at 2 threads;
# MiniLM end to end (12 of them): 17.9 -> 15.9 ms at 1 thread, 11.1 -> 10.7 ms at 2.
KNOWN_SLOW_FUSIONS: dict[str, tuple[str, ...]] = {"CPUExecutionProvider": ("SkipLayerNormFusion",)}

# ONNX tensor type strings as ORT reports them -> numpy dtypes.
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


class ProviderError(ExportError, ValueError):
    """The requested execution provider is unknown or not installed."""


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build offers, in ORT's preference order."""
    return list(ort.get_available_providers())


def resolve_provider(provider: str) -> str:
    """``"cpu"`` / ``"cuda"`` / ... or a full ORT name -> the installed provider's ORT name."""
    if not isinstance(provider, str):
        raise ConfigError(f"provider must be a name such as 'cpu' or 'cuda', got {provider!r}")
    name = PROVIDER_ALIASES.get(provider.lower(), provider)
    available = available_providers()
    if name in available:
        return name
    if name in ("OpenVINOExecutionProvider", openvino_session.RUNTIME) and openvino_session.available():
        # No OpenVINO EP in this onnxruntime build (the usual case: it needs its own
        # onnxruntime package): OpenVINO's runtime reads the ONNX file itself.
        return openvino_session.RUNTIME
    if name == "OpenVINOExecutionProvider":
        raise ProviderError(f"provider {provider!r}: neither this onnxruntime build ({available}) nor Python has OpenVINO; "
                            "install it with `pip install graphopt[openvino]` (OpenVINO's runtime then runs the model)")
    known = sorted(set(PROVIDER_ALIASES) | set(PROVIDER_ALIASES.values()))
    if name not in known:
        raise ProviderError(f"unknown execution provider {provider!r}; installed: {available}; known names: {sorted(PROVIDER_ALIASES)}")
    raise ProviderError(
        f"execution provider {provider!r} ({name}) is not installed in this onnxruntime build; installed: {available}"
        + (" (the CUDA provider needs the onnxruntime-gpu package)" if name == "CUDAExecutionProvider" else "")
    )


def resolve_precision(provider: str, precision: str) -> str:
    """The precision a session on ``provider`` runs at for the requested ``precision``:
    ``"auto"`` is OpenVINO's choice on its runtime (``"bf16"`` on CPUs with bf16 kernels, else
    ``"fp32"``) and ``"fp32"`` on ORT's providers, which run what the graph declares."""
    if precision != "auto":
        return precision
    if resolve_provider(provider) == openvino_session.RUNTIME:
        return openvino_session.resolve_precision(precision)
    return "fp32"


def make_session(
    path_or_bytes: str | os.PathLike | bytes | onnx.ModelProto,
    *,
    provider: str = "cpu",
    threads: int | None = None,
    inter_threads: int | None = None,
    graph_optimization: str = "all",
    optimized_model_path: str | os.PathLike | None = None,
    disabled_optimizers: str | Sequence[str] | None = None,
    precision: str = "fp32",
) -> ort.InferenceSession:
    """An ``InferenceSession`` on ``provider`` (CPU as the fallback for nodes it lacks).

    ``provider="openvino"`` without ORT's OpenVINO EP gives an
    :class:`~graphopt.export.openvino_session.OpenVINOSession` (same ``run`` / ``get_inputs``
    interface); ``precision`` (``"fp32"``, ``"bf16"`` or ``"auto"``: see :func:`resolve_precision`)
    is its inference precision. ORT's own
    providers run what the graph declares: ``"bf16"`` there is an error (ORT 1.32 has no bf16
    MatMul, Gemm or Add kernels on x86), and the ORT graph options do not apply to OpenVINO.

    ``threads``/``inter_threads``: intra-/inter-op thread counts (``None``: ORT's default;
    inter-op threads only matter in parallel execution mode, which ``inter_threads > 1``
    turns on). ``optimized_model_path``: where ORT writes the graph it optimized.
    ``disabled_optimizers``: ORT graph transformers to leave out (names as ORT spells them,
    e.g. ``"SkipLayerNormFusion"``); ``"auto"`` leaves out :data:`KNOWN_SLOW_FUSIONS` of the
    provider; ``None`` keeps ORT's defaults.
    A model with external data is loaded from its path only after every data location
    was checked to stay inside the model's folder.
    """
    if graph_optimization not in GRAPH_OPTIMIZATION_LEVELS:
        raise ConfigError(f"graph_optimization must be one of {list(GRAPH_OPTIMIZATION_LEVELS)}, got {graph_optimization!r}")
    provider_name = resolve_provider(provider)
    precision = resolve_precision(provider, precision)
    if provider_name == openvino_session.RUNTIME:
        if threads is not None:
            _positive(threads, "threads")
        # _model_source: the same checks (file exists, external data stays in its folder) as ORT's
        return openvino_session.OpenVINOSession(_model_source(path_or_bytes)[0], threads=threads, precision=precision)
    if precision != "fp32":
        raise ConfigError(f"precision {precision!r} needs provider 'openvino': onnxruntime's {provider_name} has no bf16 kernels for "
                          "MatMul, Gemm or Add on x86, so it runs the graph in the precision it declares")
    options = ort.SessionOptions()
    options.graph_optimization_level = GRAPH_OPTIMIZATION_LEVELS[graph_optimization]
    if threads is not None:
        options.intra_op_num_threads = _positive(threads, "threads")
    if inter_threads is not None:
        options.inter_op_num_threads = _positive(inter_threads, "inter_threads")
        if inter_threads > 1:
            options.execution_mode = ort.ExecutionMode.ORT_PARALLEL

    source, proto = _model_source(path_or_bytes)
    external = bool(external_data_locations(proto))
    if {i.name for i in proto.graph.input} & {t.name for t in proto.graph.initializer}:
        # ORT warns at load about every input with a default (an overridable initializer), which
        # graphopt's decoders declare on purpose (logits_to_keep, graphopt.export.keep_logits)
        options.log_severity_level = 3
    del proto  # without external data it holds every weight: gone before ORT loads its own copy
    if optimized_model_path is not None:
        out = Path(optimized_model_path).absolute()
        out.parent.mkdir(parents=True, exist_ok=True)
        options.optimized_model_filepath = str(out)
        if isinstance(source, str) and external:
            # A big model's optimized form needs its weights beside it, not in the proto.
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{out.name}.data")

    providers = [provider_name] if provider_name == "CPUExecutionProvider" else [provider_name, "CPUExecutionProvider"]
    disabled = resolve_disabled_optimizers(disabled_optimizers, provider_name)
    try:
        session = ort.InferenceSession(source, sess_options=options, providers=providers, disabled_optimizers=disabled)
    except Exception as exc:  # ORT raises its own exception types
        raise ExportError(f"onnxruntime could not load the model on {provider_name}: {exc}") from exc
    if provider_name not in session.get_providers():
        # ORT falls back to CPU with only a log line when a provider fails to initialise.
        raise ProviderError(f"{provider_name} failed to initialise; the session runs on {session.get_providers()}")
    return session


def resolve_disabled_optimizers(value: str | Sequence[str] | None, provider: str = "cpu") -> list[str]:
    """``None`` -> [], ``"auto"`` -> the provider's :data:`KNOWN_SLOW_FUSIONS`, a list -> itself
    (checked: ORT silently ignores names it does not know, so a typo would go unnoticed;
    names must at least look like ORT's CamelCase transformer names)."""
    if value is None:
        return []
    if isinstance(value, str):
        if value != "auto":
            raise ConfigError(f"disabled_optimizers must be 'auto', None or a list of ORT transformer names, got {value!r}")
        return list(KNOWN_SLOW_FUSIONS.get(PROVIDER_ALIASES.get(provider.lower(), provider), ()))
    names = list(value)
    bad = [n for n in names if not isinstance(n, str) or not n[:1].isupper() or not n.isidentifier()]
    if bad:
        raise ConfigError(f"disabled_optimizers: {bad} are not ORT graph transformer names (such as 'SkipLayerNormFusion')")
    return names


def tune_disabled_optimizers(
    path: str | os.PathLike,
    inputs: Mapping[str, Any],
    *,
    provider: str = "cpu",
    threads: int | None = None,
    candidates: Sequence[str] | None = None,
    rounds: int = 7,
    runs_per_round: int = 10,
    min_gain: float = 0.02,
) -> dict[str, Any]:
    """Measure, on this model and machine, whether leaving out each candidate ORT fusion
    (default: the provider's :data:`KNOWN_SLOW_FUSIONS`) makes the session faster.

    Returns ``{"disabled_optimizers": [...], "trials": {name: {"with_ms", "without_ms",
    "gain"}}}``; a fusion is left out when doing so is at least ``min_gain`` faster (median of
    alternating rounds, one session alive at a time). Fusions are tried one at a time on top
    of those already left out."""
    provider_name = resolve_provider(provider)
    candidates = list(KNOWN_SLOW_FUSIONS.get(provider_name, ())) if candidates is None else resolve_disabled_optimizers(candidates)
    chosen: list[str] = []
    trials: dict[str, dict[str, float]] = {}
    for name in candidates:
        variants = {"with": chosen, "without": [*chosen, name]}

        def maker(names: list[str]) -> Callable[[], Any]:
            session = make_session(path, provider=provider, threads=threads, disabled_optimizers=names)
            return lambda: run(session, inputs)

        stats = alternating_latency({key: functools.partial(maker, names) for key, names in variants.items()}, rounds=rounds, runs_per_round=runs_per_round)
        with_ms, without_ms = stats["with"]["p50_ms"], stats["without"]["p50_ms"]
        gain = with_ms / without_ms - 1.0
        trials[name] = {"with_ms": with_ms, "without_ms": without_ms, "gain": gain}
        if gain >= min_gain:
            chosen.append(name)
    return {"disabled_optimizers": chosen, "trials": trials}


def _model_source(path_or_bytes: Any) -> tuple[str | bytes, onnx.ModelProto]:
    """What the runtime loads (a checked path, or bytes) and the model without its external data."""
    if isinstance(path_or_bytes, onnx.ModelProto):
        path_or_bytes = path_or_bytes.SerializeToString()
    if isinstance(path_or_bytes, (bytes, bytearray)):
        proto = onnx.load_from_string(bytes(path_or_bytes))
        if external_data_locations(proto):
            raise UnsafeExternalDataError("a model held in memory refers to external data; load it from its path instead")
        return bytes(path_or_bytes), proto
    path = Path(path_or_bytes)
    if not path.is_file():
        raise ExportError(f"no ONNX model at {path}")
    proto = onnx.load(str(path), load_external_data=False)
    validate_model_external_data(path, proto)
    return str(path), proto


def _positive(value: int, name: str) -> int:
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int or None, got {value!r}")
    return value


def run(session: ort.InferenceSession, inputs: Mapping[str, Any]) -> list[np.ndarray]:
    """Run ``session`` on named torch/numpy inputs, cast to the dtypes the model declares."""
    declared = {i.name: i.type for i in session.get_inputs()}
    missing = [name for name in declared if name not in inputs]
    unknown = [name for name in inputs if name not in declared]
    if missing or unknown:
        raise ExportError(f"inputs do not match the model: missing {missing}, unexpected {unknown}; the model takes {list(declared)}")
    feed = {name: _as_numpy(inputs[name], declared[name]) for name in declared}
    return session.run(None, feed)


def _as_numpy(value: Any, onnx_type: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16
            value = value.float()
        value = value.numpy()
    array = np.asarray(value)
    dtype = _ORT_DTYPES.get(onnx_type)
    return np.ascontiguousarray(array.astype(dtype, copy=False) if dtype is not None else array)


def _timed_runs(fn: Callable[[], Any], runs: int) -> list[float]:
    """Milliseconds of each of ``runs`` calls of ``fn``."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def measure_latency(fn: Callable[[], Any], *, warmup: int = 3, repeat: int = 20) -> dict[str, float]:
    """Wall-clock latency of ``fn()`` over ``repeat`` runs after ``warmup`` untimed ones."""
    if warmup < 0 or repeat < 1:
        raise ConfigError(f"need warmup >= 0 and repeat >= 1, got warmup={warmup}, repeat={repeat}")
    for _ in range(warmup):
        fn()
    times = _timed_runs(fn, repeat)
    return {
        "p50_ms": float(np.percentile(times, 50)),
        "p90_ms": float(np.percentile(times, 90)),
        "mean_ms": statistics.fmean(times),
        "runs": repeat,
    }


def interleaved_latency(fns: dict[str, Callable[[], Any]], rounds: int, runs_per_round: int, warmup: int = 2) -> dict[str, dict[str, float]]:
    """p50/p90 of several variants timed in interleaved rounds (each variant a few runs
    per round), so load from other processes falls on all of them alike. All variants stay
    alive: right for PyTorch callables; several ORT sessions should be timed with
    :func:`alternating_latency` instead (their idle thread pools disturb each other)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name] += _timed_runs(fn, runs_per_round)
    return {name: {"p50_ms": float(np.percentile(t, 50)), "p90_ms": float(np.percentile(t, 90))} for name, t in samples.items()}


def alternating_latency(
    makers: dict[str, Callable[[], Callable[[], Any]]], rounds: int, runs_per_round: int, warmup: int = 3
) -> dict[str, dict[str, Any]]:
    """Latency of variants with only one alive at a time, in alternating rounds.

    ``makers[name]()`` builds the variant (typically an ORT session) and returns the callable
    to time; each round builds every variant in turn, warms it up, times ``runs_per_round``
    runs and drops it before the next is built. Use it for ORT sessions: their intra-op
    threads spin after a run, and with several sessions alive the idle pools steal the
    cores of the one being timed. Measured here at 2 threads, MiniLM against its pruned
    heads-25% + FFN-50% form: 1.63x with one session alive at a time, 1.19x when the two
    sessions alternate while both are alive.

    Returns ``{name: {"p50_ms", "p90_ms", "round_p50_ms": [...]}}``; ``round_p50_ms`` lets a
    caller take per-round ratios, so a burst of load from other processes hits both sides.
    """
    import gc

    samples: dict[str, list[float]] = {name: [] for name in makers}
    per_round: dict[str, list[float]] = {name: [] for name in makers}
    for _ in range(rounds):
        for name, make in makers.items():
            fn = make()
            for _ in range(warmup):
                fn()
            times = _timed_runs(fn, runs_per_round)
            samples[name] += times
            per_round[name].append(statistics.median(times))
            del fn
            gc.collect()
    return {
        name: {"p50_ms": float(np.percentile(t, 50)), "p90_ms": float(np.percentile(t, 90)), "round_p50_ms": per_round[name]}
        for name, t in samples.items()
    }

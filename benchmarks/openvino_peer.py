"""OpenVINO peers for the MiniLM benchmarks (compare.py): fp32 under both precision hints, and
NNCF post-training int8. Benchmark-only: ``pip install -e .[bench]``; graphopt never imports it.

Each function returns a *variant* dict shaped like ``baselines.ort_variant``'s: ``fn_for(inputs)``
reads and compiles a fresh model and returns its runner (timing keeps one runtime alive at a
time), ``encoder(**inputs)`` gives ``last_hidden_state`` for fidelity from a compiled model of
its own, which ``release()`` drops; ``bytes`` is the size on disk.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphopt.data import tokenize


def openvino_version() -> str | None:
    """The installed OpenVINO's version, or None when it cannot be imported."""
    try:
        import openvino
    except ImportError:
        return None
    return str(openvino.__version__)


def default_precision(device: str = "CPU") -> str:
    """The inference precision OpenVINO's plugin picks by default on this machine (``bf16``
    on CPUs with AVX-512 BF16 or AMX, ``f32`` elsewhere)."""
    import openvino as ov

    return str(ov.Core().get_property(device, "INFERENCE_PRECISION_HINT").get_type_name())


def _read(path: Path):
    """The model at ``path``, dynamic in every input axis (batch and sequence)."""
    import openvino as ov

    model = ov.Core().read_model(str(path))
    shapes = [inp.get_partial_shape() for inp in model.inputs]
    if any(shape.rank.is_dynamic or any(dim.is_static for dim in shape) for shape in shapes):  # token inputs: [batch, sequence]
        model.reshape({inp.any_name: ov.PartialShape([-1, -1]) for inp in model.inputs})
    return model


def _config(threads: int, precision: str | None) -> dict[str, Any]:
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    return config


def _feed(declared: set[str], inputs: dict) -> dict[str, np.ndarray]:
    """Only the inputs the model declares, as contiguous int64 arrays (the export's dtype)."""
    out = {}
    for name, value in inputs.items():
        if name in declared:
            array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            out[name] = np.ascontiguousarray(array.astype(np.int64, copy=False))
    return out


def ov_variant(path: Path, threads: int, precision: str | None = None, *, note: str = "", files: Sequence[Path] | None = None) -> dict:
    """An OpenVINO model on CPU (``.onnx`` or ``.xml``) with ``threads`` inference threads and
    the ``precision`` hint (``None``: the plugin's default). ``files``: what counts as its size
    (default: the model file and its external data / weights)."""
    import openvino as ov

    compiled: dict[str, Any] = {}
    info: dict[str, str] = {}  # the precision the compiled model runs at (set by the first encoder call)

    def compile_model():
        return ov.Core().compile_model(_read(path), "CPU", _config(threads, precision))

    def fn_for(inputs):
        model = compile_model()
        request = model.create_infer_request()
        feed = _feed({name for inp in model.inputs for name in inp.get_names()}, inputs)
        # the compiled model lives as long as the runner: dropping the runner frees it
        return lambda model=model: request.infer(feed)

    def encoder(**inputs):
        if "fidelity" not in compiled:
            model = compile_model()
            compiled["fidelity"] = (model, model.create_infer_request())
            info["precision"] = str(model.get_property("INFERENCE_PRECISION_HINT").get_type_name())
        model, request = compiled["fidelity"]
        request.infer(_feed({name for inp in model.inputs for name in inp.get_names()}, inputs))
        return torch.from_numpy(np.array(request.get_output_tensor(0).data, copy=True))

    path = Path(path)
    if files is None:
        files = [path, *path.parent.glob(path.name + ".data")] + ([path.with_suffix(".bin")] if path.suffix == ".xml" else [])
    size = sum(p.stat().st_size for p in files if p.is_file())
    return {"fn_for": fn_for, "encoder": encoder, "bytes": size, "note": note, "release": compiled.clear,
            "info": info, "openvino": {"path": str(path), "precision": precision}}


def calibration_items(tokenizer, texts: Sequence[str], names: Sequence[str] | None, max_length: int = 128) -> list[dict[str, np.ndarray]]:
    """One calibration item per text: batch 1, tokenized as graphopt's calibration batches are
    (``graphopt.data.tokenize``, truncated to ``max_length``), so no padding enters the ranges."""
    items = []
    for text in texts:
        tensors = tokenize(tokenizer, [text], max_length=max_length)
        items.append({k: v.numpy() for k, v in tensors.items() if names is None or k in names})
    return items


def nncf_int8(fp32_onnx: Path, items: list[dict[str, np.ndarray]], folder: Path, say: Callable[[str], None] = print) -> tuple[Path, dict]:
    """NNCF post-training int8 (``ModelType.TRANSFORMER``, its defaults otherwise) of the
    OpenVINO model read from ``fp32_onnx``, calibrated on ``items`` (all of them), saved with
    ``ov.save_model``'s defaults to ``folder/model.xml``. Returns the path and what it took."""
    import nncf
    import openvino as ov

    model = _read(fp32_onnx)
    declared = {name for inp in model.inputs for name in inp.get_names()}
    dataset = nncf.Dataset([{k: v for k, v in item.items() if k in declared} for item in items])
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: stdout is the Markdown's
        quantized = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(items))
    seconds = time.perf_counter() - start
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.xml"
    ov.save_model(quantized, str(path))  # its defaults: quantized weights are stored as int8
    fake_quantize = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ops())
    say(f"NNCF int8: {len(items)} calibration texts, {fake_quantize} FakeQuantize ops, {seconds:.0f} s; saved {path}")
    return path, {"calibration_texts": len(items), "quantize_s": seconds, "fake_quantize_ops": fake_quantize}


def nncf_files(path: Path) -> list[Path]:
    return [path, path.with_suffix(".bin")]

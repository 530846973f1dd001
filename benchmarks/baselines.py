"""Baselines and variant wrappers shared by the MiniLM benchmarks (quantize_minilm, compare).

A *variant* is a dict: ``fn_for(inputs)`` returns the callable to time (ORT variants build a
fresh session each call, so timing can keep one session alive at a time), ``encoder`` is
what fidelity runs, ``bytes`` the size on disk (PyTorch: the saved state dict).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch

from graphopt.export import make_session
from graphopt.export import run as ort_run
from graphopt.quant.cpu import cpu_int8_support


def torch_variant(model: torch.nn.Module, nbytes: int) -> dict:
    def fn_for(inputs):
        def run():
            with torch.inference_mode():
                return model(**inputs)

        return run

    return {"fn_for": fn_for, "encoder": model, "bytes": nbytes}


def ort_variant(path: Path, threads: int, note: str = "", kept: list[str] | None = None, disabled_optimizers=None) -> dict:
    """An ORT model: ``fn_for(inputs)`` builds a fresh session and returns its runner (timing
    keeps one session alive at a time); the encoder used for fidelity has its own session."""
    sessions: dict[str, object] = {}

    def new_session():
        return make_session(path, threads=threads, disabled_optimizers=disabled_optimizers)

    def fn_for(inputs):
        session = new_session()
        declared = {i.name for i in session.get_inputs()}
        feed = {k: v for k, v in inputs.items() if k in declared}
        return lambda: ort_run(session, feed)

    def encoder(**inputs):
        if "fidelity" not in sessions:
            sessions["fidelity"] = new_session()
        session = sessions["fidelity"]
        declared = {i.name for i in session.get_inputs()}
        return torch.from_numpy(ort_run(session, {k: v for k, v in inputs.items() if k in declared})[0])

    size = Path(path).stat().st_size + sum(p.stat().st_size for p in Path(path).parent.glob(Path(path).name + ".data"))
    return {"fn_for": fn_for, "encoder": encoder, "bytes": size, "note": note, "kept": kept or [], "ort": True, "release": sessions.clear}


def ort_int8_baseline(model, example_kwargs: dict, folder: Path, fallback_onnx: Path, say=print) -> Path:
    """TorchScript export -> ORT transformer optimizer -> ORT quantize_dynamic (per-channel int8).

    The TorchScript export is what ORT's optimizer fuses best (Attention, EmbedLayerNorm); the
    graphopt (dynamo) export is used when it is unavailable. reduce_range follows the CPU.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer

    folder.mkdir(parents=True, exist_ok=True)
    names = list(example_kwargs)
    source = folder / "torchscript.onnx"
    try:
        # eval() on the wrapper too: the exporter restores the wrapper's mode afterwards, and a
        # fresh module is in training mode, which would switch on the model's dropout.
        wrapper = _LastHidden(model, names).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, tuple(example_kwargs[n] for n in names), str(source), dynamo=False, opset_version=17,
                              input_names=names, output_names=["last_hidden_state"],
                              dynamic_axes={n: {0: "batch", 1: "seq"} for n in names})
    except Exception as exc:  # noqa: BLE001 - fall back to the dynamo export, and say so
        say(f"TorchScript export failed ({type(exc).__name__}: {exc}); ORT baseline uses the dynamo export")
        source = fallback_onnx
    finally:
        model.eval()
    hidden = model.config.hidden_size
    heads = model.config.num_attention_heads
    optimized = optimizer.optimize_model(str(source), model_type="bert", num_heads=heads, hidden_size=hidden)
    say(f"ORT optimizer fusions: { {k: v for k, v in optimized.get_fused_operator_statistics().items() if v} }")
    optimized.save_model_to_file(str(folder / "optimized.onnx"))
    quantized = folder / "model.onnx"
    quantize_dynamic(str(folder / "optimized.onnx"), str(quantized), per_channel=True, weight_type=QuantType.QInt8,
                     reduce_range=cpu_int8_support().saturates_u8s8, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return quantized


class _LastHidden(torch.nn.Module):
    def __init__(self, model, names):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors):
        return self.model(**dict(zip(self.names, tensors))).last_hidden_state


def state_dict_bytes(model: torch.nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes

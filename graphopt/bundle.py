"""The deployment bundle: model, tokenizer, report and a manifest that pins them.

``manifest.json`` lists every file with its size and SHA-256, the library versions, the
recipe, the measured figures, the target they were measured on (provider, threads, CPU
ISA, precision), the ORT session settings the model is deployed with, and the data the
build calibrated, verified and was gated on, so a deployment can check what it ships
against what was tuned.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from graphopt.report import atomic_write_text

MANIFEST = "manifest.json"
# Folders a build writes beside the bundle that are not part of it.
_SCRATCH = ("baseline/", "candidates/", "graphopt-repro-", "ir/")
_VERSIONED = ("graphopt", "torch", "transformers", "onnx", "onnxruntime", "onnxscript", "onnx-ir", "openvino")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str]:
    found = {}
    for name in _VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    found["python"] = platform.python_version()
    return found


def write_manifest(
    out_dir: str | os.PathLike,
    *,
    recipe: Any,
    figures: dict,
    provider: str,
    threads: int,
    model: str,
    disabled_optimizers: list[str] | None = None,
    graph_optimization: str = "all",
    target: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    precision: str = "fp32",
) -> Path:
    """Hash every file of the bundle (all files under ``out_dir`` except the manifest and
    scratch folders) and write ``manifest.json`` atomically.

    ``target`` is :meth:`graphopt.context.Target.to_dict` of the build; ``data`` what the
    build's data section records (source, counts); ``session`` is what :func:`open_session`
    opens the model with."""
    import torch

    out = Path(out_dir)
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        relative = path.relative_to(out).as_posix()
        if relative == MANIFEST or relative.startswith(_SCRATCH) or path.name.startswith("."):
            continue
        files[relative] = {"bytes": path.stat().st_size, "sha256": file_digest(path)}
    manifest = {
        "model": model,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
        "versions": versions(),
        "recipe": recipe.model_dump(mode="json") if hasattr(recipe, "model_dump") else recipe,
        "tuned_for": {"provider": provider, "threads": threads, "cpu_isa": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine()},
        "target": target or {"provider": provider, "threads": threads},
        "session": {"provider": provider, "threads": threads, "graph_optimization": graph_optimization, "disabled_optimizers": list(disabled_optimizers or []),
                    "precision": precision, "runtime": _runtime_name(provider)},
        "data": data or {},
        "figures": figures,
    }
    path = out / MANIFEST
    atomic_write_text(path, json.dumps(manifest, indent=2, default=str))
    return path


def _runtime_name(provider: str) -> str:
    """Which runtime ``provider`` opens on this machine: onnxruntime, or OpenVINO's own runtime
    for ``"openvino"`` where onnxruntime has no OpenVINO EP. The manifest records it because the
    bundle's figures were measured on it."""
    from graphopt.export.session import ProviderError, resolve_provider

    try:
        name = resolve_provider(provider)
    except ProviderError:
        return "unavailable"
    return "openvino" if name == "OpenVINORuntime" else "onnxruntime"


def verify_manifest(out_dir: str | os.PathLike) -> list[str]:
    """Files whose size or hash no longer match the manifest (empty: the bundle is intact)."""
    out = Path(out_dir)
    manifest = json.loads((out / MANIFEST).read_text())
    problems = []
    for relative, expected in manifest["files"].items():
        path = out / relative
        if not path.is_file():
            problems.append(f"{relative}: missing")
        elif path.stat().st_size != expected["bytes"] or file_digest(path) != expected["sha256"]:
            problems.append(f"{relative}: changed")
    return problems


def open_session(out_dir: str | os.PathLike, *, threads: int | None = None, verify: bool = True):
    """An ORT session on a bundle's ``model.onnx`` with the settings it was tuned with (provider,
    threads, ORT transformers left out, precision), after checking the files against the
    manifest. A bundle built for ``openvino`` opens on OpenVINO's runtime, at its precision."""
    from graphopt.errors import ExportError
    from graphopt.export import make_session

    out = Path(out_dir)
    if verify:
        problems = verify_manifest(out)
        if problems:
            raise ExportError(f"bundle {out} does not match its manifest: {problems}")
    manifest = json.loads((out / MANIFEST).read_text())
    session = manifest.get("session", {})
    return make_session(
        out / "model.onnx",
        provider=session.get("provider", "cpu"),
        threads=threads if threads is not None else session.get("threads"),
        graph_optimization=session.get("graph_optimization", "all"),
        disabled_optimizers=session.get("disabled_optimizers") or None,
        precision=session.get("precision", "fp32"),
    )


def open_generator(out_dir: str | os.PathLike, *, threads: int | None = None, verify: bool = True):
    """A :class:`graphopt.export.generation.Generator` on a decoder bundle, on the session
    :func:`open_session` opens (the manifest checked first)."""
    from graphopt.export.generation import Generator

    return Generator(open_session(out_dir, threads=threads, verify=verify))


def bundle_tokenizer(out_dir: str | os.PathLike) -> Any:
    """The tokenizer a bundle ships (``tokenizer/``), padding on the left; None without one."""
    folder = Path(out_dir) / "tokenizer"
    if not folder.is_dir():
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.padding_side = "left"
    return tokenizer


def generate(
    out_dir: str | os.PathLike,
    input_ids: Any = None,
    attention_mask: Any = None,
    *,
    prompt: str | list[str] | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_token_id: int | list[int] | None = None,
    streamer: Any = None,
    threads: int | None = None,
    return_result: bool = False,
) -> Any:
    """Generate with a decoder bundle: greedy by default, or sampling with a seed.

    ``input_ids`` ([batch, seq] with ``attention_mask``, padded on the left, or a list of token
    lists of any lengths) or ``prompt`` (text, when the bundle has a tokenizer). Returns the
    token ids ``[batch, prompt + new]`` as ``transformers``' ``generate`` does (rows that stopped
    early are padded), or with ``return_result`` the :class:`GenerationResult` with timings.
    """
    from graphopt.errors import ConfigError
    from graphopt.export.generation import SamplingOptions

    if (input_ids is None) == (prompt is None):
        raise ConfigError("give either input_ids or prompt")
    if prompt is not None:
        tokenizer = bundle_tokenizer(out_dir)
        if tokenizer is None:
            raise ConfigError(f"bundle {out_dir} has no tokenizer, so it cannot read a text prompt: pass input_ids")
        rows = [prompt] if isinstance(prompt, str) else list(prompt)
        input_ids = [tokenizer(text)["input_ids"] for text in rows]
    generator = open_generator(out_dir, threads=threads)
    sampling = SamplingOptions(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    result = generator.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens, sampling=sampling, eos_token_id=eos_token_id,
                                streamer=streamer)
    return result if return_result else result.sequences


GENAI_CONFIG = "genai_config.json"


def genai_config(spec: Any, config: Any, *, threads: int | None = None, max_length: int | None = None) -> dict[str, Any]:
    """An onnxruntime-genai ``genai_config.json`` for a graphopt decoder export.

    The graph is fed as Optimum-style exports are (past and present are separate tensors, so
    ``past_present_share_buffer`` is off), with the ``position_ids`` input graphopt's graph
    takes; ``spec`` is the program's :class:`graphopt.decoder.DecoderSpec`, ``config`` the
    Hugging Face config."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    eos = list(spec.eos_token_ids)
    context = spec.max_positions or max_length or 2048
    session: dict[str, Any] = {"log_id": "graphopt", "provider_options": []}
    if threads:
        session["intra_op_num_threads"] = threads
    return {
        "model": {
            "bos_token_id": spec.bos_token_id if spec.bos_token_id is not None else (eos[0] if eos else 0),
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or [0]),
            "pad_token_id": spec.pad_token_id if spec.pad_token_id is not None else (eos[0] if eos else 0),
            "context_length": context,
            "type": spec.model_type,
            "vocab_size": spec.vocab_size,
            "decoder": {
                "session_options": session,
                "filename": "model.onnx",
                "head_size": spec.head_dim,
                "hidden_size": hidden,
                "num_attention_heads": heads,
                "num_hidden_layers": spec.layers,
                "num_key_value_heads": spec.kv_heads,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "max_length": max_length or context, "min_length": 0, "num_beams": 1, "num_return_sequences": 1,
                   "past_present_share_buffer": False, "top_k": 50, "top_p": 1.0, "temperature": 1.0, "repetition_penalty": 1.0},
    }

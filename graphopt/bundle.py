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
_VERSIONED = ("graphopt", "torch", "transformers", "onnx", "onnxruntime", "onnxscript", "onnx-ir")


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
        "session": {"provider": provider, "threads": threads, "graph_optimization": graph_optimization, "disabled_optimizers": list(disabled_optimizers or [])},
        "data": data or {},
        "figures": figures,
    }
    path = out / MANIFEST
    atomic_write_text(path, json.dumps(manifest, indent=2, default=str))
    return path


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
    threads, ORT transformers left out), after checking the files against the manifest."""
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
    )

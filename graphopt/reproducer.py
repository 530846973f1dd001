"""Crash reproducers: the program a pass failed on, the pass, and the whole pass context.

A reproducer folder holds

- ``program.pt2``: the input program, saved with ``torch.export.save`` (example inputs and
  dynamic shapes included), so no pickle is involved in loading it back;
- ``reference.safetensors``: the program's reference outputs;
- ``pass.json``: the pass name, the module that defines it, its config and text form;
- ``context/``: the :class:`~graphopt.context.PassContext`: calibration and verification
  batches (safetensors + a JSON layout), training texts, the tokenizer
  (``save_pretrained``), the teacher program (``teacher.pt2``), target and artifacts folder;
- ``error.txt``: the traceback; ``command.txt``: ``graphopt repro <folder>``.

:func:`write_reproducer` writes one; :func:`read_reproducer` reads the program, the context
and the pass's description back (``graphopt.repro`` turns that into a pass and re-runs it).
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from graphopt.context import Batch, PassContext, Target
from graphopt.program import Program

CONTEXT = "context"


def write_reproducer(program: Program, p: Any, exc: BaseException, directory: str | Path, ctx: PassContext | None = None) -> Path:
    directory = Path(directory)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = directory / f"graphopt-repro-{p.name}-{stamp}"
    suffix = 0
    while folder.exists():
        suffix += 1
        folder = directory / f"graphopt-repro-{p.name}-{stamp}-{suffix}"
    folder.mkdir(parents=True)
    _save_program(program, folder / "program.pt2")
    info = {
        "pass": p.name,
        "module": type(p).__module__,
        "class": type(p).__qualname__,
        "text": p.text(),
        "config": p.config.model_dump(mode="json"),
        "optional": p.optional,
        "output_names": program.output_names,
        "meta": {k: v for k, v in program.meta.items() if isinstance(v, (str, int, float, bool))},
        "reference_outputs": "reference.safetensors",
    }
    (folder / "pass.json").write_text(json.dumps(info, indent=2))
    from safetensors.torch import save_file

    save_file({f"output_{i}": t.contiguous() for i, t in enumerate(program.reference_outputs)}, str(folder / "reference.safetensors"))
    if ctx is not None:
        save_context(ctx, folder / CONTEXT)
    (folder / "error.txt").write_text("".join(traceback.format_exception(exc)))
    (folder / "command.txt").write_text(f"graphopt repro {folder}\n")
    return folder


def _save_program(program: Program, path: Path) -> None:
    exported = torch.export.export(program.module, program.args, program.kwargs, dynamic_shapes=program.dynamic_shapes, strict=False)
    torch.export.save(exported, str(path))


def _load_program(path: Path, reference: tuple[torch.Tensor, ...] = (), output_names: list[str] | None = None, meta: dict | None = None) -> Program:
    exported = torch.export.load(str(path))
    args, kwargs = exported.example_inputs
    module = exported.module()
    for sub in module.modules():
        sub.training = False
    return Program(module=module, args=tuple(args), kwargs=dict(kwargs), dynamic_shapes=None, reference_outputs=reference,
                   output_names=list(output_names or []), meta=dict(meta or {}))


# ---- the context ---------------------------------------------------------------------------
def save_context(ctx: PassContext, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    layout: dict[str, Any] = {
        "calibration": _save_batches(ctx.calibration, folder / "calibration.safetensors"),
        "calibration_source": ctx.calibration_source,
        "verification": _save_batches(ctx.verification, folder / "verification.safetensors"),
        "verification_source": ctx.verification_source,
        "training_texts": list(ctx.training_texts),
        "target": ctx.target.to_dict(),
        "artifacts": str(ctx.artifacts) if ctx.artifacts is not None else None,
        "tokenizer": None,
        "teacher": None,
    }
    if ctx.tokenizer is not None:
        try:
            ctx.tokenizer.save_pretrained(folder / "tokenizer")
            layout["tokenizer"] = "tokenizer"
        except Exception as exc:  # noqa: BLE001 - say what is missing instead of failing the reproducer
            layout["tokenizer"] = f"(not saved: {type(exc).__name__}: {exc})"
    if ctx.teacher is not None:
        _save_program(ctx.teacher, folder / "teacher.pt2")
        from safetensors.torch import save_file

        save_file({f"output_{i}": t.contiguous() for i, t in enumerate(ctx.teacher.reference_outputs)}, str(folder / "teacher_reference.safetensors"))
        layout["teacher"] = {"program": "teacher.pt2", "output_names": ctx.teacher.output_names}
    (folder / "context.json").write_text(json.dumps(layout, indent=2))


def load_context(folder: Path) -> PassContext:
    from safetensors.torch import load_file

    layout = json.loads((folder / "context.json").read_text())
    tokenizer = None
    if layout.get("tokenizer") == "tokenizer":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    teacher = None
    if isinstance(layout.get("teacher"), dict):
        reference = load_file(str(folder / "teacher_reference.safetensors"))
        teacher = _load_program(folder / "teacher.pt2", tuple(reference[f"output_{i}"] for i in range(len(reference))), layout["teacher"].get("output_names"))
    return PassContext(
        calibration=_load_batches(layout["calibration"], folder / "calibration.safetensors"),
        calibration_source=layout.get("calibration_source", ""),
        training_texts=tuple(layout.get("training_texts", ())),
        verification=_load_batches(layout["verification"], folder / "verification.safetensors"),
        verification_source=layout.get("verification_source", ""),
        tokenizer=tokenizer,
        teacher=teacher,
        artifacts=Path(layout["artifacts"]) if layout.get("artifacts") else None,
        target=Target(**layout["target"]),
    )


def _save_batches(batches: tuple[Batch, ...], path: Path) -> list[dict]:
    """Tensors into one safetensors file; the layout (and any non-tensor value) as JSON."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def entry(key: str, value: Any) -> dict:
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().contiguous()
            return {"tensor": key}
        return {"value": value}

    layout = []
    for i, (args, kwargs) in enumerate(batches):
        layout.append({"args": [entry(f"{i}.args.{j}", a) for j, a in enumerate(args)],
                       "kwargs": {name: entry(f"{i}.kwargs.{name}", v) for name, v in kwargs.items()}})
    if tensors:
        save_file(tensors, str(path))
    return layout


def _load_batches(layout: list[dict], path: Path) -> tuple[Batch, ...]:
    from safetensors.torch import load_file

    tensors = load_file(str(path)) if layout and path.exists() else {}

    def value(spec: dict) -> Any:
        return tensors[spec["tensor"]] if "tensor" in spec else spec["value"]

    return tuple((tuple(value(a) for a in item["args"]), {k: value(v) for k, v in item["kwargs"].items()}) for item in layout)


def read_reproducer(folder: str | Path) -> tuple[Program, PassContext, dict]:
    """(program, context, the pass's description from ``pass.json``) of a reproducer folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    info = json.loads((folder / "pass.json").read_text())
    reference = load_file(str(folder / "reference.safetensors"))
    program = _load_program(folder / "program.pt2", tuple(reference[f"output_{i}"] for i in range(len(reference))), info.get("output_names"), info.get("meta"))
    ctx = load_context(folder / CONTEXT) if (folder / CONTEXT / "context.json").exists() else PassContext()
    return program, ctx, info

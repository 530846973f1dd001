"""Crash reproducers: the program a pass failed on, its config, and one command to re-run it.

A reproducer folder holds

- ``program.pt2``: the input program, saved with ``torch.export.save`` (example inputs and
  dynamic shapes included), so no pickle is involved in loading it back;
- ``pass.json``: the pass name, the module that defines it, its config and text form;
- ``error.txt``: the traceback;
- ``command.txt``: ``graphopt repro <folder>``.
"""

from __future__ import annotations

import importlib
import json
import time
import traceback
from pathlib import Path

import torch

from graphopt.program import Program


def write_reproducer(program: Program, p, exc: BaseException, directory: str | Path) -> Path:
    directory = Path(directory)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = directory / f"graphopt-repro-{p.name}-{stamp}"
    suffix = 0
    while folder.exists():
        suffix += 1
        folder = directory / f"graphopt-repro-{p.name}-{stamp}-{suffix}"
    folder.mkdir(parents=True)
    exported = torch.export.export(program.module, program.args, program.kwargs, dynamic_shapes=program.dynamic_shapes, strict=False)
    torch.export.save(exported, str(folder / "program.pt2"))
    info = {
        "pass": p.name,
        "module": type(p).__module__,
        "class": type(p).__qualname__,
        "text": str(p),
        "config": p.config.model_dump(mode="json"),
        "output_names": program.output_names,
        "reference_outputs": "reference.safetensors",
    }
    (folder / "pass.json").write_text(json.dumps(info, indent=2))
    from safetensors.torch import save_file

    save_file({f"output_{i}": t.contiguous() for i, t in enumerate(program.reference_outputs)}, str(folder / "reference.safetensors"))
    (folder / "error.txt").write_text("".join(traceback.format_exception(exc)))
    (folder / "command.txt").write_text(f"graphopt repro {folder}\n")
    return folder


def load_reproducer(folder: str | Path):
    """Load (program, pass) from a reproducer folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    info = json.loads((folder / "pass.json").read_text())
    exported = torch.export.load(str(folder / "program.pt2"))
    args, kwargs = exported.example_inputs
    module = exported.module()
    for sub in module.modules():
        sub.training = False
    reference = load_file(str(folder / "reference.safetensors"))
    program = Program(
        module=module,
        args=tuple(args),
        kwargs=dict(kwargs),
        dynamic_shapes=None,
        reference_outputs=tuple(reference[f"output_{i}"] for i in range(len(reference))),
        output_names=info.get("output_names", []),
    )
    importlib.import_module(info["module"])
    from graphopt.passbase import get_pass_class

    pass_obj = get_pass_class(info["pass"])(**info["config"])
    return program, pass_obj


def rerun_reproducer(folder: str | Path):
    """Run the recorded pass on the recorded program; the original exception surfaces."""
    program, pass_obj = load_reproducer(folder)
    return pass_obj(program)

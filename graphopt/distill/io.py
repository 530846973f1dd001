"""What a distillation run writes: checkpoints it resumes from, and its curve.

A checkpoint is the student's parameters and the projections (safetensors), the
optimizer and scheduler state (``torch.load(weights_only=True)``) and ``state.json`` (step
and history), written to a temporary folder and moved in with ``state.json`` last, so a
killed job never leaves a half-written checkpoint that looks complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from graphopt.program import Program


def save_checkpoint(folder: Path, student: Program, projections, optimizer, scheduler, step: int, history: list) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".tmp"
    tmp.mkdir(exist_ok=True)
    tensors = {f"student.{k}": v.detach().contiguous() for k, v in named_tensors(student).items()}
    tensors.update({f"projection.{k}": v.detach().contiguous() for k, v in projections.state_dict().items()})
    save_file(tensors, str(tmp / "weights.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "history": history}))
    for name in ("weights.safetensors", "optimizer.pt", "state.json"):  # state.json last: it marks completeness
        os.replace(tmp / name, folder / name)
    tmp.rmdir()


def load_checkpoint(folder: Path, student: Program, projections, optimizer, scheduler) -> tuple[int, list]:
    from safetensors.torch import load_file

    state = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "weights.safetensors"))
    named = named_tensors(student)
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("student."):
                named[key[len("student.") :]].copy_(value)
    projections.load_state_dict({k[len("projection.") :]: v for k, v in tensors.items() if k.startswith("projection.")})
    extra = torch.load(folder / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    return int(state["step"]), list(state["history"])


def named_tensors(program: Program) -> dict[str, torch.Tensor]:
    seen: set[int] = set()
    named: dict[str, torch.Tensor] = {}
    for name, tensor in program.module.named_parameters():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            named[name] = tensor
    return named


def save_curve(history: list[dict], path: Path) -> str | None:
    points = [(h["step"], h["val_mean_cosine"]) for h in history if h.get("val_mean_cosine") is not None]
    losses = [(h["step"], h["loss"]) for h in history]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in losses], [v for _, v in losses], color="tab:gray", alpha=0.6, label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if points:
        ax2 = ax.twinx()
        ax2.plot([s for s, _ in points], [v for _, v in points], "o-", color="tab:blue", label="validation mean cosine")
        ax2.set_ylabel("validation mean cosine")
    ax.set_title("distillation")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)

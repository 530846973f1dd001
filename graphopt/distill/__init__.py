"""Knowledge distillation: the original program teaches the compressed one.

``distill(student, teacher, data, config)`` trains the student program's parameters in
place (its fx GraphModule is an ordinary module) to match the teacher's final hidden
state (MSE + cosine), its block outputs mapped across depth (``graphopt.taps``; a learned
projection bridges narrower students), and, for models with an LM head, its logits (KL at
a temperature). AdamW with warm-up and cosine decay, gradient clipping, seeded data order,
a progress bar, checkpoints with resume, early stopping on a validation split carved from
the training sentences, and a fidelity curve. Held-out sentences are never trained on
and never used to choose when to stop.

The pieces: :mod:`graphopt.distill.config` (options), :mod:`graphopt.distill.data` (text
and tensor batches, the validation split), :mod:`graphopt.distill.losses`,
:mod:`graphopt.distill.cache` (the teacher's outputs per sentence),
:mod:`graphopt.distill.loop` (optimizer, step, validation, loop),
:mod:`graphopt.distill.stopping` (the early-stopping rule) and :mod:`graphopt.distill.io`
(checkpoints, curve).

Data parallel: inside an initialised ``torch.distributed`` process group (``torchrun``;
gloo on CPU, nccl on GPUs) each rank takes its share of every global batch and
DistributedDataParallel averages the gradients, so N processes take the same steps as
one process with the same global batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graphopt.distill.config import DistillConfig, DistillError
from graphopt.distill.data import TrainBatch, rank_world, tensor_batches, text_batches
from graphopt.distill.io import save_curve
from graphopt.distill.loop import Run, Trainer, Validation, train
from graphopt.distill.losses import hidden_loss, logits_loss, pooled_cosine_loss
from graphopt.program import Program


@dataclass
class DistillResult:
    program: Program
    steps: int
    wall_s: float
    history: list[dict] = field(default_factory=list)  # {"step", "loss", "val_mean_cosine"}
    stopped: str = ""
    world_size: int = 1
    curve_png: str | None = None

    def to_dict(self) -> dict:
        return {"steps": self.steps, "wall_s": round(self.wall_s, 1), "stopped": self.stopped, "world_size": self.world_size, "history": self.history, "curve_png": self.curve_png}


def distill(
    student: Program,
    teacher: Program,
    data: Any = None,
    config: DistillConfig | None = None,
    *,
    tokenizer: Any = None,
    report_dir: str | os.PathLike | None = None,
) -> DistillResult:
    """Train ``student`` (in place) to reproduce ``teacher``.

    ``data``: None (the standard library's training sentences of ``config.data``, with
    ``tokenizer``), a list of strings (with ``tokenizer``), or a list of tensor batches
    (input dicts or ``(args, kwargs)`` pairs). Text runs evaluate on a validation split of
    their sentences and may stop early; ``report_dir`` receives the curve.
    """
    config = config or DistillConfig()
    import graphopt.quant.training  # noqa: F401 - gradients through quantized ops (straight-through)

    _check_pair(student, teacher)
    params = [p for p in student.module.parameters() if p.is_floating_point()]
    if not params:
        raise DistillError("the student has no trainable (floating-point) parameters")
    for p in params:
        p.requires_grad_(True)
    try:
        with torch.random.fork_rng():  # seeded training (CPU and any CUDA devices); the caller's random state comes back afterwards
            torch.manual_seed(config.seed)
            run = _train(student, teacher, data, config, tokenizer)
    finally:
        for p in params:
            p.requires_grad_(False)
    result = DistillResult(program=student, steps=run.step, wall_s=run.wall_s, history=run.history,
                           stopped=run.stopped or "all steps done", world_size=rank_world()[1])
    if report_dir is not None and rank_world()[0] == 0:
        result.curve_png = save_curve(run.history, Path(report_dir) / "distill_curve.png")
    return result


def _train(student: Program, teacher: Program, data: Any, config: DistillConfig, tokenizer: Any) -> Run:
    trainer = Trainer.build(student, teacher, config)
    input_names = list(student.kwargs) or [f"arg{i}" for i in range(len(student.args))]
    batches, validation = _training_data(data, tokenizer, config, input_names)
    checkpoint = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    start_step, history = trainer.resume(checkpoint) if checkpoint is not None else (0, [])
    validate = Validation(teacher, tokenizer, validation, list(student.kwargs)) if validation else None
    return train(trainer, batches, validate, Run(start_step, history), checkpoint)


def _check_pair(student: Program, teacher: Program) -> None:
    teacher_outputs, student_outputs = teacher.run(), student.run()
    if len(teacher_outputs) != len(student_outputs) or any(t.shape[:2] != s.shape[:2] for t, s in zip(teacher_outputs, student_outputs)):
        raise DistillError(
            "teacher and student outputs do not correspond: teacher "
            f"{[tuple(t.shape) for t in teacher_outputs]} vs student {[tuple(s.shape) for s in student_outputs]}"
        )


def _training_data(data: Any, tokenizer: Any, config: DistillConfig, input_names: Sequence[str]) -> tuple[Iterator[TrainBatch], list[str]]:
    """Training batches and validation sentences (none for tensor data)."""
    if isinstance(data, (list, tuple)) and not data:
        raise DistillError("no training data: the data list is empty")
    if isinstance(data, (list, tuple)) and not isinstance(data[0], str):
        return tensor_batches(list(data)), []
    if tokenizer is None:
        raise DistillError("text data needs a tokenizer: pass tokenizer=... or a list of input dicts")
    if data is None:
        from graphopt.data import train_sentences

        data = train_sentences(source=config.data)
    return text_batches(list(data), tokenizer, config, input_names)


__all__ = ["DistillConfig", "DistillError", "DistillResult", "distill", "hidden_loss", "logits_loss", "pooled_cosine_loss"]

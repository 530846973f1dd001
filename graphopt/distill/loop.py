"""The distillation training loop: views of both programs, the optimizer, one step, validation.

The student's fx GraphModule is an ordinary module, trained in place through a
:class:`graphopt.taps.TappedModule` that also returns its block outputs; a learned linear
projection bridges a narrower student's block outputs to the teacher's width. AdamW with
linear warm-up and cosine decay, gradient clipping; float16 / bfloat16 parameters train
through float32 master copies (Adam's squared-gradient state underflows in half
precision). Inside an initialised ``torch.distributed`` group DistributedDataParallel
averages the gradients.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graphopt.distill.cache import TeacherCache
from graphopt.distill.config import DistillConfig
from graphopt.distill.data import TrainBatch, rank_world
from graphopt.distill.io import load_checkpoint, save_checkpoint
from graphopt.distill.losses import distillation_loss, token_mask
from graphopt.distill.stopping import EarlyStopping
from graphopt.program import Program
from graphopt.taps import TappedModule, block_outputs, layer_map


class _Objective(torch.nn.Module):
    """Student forward + projections; DDP wraps this so every trained tensor syncs."""

    def __init__(self, student: TappedModule, projections: torch.nn.ModuleList):
        super().__init__()
        self.student = student
        self.projections = projections

    def forward(self, *flat):
        outputs, taps = self.student(*flat)
        return outputs, [proj(t) for proj, t in zip(self.projections, taps)]


@dataclass
class Trainer:
    """Everything one step needs; :meth:`build` makes it, :meth:`step` trains one batch."""

    student: Program
    config: DistillConfig
    student_view: TappedModule
    teacher_outputs: TeacherCache
    projections: torch.nn.ModuleList
    objective: torch.nn.Module
    masters: dict[torch.nn.Parameter, torch.Tensor]  # half-precision parameter -> its float32 master
    optimized: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    is_logits: bool

    @classmethod
    def build(cls, student: Program, teacher: Program, config: DistillConfig) -> Trainer:
        student_view, teacher_view, projections = _views(student, teacher, config)
        objective: torch.nn.Module = _Objective(student_view, projections)
        if rank_world()[1] > 1:
            objective = torch.nn.parallel.DistributedDataParallel(objective, find_unused_parameters=True)
        trainable = [p for p in objective.parameters() if p.requires_grad]
        masters = {p: p.detach().float().clone().requires_grad_(True) for p in trainable if p.dtype in (torch.float16, torch.bfloat16)}
        optimized = [masters.get(p, p) for p in trainable]
        optimizer = torch.optim.AdamW(optimized, lr=config.lr, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
        is_logits = bool(student.output_names) and "logits" in student.output_names[0]
        cache = TeacherCache(teacher_view, config.teacher_cache_mb * 2**20)
        return cls(student, config, student_view, cache, projections, objective, masters, optimized, optimizer, scheduler, is_logits)

    def step(self, batch: TrainBatch) -> float:
        """One optimizer step on ``batch``; the loss before it."""
        args, inputs, keys = batch
        t_out, t_taps = self.teacher_outputs(args, inputs, keys)
        s_out, s_taps = self.objective(*self.student_view.flatten(args, inputs))
        mask = token_mask(inputs, s_out[0])
        loss = distillation_loss(s_out, t_out, s_taps, t_taps, mask, self.config, self.is_logits)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for low, master in self.masters.items():
            master.grad = None if low.grad is None else low.grad.float()
            low.grad = None  # the optimizer only zeroes the masters' gradients
        torch.nn.utils.clip_grad_norm_(self.optimized, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            for low, master in self.masters.items():
                low.copy_(master)
        return float(loss.detach())

    def resume(self, folder: Path) -> tuple[int, list[dict]]:
        """Restore the checkpoint in ``folder`` if there is one: (its step, its history)."""
        if not (folder / "state.json").exists():
            return 0, []
        start_step, history = load_checkpoint(folder, self.student, self.projections, self.optimizer, self.scheduler)
        with torch.no_grad():  # master copies follow the restored half-precision values
            for low, master in self.masters.items():
                master.copy_(low.float())
        return start_step, history

    def save(self, folder: Path, step: int, history: list[dict]) -> None:
        save_checkpoint(folder, self.student, self.projections, self.optimizer, self.scheduler, step, history)


def _views(student: Program, teacher: Program, config: DistillConfig) -> tuple[TappedModule, TappedModule, torch.nn.ModuleList]:
    """Tapped views of both programs (block outputs mapped across depth) and the projections."""
    student_blocks, teacher_blocks = block_outputs(student), block_outputs(teacher)
    mapping = layer_map(len(student_blocks), len(teacher_blocks)) if config.layers else []
    student_taps = [b.node for b in student_blocks] if mapping else []
    teacher_taps = [teacher_blocks[i].node for i in mapping]
    projections = torch.nn.ModuleList()
    s_fake = {n.name: n.meta.get("val") for n in student.graph.nodes}
    t_fake = {n.name: n.meta.get("val") for n in teacher.graph.nodes}
    for s_name, t_name in zip(student_taps, teacher_taps):
        s_dim, t_dim = s_fake[s_name].shape[-1], t_fake[t_name].shape[-1]
        if s_dim == t_dim:
            projections.append(torch.nn.Identity())
        else:  # a narrower student: learn a bridge to the teacher's width
            proj = torch.nn.Linear(int(s_dim), int(t_dim), bias=False)
            torch.nn.init.normal_(proj.weight, std=1 / math.sqrt(int(s_dim)))
            projections.append(proj)
    return TappedModule(student, student_taps), TappedModule(teacher, teacher_taps), projections


def _schedule(config: DistillConfig) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` of the steps, then cosine decay to 0."""
    warmup_steps = int(config.warmup * config.steps)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, config.steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return schedule


# ---- validation ------------------------------------------------------------------------------
class Validation:
    """Mean cosine of the mean-pooled final hidden states on the validation sentences.

    The teacher is frozen, so its embeddings are computed once; each evaluation runs the
    student alone, on the sentences sorted by length so its batches pad little (a pooled
    embedding only reads real tokens; the order of the sentences does not enter the mean)."""

    def __init__(self, teacher: Program, tokenizer: Any, sentences: Sequence[str], input_names: Sequence[str]):
        from graphopt.fidelity import encode

        lengths = tokenizer(list(sentences), truncation=True, max_length=128)["input_ids"]
        order = sorted(range(len(sentences)), key=lambda i: len(lengths[i]))
        self.tokenizer, self.sentences, self.input_names = tokenizer, [sentences[i] for i in order], list(input_names)
        self.reference = encode(teacher, tokenizer, self.sentences, input_names=self.input_names).double()

    def __call__(self, student: Program) -> float:
        from graphopt.fidelity import encode

        candidate = encode(student, self.tokenizer, self.sentences, input_names=self.input_names).double()
        return float(torch.nn.functional.cosine_similarity(self.reference, candidate, dim=-1).clamp(-1.0, 1.0).mean())


# ---- the loop --------------------------------------------------------------------------------
@dataclass
class Run:
    """The loop's state: steps done, history, why it stopped."""

    step: int
    history: list[dict] = field(default_factory=list)
    stopped: str = ""
    wall_s: float = 0.0


def train(trainer: Trainer, batches: Iterator[TrainBatch], validate: Validation | None, start: Run, checkpoint: Path | None) -> Run:
    """Steps from ``start.step`` to ``config.steps``, evaluating, checkpointing and stopping early."""
    config, rank = trainer.config, rank_world()[0]
    stopping = EarlyStopping(config.patience_steps, config.first_stop_step(), config.min_delta, config.target_cosine)
    for done in start.history:  # a resumed run remembers its best score
        stopping.update(done["step"], done.get("val_mean_cosine"))
    for _ in range(start.step):  # a resumed run sees the batches a straight run would
        next(batches)
    run, progress, began, samples = start, _progress_bar(config, start.step, rank), time.perf_counter(), 0
    for step in range(start.step + 1, config.steps + 1):
        record: dict[str, Any] = {"step": step, "loss": trainer.step(next(batches))}
        samples += config.batch_size
        if step % config.eval_every == 0 or step == config.steps:
            record["val_mean_cosine"] = validate(trainer.student) if validate is not None else None
            run.stopped = stopping.update(step, record["val_mean_cosine"])
        run.history.append(record)
        run.step = step
        if progress is not None:
            progress.set_postfix(loss=f"{record['loss']:.4f}", samples_per_s=f"{samples / max(time.perf_counter() - began, 1e-9):.1f}")
            progress.update(1)
        if checkpoint is not None and rank == 0 and (step % config.checkpoint_every == 0 or step == config.steps):
            trainer.save(checkpoint, step, run.history)
        if config.time_limit_s is not None and time.perf_counter() - began > config.time_limit_s:
            run.stopped = run.stopped or f"time limit {config.time_limit_s} s"
        if run.stopped:
            break
    if progress is not None:
        progress.close()
    run.wall_s = time.perf_counter() - began
    return run


def _progress_bar(config: DistillConfig, start_step: int, rank: int):
    if not config.progress or rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=config.steps, initial=start_step, desc="distill", unit="step", dynamic_ncols=True)

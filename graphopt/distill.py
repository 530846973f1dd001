"""Knowledge distillation: the original program teaches the compressed one.

``distill(student, teacher, data, config)`` trains the student program's parameters in
place (its fx GraphModule is an ordinary module) to match the teacher's final hidden
state (MSE + cosine), its block outputs mapped across depth (``graphopt.taps``; a learned
projection bridges narrower students), and, for models with an LM head, its logits (KL at
a temperature). AdamW with warm-up and cosine decay, gradient clipping, seeded data order,
a progress bar, checkpoints with resume, early stopping on a validation split carved from
the training sentences, and a fidelity curve. Held-out sentences are never trained on
and never used to choose when to stop.

Data parallel: inside an initialised ``torch.distributed`` process group (``torchrun``;
gloo on CPU, nccl on GPUs) each rank takes its share of every global batch and
DistributedDataParallel averages the gradients, so N processes take the same steps as
one process with the same global batch.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field

from graphopt.errors import GraphoptError
from graphopt.passbase import PassConfig
from graphopt.program import Program
from graphopt.taps import TappedModule, block_outputs, layer_map


class DistillError(GraphoptError):
    """Distillation cannot run (mismatched models, no data, nothing to train)."""


class DistillConfig(PassConfig):
    steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1, description="global batch, split across processes")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup: float = Field(0.06, ge=0, lt=1, description="fraction of steps with linear warm-up")
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(128, ge=8)
    seed: int = 0
    data: Literal["all", "topics", "stdlib"] = "all"
    hidden_mse: float = Field(1.0, ge=0)
    hidden_cosine: float = Field(1.0, ge=0)
    layers: float = Field(1.0, ge=0, description="weight of block-output losses")
    pooled_cosine: float = Field(0.0, ge=0, description="1 - cosine of the mask-mean-pooled final hidden states (sentence embeddings)")
    logits_kl: float = Field(1.0, ge=0)
    temperature: float = Field(2.0, gt=0)
    eval_every: int = Field(50, ge=1)
    eval_sentences: int = Field(64, ge=4, description="validation sentences (from the training side)")
    patience: int = Field(4, ge=1, description="evaluations without improvement before stopping")
    target_cosine: float | None = Field(None, description="stop once validation mean cosine reaches this")
    time_limit_s: float | None = Field(None, gt=0)
    teacher_cache_mb: int = Field(
        4096, ge=0, description="keep the teacher's outputs per training sentence (up to this size) so later epochs skip its forward pass; 0: off"
    )
    checkpoint_dir: str | None = None
    checkpoint_every: int = Field(100, ge=1)
    progress: bool = True


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


# ---- data ---------------------------------------------------------------------------------
def _text_batches(tokenizer, config: DistillConfig, input_names: Sequence[str]) -> tuple[Iterable[tuple[dict, list[str]]], list[str]]:
    from graphopt.data import tokenize, train_sentences

    sentences = train_sentences(source=config.data)
    rng = random.Random(config.seed)
    rng.shuffle(sentences)
    validation, train = sentences[: config.eval_sentences], sentences[config.eval_sentences :]
    if not train:
        raise DistillError("no training sentences: the data source is empty")

    def batches():
        rank, world = _rank_world()
        for chunk in _length_bucketed(train, config, tokenizer):
            mine = chunk[rank::world]
            inputs = tokenize(tokenizer, mine, max_length=config.max_length)
            yield {k: v for k, v in inputs.items() if k in input_names}, mine

    return batches(), validation


def _length_bucketed(sentences: list[str], config: DistillConfig, tokenizer, pool_batches: int = 16) -> Iterable[list[str]]:
    """Global batches forever: each epoch shuffled (seeded), then within pools of
    ``pool_batches`` batches sorted by length, so a batch pads little (padding is most of
    the compute on short sentences); batch order shuffled again."""
    encoded = tokenizer(list(sentences), truncation=True, max_length=config.max_length)["input_ids"]
    lengths = {s: len(ids) for s, ids in zip(sentences, encoded)}
    epoch = 0
    while True:
        rng = random.Random(config.seed + epoch)
        order = list(sentences)
        rng.shuffle(order)
        size = config.batch_size
        pool = size * pool_batches
        for start in range(0, len(order) - size + 1, pool):
            chunk = sorted(order[start : start + pool], key=lambda s: lengths[s])
            group = [chunk[i : i + size] for i in range(0, len(chunk) - size + 1, size)]
            rng.shuffle(group)
            yield from group
        epoch += 1


def _tensor_batches(data: Sequence[dict]) -> Iterable[tuple[dict, None]]:
    if not data:
        raise DistillError("no training data: the list of input dicts is empty")
    rank, world = _rank_world()
    index = 0
    while True:
        batch = data[index % len(data)]
        yield {k: (v[rank::world] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in batch.items()}, None
        index += 1


class _TeacherCache:
    """The teacher's outputs (and tapped block outputs) per training sentence.

    The teacher is frozen and a sentence's real-token outputs do not depend on the rest of
    its padded batch, so after the first epoch the teacher's forward pass (about 30 % of a
    step's compute when teacher and student are alike) is replaced by reassembling stored
    rows. Per-token outputs (``[batch, seq, width...]``) are stored at the positions the
    attention mask marks as real and are zero at padded positions when reassembled (every
    loss masks those); per-sample outputs (a pooler) row by row. Stores nothing past
    ``limit_bytes``, and nothing for tensor data (no sentence keys), inputs without a 2-D
    attention mask, or left-padded batches.
    """

    def __init__(self, view: TappedModule, limit_bytes: int):
        self.view, self.limit, self.used = view, limit_bytes, 0
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.layout: tuple[int, list[bool]] | None = None  # (number of outputs, per-token flag of each tensor)

    def __call__(self, inputs: dict, keys: list[str] | None) -> tuple[tuple, list]:
        mask = inputs.get("attention_mask")
        usable = (
            keys is not None and self.limit > 0 and isinstance(mask, torch.Tensor) and mask.dim() == 2 and len(keys) == mask.shape[0]
            # right padding only: a left-padded sentence's positions (and outputs) move with the batch
            and bool((mask[:, 1:] <= mask[:, :-1]).all())
        )
        if usable and self.layout is not None and all(k in self.rows for k in keys):
            return self._assemble(keys, mask.bool())
        with torch.no_grad():
            t_out, t_taps = self.view(*self.view.flatten((), inputs))
        if usable and self.used < self.limit:
            self._store(keys, mask.bool(), t_out, t_taps)
        return t_out, t_taps

    def _store(self, keys: list[str], mask: torch.Tensor, t_out, t_taps) -> None:
        batch, seq = mask.shape
        tensors = [*t_out, *t_taps]
        if not all(isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == batch for t in tensors):
            self.limit = 0  # outputs that are not per sample cannot be reassembled
            return
        if any(t.dim() == 2 and t.shape[1] == seq for t in tensors):
            return  # [batch, seq] or [batch, width] with width == seq: ambiguous, keep nothing from this batch
        per_token = [t.dim() >= 3 and t.shape[1] == seq for t in tensors]
        if self.layout is None:
            self.layout = (len(t_out), per_token)
        elif self.layout != (len(t_out), per_token):
            self.limit = 0  # the outputs' structure changed with the batch: stop caching
            return
        for i, key in enumerate(keys):
            if key not in self.rows:
                rows = [t[i][mask[i]].clone() if token else t[i].clone() for t, token in zip(tensors, per_token)]
                self.rows[key] = rows
                self.used += sum(r.numel() * r.element_size() for r in rows)

    def _assemble(self, keys: list[str], mask: torch.Tensor) -> tuple[tuple, list]:
        count, per_token = self.layout
        tensors = []
        for j, token in enumerate(per_token):
            parts = [self.rows[k][j] for k in keys]
            if token:
                out = parts[0].new_zeros((*mask.shape, *parts[0].shape[1:]))
                for i, part in enumerate(parts):
                    out[i][mask[i]] = part
                tensors.append(out)
            else:
                tensors.append(torch.stack(parts))
        return tuple(tensors[:count]), tensors[count:]


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# ---- losses -------------------------------------------------------------------------------
def _token_mask(inputs: dict, like: torch.Tensor) -> torch.Tensor:
    mask = inputs.get("attention_mask")
    if mask is None or mask.shape != like.shape[:2]:
        return torch.ones(like.shape[:2], dtype=like.dtype)
    return mask.to(like.dtype)


def _per_sample_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # values [B, S]: mean over the valid tokens of each sample, then over samples
    return ((values * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def pooled_cosine_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - cosine between mask-mean-pooled [B, S, H] states: the sentence-embedding objective."""
    weights = mask[..., None] / mask.sum(1, keepdim=True)[..., None].clamp(min=1)
    return (1 - F.cosine_similarity((student * weights).sum(1), (teacher * weights).sum(1), dim=-1)).mean()


def hidden_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, mse_weight: float, cosine_weight: float) -> torch.Tensor:
    loss = student.new_zeros(())
    if student.dim() == 2:  # [B, H] outputs (pooled): one "token" per sample
        student, teacher, mask = student[:, None], teacher[:, None], mask[:, :1]
    if mse_weight:
        loss = loss + mse_weight * _per_sample_mean((student - teacher).pow(2).mean(-1), mask)
    if cosine_weight:
        loss = loss + cosine_weight * _per_sample_mean(1 - F.cosine_similarity(student, teacher, dim=-1), mask)
    return loss


def logits_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True, reduction="none").sum(-1)
    return _per_sample_mean(kl, mask) * t * t


# ---- the loop -----------------------------------------------------------------------------
class _Objective(torch.nn.Module):
    """Student forward + projections; DDP wraps this so every trained tensor syncs."""

    def __init__(self, student: TappedModule, projections: torch.nn.ModuleList):
        super().__init__()
        self.student = student
        self.projections = projections

    def forward(self, *flat):
        outputs, taps = self.student(*flat)
        return outputs, [proj(t) for proj, t in zip(self.projections, taps)]


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

    ``data``: None (the standard library's training sentences, with ``tokenizer``), a list
    of strings (with ``tokenizer``), or a list of input dicts (tensors, batched).
    """
    config = config or DistillConfig()
    import graphopt.quant.training  # noqa: F401 - gradients through quantized ops (straight-through)

    torch.manual_seed(config.seed)
    rank, world = _rank_world()
    tokenizer = tokenizer or student.meta.get("tokenizer")
    input_names = list(student.kwargs) or [f"arg{i}" for i in range(len(student.args))]

    teacher_outputs = teacher.run()
    student_outputs = student.run()
    if len(teacher_outputs) != len(student_outputs) or any(
        t.shape[:2] != s.shape[:2] for t, s in zip(teacher_outputs, student_outputs)
    ):
        raise DistillError(
            "teacher and student outputs do not correspond: teacher "
            f"{[tuple(t.shape) for t in teacher_outputs]} vs student {[tuple(s.shape) for s in student_outputs]}"
        )
    params = [p for p in student.module.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    if not params:
        raise DistillError("the student has no trainable (floating-point) parameters")

    student_blocks, teacher_blocks = block_outputs(student), block_outputs(teacher)
    mapping = layer_map(len(student_blocks), len(teacher_blocks)) if config.layers else []
    student_taps = [b.node for b in student_blocks] if mapping else []
    teacher_taps = [teacher_blocks[i].node for i in mapping]
    student_view = TappedModule(student, student_taps)
    teacher_view = TappedModule(teacher, teacher_taps)
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

    objective: torch.nn.Module = _Objective(student_view, projections)
    if world > 1:
        objective = torch.nn.parallel.DistributedDataParallel(objective, find_unused_parameters=True)
    trainable = [p for p in objective.parameters() if p.requires_grad]
    # float16 / bfloat16 parameters (e.g. half-precision cluster codebooks) are trained through
    # float32 master copies: Adam's squared-gradient state underflows in half precision.
    masters = {p: p.detach().float().clone().requires_grad_(True) for p in trainable if p.dtype in (torch.float16, torch.bfloat16)}
    optimized = [masters.get(p, p) for p in trainable]
    optimizer = torch.optim.AdamW(optimized, lr=config.lr, weight_decay=config.weight_decay)
    warmup_steps = int(config.warmup * config.steps)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, config.steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    is_logits = bool(student.output_names) and "logits" in student.output_names[0]
    if isinstance(data, (list, tuple)) and not data:
        raise DistillError("no training data: the data list is empty")
    if isinstance(data, (list, tuple)) and isinstance(data[0], dict):
        batches, validation = _tensor_batches(list(data)), None
    else:
        if tokenizer is None:
            raise DistillError("text data needs a tokenizer: pass tokenizer=... or a list of input dicts")
        if isinstance(data, (list, tuple)):
            batches, validation = _text_batches_from(list(data), tokenizer, config, input_names)
        else:
            batches, validation = _text_batches(tokenizer, config, input_names)

    checkpoint = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    start_step, history = 0, []
    if checkpoint is not None and (checkpoint / "state.json").exists():
        start_step, history = _load_checkpoint(checkpoint, student, projections, optimizer, scheduler)
        with torch.no_grad():  # master copies follow the restored half-precision values
            for low, master in masters.items():
                master.copy_(low.float())

    def evaluate() -> float | None:
        if validation is None:
            return None
        from graphopt.fidelity import compare_encoders

        names = list(student.kwargs)
        return compare_encoders(lambda **kw: teacher(**kw), lambda **kw: student(**kw), tokenizer, validation, input_names=names)["mean_cosine"]

    for _ in range(start_step):  # a resumed run sees the batches a straight run would
        next(batches)
    progress = _progress_bar(config, start_step, rank)
    start = time.perf_counter()
    best, since_best, stopped, samples = -math.inf, 0, "", 0
    step = start_step
    teacher_outputs_of = _TeacherCache(teacher_view, config.teacher_cache_mb * 2**20)
    for step in range(start_step, config.steps):
        inputs, keys = next(batches)
        flat = student_view.flatten((), inputs)
        t_out, t_taps = teacher_outputs_of(inputs, keys)
        s_out, s_taps = objective(*flat)
        mask = _token_mask(inputs, s_out[0])
        loss = s_out[0].new_zeros(())
        for index, (s_value, t_value) in enumerate(zip(s_out, t_out)):
            if not s_value.is_floating_point():
                continue
            if index == 0 and is_logits and config.logits_kl:
                loss = loss + config.logits_kl * logits_loss(s_value, t_value, mask, config.temperature)
            elif s_value.shape == t_value.shape:
                loss = loss + hidden_loss(s_value, t_value, mask, config.hidden_mse, config.hidden_cosine)
                if index == 0 and config.pooled_cosine and s_value.dim() == 3:
                    loss = loss + config.pooled_cosine * pooled_cosine_loss(s_value, t_value, mask)
        for s_tap, t_tap in zip(s_taps, t_taps):
            loss = loss + config.layers / max(1, len(s_taps)) * hidden_loss(s_tap, t_tap, mask, config.hidden_mse, config.hidden_cosine)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for low, master in masters.items():
            master.grad = None if low.grad is None else low.grad.float()
            low.grad = None  # the optimizer only zeroes the masters' gradients
        torch.nn.utils.clip_grad_norm_(optimized, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            for low, master in masters.items():
                low.copy_(master)
        samples += config.batch_size
        record: dict[str, Any] = {"step": step + 1, "loss": float(loss.detach())}
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            score = evaluate()
            record["val_mean_cosine"] = score
            if score is not None:
                if score > best + 1e-5:
                    best, since_best = score, 0
                else:
                    since_best += 1
                if config.target_cosine is not None and score >= config.target_cosine:
                    stopped = f"target cosine {config.target_cosine} reached"
                elif since_best >= config.patience:
                    stopped = f"no validation improvement in {config.patience} evaluations"
        history.append(record)
        if progress is not None:
            elapsed = time.perf_counter() - start
            progress.set_postfix(loss=f"{record['loss']:.4f}", samples_per_s=f"{samples / max(elapsed, 1e-9):.1f}")
            progress.update(1)
        if checkpoint is not None and rank == 0 and ((step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps):
            _save_checkpoint(checkpoint, student, projections, optimizer, scheduler, step + 1, history)
        if config.time_limit_s is not None and time.perf_counter() - start > config.time_limit_s:
            stopped = stopped or f"time limit {config.time_limit_s} s"
        if stopped:
            break
    if progress is not None:
        progress.close()
    for p in params:
        p.requires_grad_(False)
    result = DistillResult(program=student, steps=history[-1]["step"] if history else start_step, wall_s=time.perf_counter() - start, history=history, stopped=stopped or "all steps done", world_size=world)
    if report_dir is not None and rank == 0:
        result.curve_png = save_curve(history, Path(report_dir) / "distill_curve.png")
    return result


def _text_batches_from(sentences: list[str], tokenizer, config: DistillConfig, input_names) -> tuple[Iterable[tuple[dict, list[str]]], list[str]]:
    from graphopt.data import tokenize

    rng = random.Random(config.seed)
    order = list(sentences)
    rng.shuffle(order)
    n_val = min(config.eval_sentences, len(order) // 5)
    validation, train = order[:n_val], order[n_val:]
    if not train:
        raise DistillError("no training sentences left after the validation split")

    def batches():
        rank, world = _rank_world()
        epoch = 0
        while True:
            random.Random(config.seed + epoch).shuffle(train)
            for start in range(0, max(1, len(train) - config.batch_size + 1), config.batch_size):
                chunk = (train * (1 + config.batch_size // len(train)))[start : start + config.batch_size]
                mine = chunk[rank::world]
                inputs = tokenize(tokenizer, mine, max_length=config.max_length)
                yield {k: v for k, v in inputs.items() if k in input_names}, mine
            epoch += 1

    return batches(), (validation or None)


def _progress_bar(config: DistillConfig, start_step: int, rank: int):
    if not config.progress or rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=config.steps, initial=start_step, desc="distill", unit="step", dynamic_ncols=True)


def _save_checkpoint(folder: Path, student: Program, projections, optimizer, scheduler, step: int, history: list) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".tmp"
    tmp.mkdir(exist_ok=True)
    tensors = {f"student.{k}": v.detach().contiguous() for k, v in _named_tensors(student).items()}
    tensors.update({f"projection.{k}": v.detach().contiguous() for k, v in projections.state_dict().items()})
    save_file(tensors, str(tmp / "weights.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "history": history}))
    for name in ("weights.safetensors", "optimizer.pt", "state.json"):  # state.json last: it marks completeness
        os.replace(tmp / name, folder / name)
    tmp.rmdir()


def _load_checkpoint(folder: Path, student: Program, projections, optimizer, scheduler) -> tuple[int, list]:
    from safetensors.torch import load_file

    state = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "weights.safetensors"))
    named = _named_tensors(student)
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("student."):
                named[key[len("student.") :]].copy_(value)
    projections.load_state_dict({k[len("projection.") :]: v for k, v in tensors.items() if k.startswith("projection.")})
    extra = torch.load(folder / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    return int(state["step"]), list(state["history"])


def _named_tensors(program: Program) -> dict[str, torch.Tensor]:
    seen, named = set(), {}
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


__all__ = ["DistillConfig", "DistillResult", "DistillError", "distill", "hidden_loss", "logits_loss"]

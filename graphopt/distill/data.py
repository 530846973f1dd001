"""What a distillation run trains on: batches of text or of tensors, and a validation split.

Text: the sentences are shuffled (seeded) and a validation split carved from them (at
most a fifth, ``eval_sentences``), so validation is training-side text, never held-out.
Training batches are drawn forever, each epoch reshuffled, sorted by length within pools
of 16 batches so a batch pads little (padding is most of the compute on short
sentences), then shuffled again. Tensors: ``(args, kwargs)`` batches (or input dicts),
cycled; no validation. Inside a ``torch.distributed`` group every rank takes its share
(``[rank::world]``) of each global batch.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from graphopt.distill.config import DistillConfig, DistillError

TrainBatch = tuple[tuple, dict, list[str] | None]  # (args, kwargs, the batch's sentences: keys of the teacher cache)


def rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# ---- text ------------------------------------------------------------------------------------
def text_batches(sentences: Sequence[str], tokenizer: Any, config: DistillConfig, input_names: Sequence[str]) -> tuple[Iterator[TrainBatch], list[str]]:
    """Training batches of this process, and the validation sentences."""
    from graphopt.data import tokenize

    order = list(sentences)
    random.Random(config.seed).shuffle(order)
    n_val = min(config.eval_sentences, len(order) // 5)
    validation, train = order[:n_val], order[n_val:]
    if not train:
        raise DistillError("no training sentences left after the validation split")

    def batches() -> Iterator[TrainBatch]:
        rank, world = rank_world()
        for chunk in length_bucketed(train, config, tokenizer):
            mine = chunk[rank::world]
            inputs = tokenize(tokenizer, mine, max_length=config.max_length)
            yield (), {k: v for k, v in inputs.items() if k in input_names}, mine

    return batches(), validation


def length_bucketed(sentences: list[str], config: DistillConfig, tokenizer: Any, pool_batches: int = 16) -> Iterable[list[str]]:
    """Global batches forever: each epoch shuffled (seeded), then within pools of
    ``pool_batches`` batches sorted by length, so a batch pads little; batch order
    shuffled again. Fewer sentences than a batch are repeated to fill one."""
    size = config.batch_size
    if len(sentences) < size:
        sentences = (sentences * (size // len(sentences) + 1))[:size]
    encoded = tokenizer(list(sentences), truncation=True, max_length=config.max_length)["input_ids"]
    lengths = {s: len(ids) for s, ids in zip(sentences, encoded)}
    epoch = 0
    while True:
        rng = random.Random(config.seed + epoch)
        order = list(sentences)
        rng.shuffle(order)
        pool = size * pool_batches
        for start in range(0, len(order) - size + 1, pool):
            chunk = sorted(order[start : start + pool], key=lambda s: lengths[s])
            group = [chunk[i : i + size] for i in range(0, len(chunk) - size + 1, size)]
            rng.shuffle(group)
            yield from group
        epoch += 1


# ---- tensors ---------------------------------------------------------------------------------
def tensor_batches(data: Sequence[Any]) -> Iterator[TrainBatch]:
    """``data`` (``(args, kwargs)`` pairs or input dicts) cycled forever, this process's share
    of each. Batches with fewer rows than processes are left out: they cannot be shared."""
    if not data:
        raise DistillError("no training data: the data list is empty")
    rank, world = rank_world()
    pairs = [as_batch(item) for item in data]
    usable = [pair for pair in pairs if _rows(pair) >= world]
    if not usable:
        raise DistillError(f"no training batch has at least {world} rows to share among {world} processes")
    index = 0
    while True:
        args, kwargs = usable[index % len(usable)]
        yield tuple(_share(v, rank, world) for v in args), {k: _share(v, rank, world) for k, v in kwargs.items()}, None
        index += 1


def as_batch(item: Any) -> tuple[tuple, dict]:
    if isinstance(item, dict):
        return (), item
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], dict):
        return tuple(item[0]), item[1]
    raise DistillError(f"tensor data must be input dicts or (args, kwargs) pairs, got {type(item).__name__}")


def _share(value: Any, rank: int, world: int) -> Any:
    return value[rank::world] if isinstance(value, torch.Tensor) and value.dim() > 0 else value


def _rows(batch: tuple[tuple, dict]) -> float:
    first = next((v for v in [*batch[0], *batch[1].values()] if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    return float(first.shape[0]) if first is not None else float("inf")

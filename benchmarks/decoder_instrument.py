"""A small trained decoder: a MEASURING INSTRUMENT for lossy decoder recipes, not a product.

    python benchmarks/decoder_instrument.py            # train once (about 6 minutes on one core), or load from the cache

Lossy recipes (quantization, pruning, attention approximations...) can only be judged on a
decoder whose predictions mean something: on a randomly initialised one every recipe keeps
"fidelity", because there is nothing to lose. No trained decoder can be loaded offline here,
so this module trains one: a 4-layer Llama-style model (grouped-query attention, rotary
positions, SwiGLU) of about 5M parameters, with its own byte-level BPE tokenizer, on the
TRAINING part of :mod:`graphopt.data` only. Its quality is modest and beside the point; what
matters is that it is deterministic, cached, and far better than chance on text it never saw,
so a recipe's held-out perplexity ratio and next-token agreement measure something real.

* :data:`INSTRUMENT_CONFIG`: the model's :class:`transformers.LlamaConfig`.
* :func:`trained_decoder`: trains (or finds in the cache) and returns the model folder, which
  ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` load offline;
  ``instrument.json`` there records the settings, the losses, the verification perplexity and
  the wall time. The cache lives outside the repository, under
  ``~/.cache/graphopt/decoder-instrument/<hash>`` (``$XDG_CACHE_HOME`` is honoured); the hash
  covers the config, the tokenizer and training settings, steps, seed, the text of the
  training and verification parts and the transformers and torch versions.
* :func:`heldout_blocks`, :func:`perplexity`, :func:`next_token_agreement`, :func:`fidelity`:
  measurements on fixed-length token blocks of the HELD-OUT part, each taking
  ``logits_fn(input_ids, attention_mask) -> logits [batch, seq, vocab]`` (a tensor or a NumPy
  array), so that a PyTorch model (:func:`torch_logits_fn`) and an ONNX session measure alike.

Text is packed, not padded: each sentence's tokens are followed by eos, the stream is cut into
blocks of ``length - 1`` tokens and every block starts with bos.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import LlamaConfig

# ---- settings ----------------------------------------------------------------------------
RECIPE_VERSION = 1  # bump when the training code changes what it produces
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
TOKENIZER_SETTINGS = {
    "model": "byte-level-bpe",
    "vocab_size": 4096,
    "min_frequency": 2,
    "special_tokens": [PAD, BOS, EOS],  # ids 0, 1, 2
    "add_prefix_space": False,
    "model_max_length": 512,
}
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

INSTRUMENT_CONFIG = LlamaConfig(
    vocab_size=TOKENIZER_SETTINGS["vocab_size"],
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,  # grouped-query attention: 4 query heads per kv head
    head_dim=32,
    max_position_embeddings=512,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
)

DEFAULT_STEPS = 600  # about 9 epochs of the training part: verification ppl 70.3 at 500, 69.9 at 600; longer runs overfit
BLOCK_LENGTH = 128
BATCH_SIZE = 16
LEARNING_RATE = 2e-3
WARMUP_FRACTION = 0.1  # with 0.05, 500 steps ended at verification ppl 94; with 0.1 the 600-step run was at 70 by step 500
MIN_LR_FRACTION = 0.1  # the cosine decays to this share of the peak
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
EVAL_EVERY = 100  # verification perplexity every this many steps (recorded, never used to choose)
THREADS = 2

LogitsFn = Callable[[torch.Tensor, torch.Tensor], Any]
# config keys that say where a config came from, not what model it makes: left out of the cache key
_CONFIG_METADATA = frozenset({"transformers_version", "architectures", "dtype", "torch_dtype", "_name_or_path", "name_or_path"})


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "graphopt" / "decoder-instrument"


# ---- text and tokenizer ------------------------------------------------------------------
def _splits() -> tuple[list[str], list[str], list[str]]:
    from graphopt import data

    return data.train_sentences(), data.verification_sentences(), data.heldout_sentences()


def _text_hash(sentences: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for sentence in sentences:
        digest.update(sentence.encode())
        digest.update(b"\x00")
    return digest.hexdigest()


def train_tokenizer(sentences: Sequence[str]) -> Any:
    """A byte-level BPE tokenizer trained on ``sentences`` (deterministic: same text, same
    merges), as a left-padding :class:`transformers.PreTrainedTokenizerFast` that prepends bos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    settings = TOKENIZER_SETTINGS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=settings["add_prefix_space"])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=settings["vocab_size"],
        min_frequency=settings["min_frequency"],
        special_tokens=list(settings["special_tokens"]),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(sentences), trainer=trainer, length=len(sentences))
    if [tok.token_to_id(t) for t in (PAD, BOS, EOS)] != [PAD_ID, BOS_ID, EOS_ID]:
        raise RuntimeError("special tokens did not get ids 0, 1, 2")
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, BOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        model_max_length=settings["model_max_length"],
    )


def token_stream(tokenizer: Any, sentences: Sequence[str]) -> torch.Tensor:
    """The sentences' tokens, each sentence followed by eos, as one 1-D LongTensor."""
    encoded = tokenizer(list(sentences), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return torch.tensor([t for ids in encoded for t in [*ids, eos]], dtype=torch.long)


def pack(stream: torch.Tensor, length: int, bos_id: int, offset: int = 0) -> torch.Tensor:
    """Blocks [n, length] of ``stream[offset:]``: bos, then ``length - 1`` tokens each (the tail dropped)."""
    body = length - 1
    usable = stream[offset:]
    n = usable.numel() // body
    chunks = usable[: n * body].view(n, body)
    return torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), chunks], dim=1)


def heldout_blocks(tokenizer: Any, n_blocks: int | None, length: int = BLOCK_LENGTH) -> torch.Tensor:
    """``n_blocks`` token blocks [n, length] of the HELD-OUT part only (all when ``None``),
    the first ones of the packed stream, so every call gives the same blocks."""
    from graphopt import data

    blocks = pack(token_stream(tokenizer, data.heldout_sentences()), length, _bos_id(tokenizer))
    if n_blocks is not None:
        if n_blocks > blocks.shape[0]:
            raise ValueError(f"the held-out part holds {blocks.shape[0]} blocks of {length} tokens, not {n_blocks}")
        blocks = blocks[:n_blocks]
    return blocks


def verification_blocks(tokenizer: Any, n_blocks: int | None = None, length: int = BLOCK_LENGTH) -> torch.Tensor:
    """Like :func:`heldout_blocks`, from the verification part."""
    from graphopt import data

    blocks = pack(token_stream(tokenizer, data.verification_sentences()), length, _bos_id(tokenizer))
    return blocks if n_blocks is None else blocks[:n_blocks]


def _bos_id(tokenizer: Any) -> int:
    bos = tokenizer.bos_token_id
    return int(bos if bos is not None else tokenizer.eos_token_id)


# ---- measurements ------------------------------------------------------------------------
def torch_logits_fn(model: torch.nn.Module) -> LogitsFn:
    """``logits_fn`` of a Hugging Face causal LM (positions follow the mask, as for left padding)."""

    def logits_fn(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits

    return logits_fn


def _as_tensor(logits: Any) -> torch.Tensor:
    if isinstance(logits, (list, tuple)):
        logits = logits[0]  # an ONNX session's run() returns its outputs in a list
    if not isinstance(logits, torch.Tensor):
        logits = torch.from_numpy(np.asarray(logits))
    return logits.float()


def _batches(blocks: torch.Tensor | Sequence[Sequence[int]], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    blocks = torch.as_tensor(blocks, dtype=torch.long)
    if blocks.ndim != 2 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be [n, length >= 2] token ids, got shape {tuple(blocks.shape)}")
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start : start + batch_size]
        yield ids, torch.ones_like(ids)


def _scan(fns: Sequence[LogitsFn], blocks: Any, batch_size: int) -> tuple[list[float], int, int]:
    """Total next-token NLL of each function, the positions where all their argmaxes agree, the position count."""
    nll = [0.0] * len(fns)
    agree = total = 0
    for ids, mask in _batches(blocks, batch_size):
        targets = ids[:, 1:]
        argmaxes = []
        for index, fn in enumerate(fns):
            logits = _as_tensor(fn(ids, mask))[:, :-1].double()
            if logits.shape[:2] != targets.shape:
                raise ValueError(f"logits_fn returned shape {tuple(logits.shape)} for input {tuple(ids.shape)}")
            nll[index] += float(-torch.log_softmax(logits, -1).gather(-1, targets[..., None]).sum())
            argmaxes.append(logits.argmax(-1))
        agree += int(torch.stack([a == argmaxes[0] for a in argmaxes]).all(0).sum())
        total += targets.numel()
    if total == 0:
        raise ValueError("no blocks to measure")
    return nll, agree, total


def perplexity(logits_fn: LogitsFn, blocks: Any, batch_size: int = 8) -> float:
    """Teacher-forced perplexity of the blocks' next tokens (every position after the first)."""
    (nll,), _, total = _scan([logits_fn], blocks, batch_size)
    return math.exp(nll / total)


def next_token_agreement(logits_fn_a: LogitsFn, logits_fn_b: LogitsFn, blocks: Any, batch_size: int = 8) -> float:
    """Fraction of positions where the two functions' argmax next tokens agree."""
    _, agree, total = _scan([logits_fn_a, logits_fn_b], blocks, batch_size)
    return agree / total


def fidelity(reference_fn: LogitsFn, candidate_fn: LogitsFn, blocks: Any, batch_size: int = 8) -> dict[str, float]:
    """``ppl_ref``, ``ppl`` (the candidate's), ``ppl_ratio`` (candidate / reference) and
    ``agreement`` (argmax next token), from one pass over ``blocks``."""
    (nll_ref, nll), agree, total = _scan([reference_fn, candidate_fn], blocks, batch_size)
    ppl_ref, ppl = math.exp(nll_ref / total), math.exp(nll / total)
    return {"ppl_ref": ppl_ref, "ppl": ppl, "ppl_ratio": ppl / ppl_ref, "agreement": agree / total}


# ---- training ----------------------------------------------------------------------------
def instrument_key(
    *, steps: int = DEFAULT_STEPS, seed: int = 0, config: LlamaConfig | None = None, batch_size: int = BATCH_SIZE, block_length: int = BLOCK_LENGTH, lr: float = LEARNING_RATE
) -> str:
    """The cache key (folder name) :func:`trained_decoder` uses for these settings."""
    return _key(_settings(INSTRUMENT_CONFIG if config is None else config, steps, seed, batch_size, block_length, lr))


def _key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _settings(config: LlamaConfig, steps: int, seed: int, batch_size: int, length: int, lr: float) -> dict[str, Any]:
    """Everything the trained folder depends on (the cache key hashes it)."""
    if config.vocab_size != TOKENIZER_SETTINGS["vocab_size"]:
        raise ValueError(f"config.vocab_size must be the tokenizer's {TOKENIZER_SETTINGS['vocab_size']}, got {config.vocab_size}")
    if length > config.max_position_embeddings:
        raise ValueError(f"block_length {length} exceeds max_position_embeddings {config.max_position_embeddings}")
    if steps < 1 or batch_size < 1 or length < 2:
        raise ValueError(f"steps and batch_size must be at least 1 and block_length at least 2, got {steps}, {batch_size}, {length}")
    train, verification, _ = _splits()
    return {
        "recipe_version": RECIPE_VERSION,
        "model_config": {k: v for k, v in sorted(config.to_dict().items()) if k not in _CONFIG_METADATA},
        "tokenizer": TOKENIZER_SETTINGS,
        "training": {
            "steps": steps, "seed": seed, "batch_size": batch_size, "block_length": length, "lr": lr, "optimizer": "AdamW(0.9, 0.95)",
            "warmup_fraction": WARMUP_FRACTION, "min_lr_fraction": MIN_LR_FRACTION, "weight_decay": WEIGHT_DECAY,
            "grad_clip": GRAD_CLIP, "eval_every": EVAL_EVERY,
        },
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]},
        "text": {"train_sha256": _text_hash(train), "verification_sha256": _text_hash(verification)},
    }  # fmt: skip


def _lr_factor(step: int, steps: int) -> float:
    warmup = max(1, round(WARMUP_FRACTION * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


def _training_blocks(stream: torch.Tensor, length: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled training blocks; each epoch cuts the stream at a fresh random offset."""
    while True:
        offset = int(torch.randint(0, length - 1, (1,), generator=generator))
        blocks = pack(stream, length, BOS_ID, offset)
        yield from blocks[torch.randperm(blocks.shape[0], generator=generator)]


@contextlib.contextmanager
def _training_mode(threads: int | None) -> Iterator[None]:
    threads_before, deterministic_before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only_before = torch.is_deterministic_algorithms_warn_only_enabled()
    if threads is not None:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)  # on CPU nearly every kernel already is
    try:
        yield
    finally:
        torch.set_num_threads(threads_before)
        torch.use_deterministic_algorithms(deterministic_before, warn_only=warn_only_before)


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[decoder-instrument] {message}", file=sys.stderr, flush=True)


def trained_decoder(
    cache_dir: Path | None = None,
    *,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    progress: bool = True,
    config: LlamaConfig | None = None,
    batch_size: int = BATCH_SIZE,
    block_length: int = BLOCK_LENGTH,
    lr: float = LEARNING_RATE,
    threads: int | None = THREADS,
) -> Path:
    """The folder of the trained instrument: ``cache_dir/<hash>`` (default under
    :func:`default_cache_root`), trained on the first call and returned at once afterwards.

    Trained on the training part only, with AdamW and a warmed-up cosine schedule, from a fixed
    seed, under deterministic algorithms and ``threads`` threads (``None``: leave them). The
    folder is written into a temporary sibling and renamed into place, so a folder that exists
    is complete. ``config`` (default :data:`INSTRUMENT_CONFIG`) must keep its vocabulary size.
    """
    config = LlamaConfig.from_dict((INSTRUMENT_CONFIG if config is None else config).to_dict())  # a copy: saving the model edits it
    settings = _settings(config, steps, seed, batch_size, block_length, lr)
    key = _key(settings)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    folder = root / key
    if (folder / "instrument.json").is_file():
        _log(progress, f"cached: {folder}")
        return folder

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root))
    try:
        train, verification, _ = _splits()
        record = _train(tmp, config, settings, train, verification, progress=progress, threads=threads)
        (tmp / "instrument.json").write_text(json.dumps(record, indent=2) + "\n")
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / "instrument.json").is_file():  # not a concurrent run that finished first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(progress, f"saved: {folder}")
    return folder


def _train(folder: Path, config: LlamaConfig, settings: dict[str, Any], train: list[str], verification: list[str], *, progress: bool, threads: int | None) -> dict[str, Any]:
    from transformers import LlamaForCausalLM

    t_start = time.perf_counter()
    training = settings["training"]
    steps, seed, batch_size, length, lr = (training[k] for k in ("steps", "seed", "batch_size", "block_length", "lr"))
    tokenizer = train_tokenizer(train)
    if len(tokenizer) != config.vocab_size:
        raise RuntimeError(f"the tokenizer has {len(tokenizer)} tokens, the config {config.vocab_size}")
    stream = token_stream(tokenizer, train)
    val_blocks = verification_blocks(tokenizer, length=length)
    _log(progress, f"tokenizer: {len(tokenizer)} tokens; training stream {stream.numel()} tokens, {val_blocks.shape[0]} verification blocks")

    curve: list[dict[str, float]] = []
    losses: list[float] = []
    with _training_mode(threads):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        generator = torch.Generator().manual_seed(seed)
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps))
        blocks = _training_blocks(stream, length, generator)
        _log(progress, f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {steps} steps of {batch_size} x {length} tokens, {torch.get_num_threads()} threads")
        t_train = time.perf_counter()
        for step in range(steps):
            model.train()
            ids = torch.stack([next(blocks) for _ in range(batch_size)])
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            done = step + 1
            if done % EVAL_EVERY == 0 or done == steps:
                model.eval()
                ppl = perplexity(torch_logits_fn(model), val_blocks)
                recent = sum(losses[-EVAL_EVERY:]) / len(losses[-EVAL_EVERY:])
                curve.append({"step": done, "train_loss": recent, "verification_ppl": ppl, "seconds": time.perf_counter() - t_train})
                _log(progress, f"step {done}/{steps}: train loss {recent:.3f}, verification ppl {ppl:.2f}, {time.perf_counter() - t_train:.0f} s")
        train_seconds = time.perf_counter() - t_train
        model.eval()
        verification_ppl = curve[-1]["verification_ppl"] if curve else perplexity(torch_logits_fn(model), val_blocks)
        threads_used = torch.get_num_threads()

    model.save_pretrained(folder)  # safetensors
    tokenizer.save_pretrained(folder)
    tail = losses[-min(50, len(losses)) :]
    return {
        **settings,
        "parameters": sum(p.numel() for p in model.parameters()),
        "training_tokens": int(stream.numel()),
        "verification_blocks": int(val_blocks.shape[0]),
        "final_train_loss": losses[-1] if losses else None,
        "train_loss_last_50": sum(tail) / len(tail) if tail else None,
        "verification_ppl": verification_ppl,
        "uniform_ppl": float(config.vocab_size),
        "curve": curve,
        "threads": threads_used,
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - t_start,
    }


def load_instrument(folder: Path) -> tuple[Any, Any]:
    """The trained model (eval mode) and its tokenizer, from a :func:`trained_decoder` folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


# ---- command line ------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"default {default_cache_root()}")
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--heldout-blocks", type=int, default=None, help="held-out blocks to measure (default: all)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    folder = trained_decoder(args.cache_dir, steps=args.steps, seed=args.seed, threads=args.threads)
    record = json.loads((folder / "instrument.json").read_text())
    torch.set_num_threads(args.threads)
    model, tokenizer = load_instrument(folder)
    blocks = heldout_blocks(tokenizer, args.heldout_blocks)
    heldout_ppl = perplexity(torch_logits_fn(model), blocks)
    print(f"instrument: {folder}")
    print(f"  {record['parameters'] / 1e6:.2f}M parameters, {record['training']['steps']} steps, {record['threads']} threads")
    print(f"  training wall time {record['train_seconds']:.0f} s (with tokenizer and evaluation {record['wall_seconds']:.0f} s)")
    print(f"  training loss (last 50 steps) {record['train_loss_last_50']:.3f}")
    print(f"  verification perplexity {record['verification_ppl']:.2f}")
    print(f"  held-out perplexity {heldout_ppl:.2f} on {blocks.shape[0]} blocks of {blocks.shape[1]} tokens (uniform: {record['uniform_ppl']:.0f})")


if __name__ == "__main__":
    main()

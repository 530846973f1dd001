"""How faithfully a text encoder reproduces the original's sentence embeddings.

An encoder here is any callable that takes the tokenizer's tensors as keyword arguments
(``input_ids``, ``attention_mask``, ``token_type_ids``) and returns the last hidden state:
a PyTorch module, a graphopt ``Program`` or a wrapper around an ONNX Runtime session. Its
output may be a tensor, a NumPy array, a ``ModelOutput`` / dict with ``last_hidden_state``,
or a tuple whose first element is the hidden state.

Fidelity is measured on mean-pooled sentence embeddings: per-sentence cosine to the
reference, and the Spearman rank correlation of the two pairwise-similarity structures
(the quantity semantic search and clustering depend on).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from graphopt.data import batches, left_pad, positions

Encoder = Callable[..., Any]


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over real tokens: [batch, seq, d] -> [batch, d].

    Padded positions are selected away, not multiplied by zero, so even NaN or inf there
    cannot leak into the result.
    """
    mask = attention_mask.to(torch.bool).unsqueeze(-1)
    summed = torch.where(mask, last_hidden_state, torch.zeros((), dtype=last_hidden_state.dtype)).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1).to(last_hidden_state.dtype)
    return summed / counts


def last_hidden_state(output: Any) -> torch.Tensor:
    """The hidden-state tensor inside whatever an encoder returned."""
    if isinstance(output, Mapping):  # a dict or a transformers ModelOutput
        output = output["last_hidden_state"] if "last_hidden_state" in output else next(iter(output.values()), None)
    elif hasattr(output, "last_hidden_state"):
        output = output.last_hidden_state
    elif isinstance(output, (tuple, list)) and output:
        output = output[0]
    if isinstance(output, np.ndarray):
        output = torch.from_numpy(output)
    if not isinstance(output, torch.Tensor) or output.dim() != 3:
        raise TypeError(f"encoder output is not a [batch, seq, hidden] hidden state: got {_describe(output)}")
    return output


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    return f"{type(value).__name__} of shape {tuple(shape)}" if shape is not None else type(value).__name__


@torch.inference_mode()
def encode(
    fn: Encoder,
    tokenizer: Any,
    sentences: Sequence[str],
    batch_size: int = 32,
    max_length: int = 128,
    *,
    padding: str = "longest",
    input_names: Sequence[str] | None = None,
) -> torch.Tensor:
    """Mean-pooled float32 embeddings [n, d] of ``sentences`` under ``fn``.

    ``input_names`` restricts the tensors passed (e.g. a graph captured without
    ``token_type_ids``); by default every tensor the tokenizer returns is passed.
    """
    pooled = []
    for batch in batches(tokenizer, sentences, batch_size=batch_size, max_length=max_length, padding=padding):
        inputs = batch if input_names is None else {name: batch[name] for name in input_names}
        hidden = last_hidden_state(fn(**inputs)).detach().to("cpu", torch.float32)
        pooled.append(mean_pool(hidden, batch["attention_mask"]))
    if not pooled:
        raise ValueError("no sentences to encode")
    return torch.cat(pooled)


def rankdata(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, ties given their average rank (as scipy's default)."""
    _, inverse, counts = torch.unique(values, sorted=True, return_inverse=True, return_counts=True)
    counts = counts.to(torch.float64)
    first_rank = torch.cumsum(counts, 0) - counts + 1
    return (first_rank + (counts - 1) / 2)[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D samples; NaN when either is constant or too short."""
    x, y = x.reshape(-1), y.reshape(-1)
    if x.numel() != y.numel():
        raise ValueError(f"spearman needs samples of equal size, got {x.numel()} and {y.numel()}")
    if x.numel() < 2:
        return float("nan")
    rx, ry = rankdata(x.to(torch.float64)), rankdata(y.to(torch.float64))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = torch.sqrt((rx * rx).sum() * (ry * ry).sum())
    if denominator == 0:
        return float("nan")
    return float((rx * ry).sum() / denominator)


def pairwise_cosine(embeddings: torch.Tensor) -> torch.Tensor:
    unit = torch.nn.functional.normalize(embeddings.to(torch.float64), dim=-1)
    return unit @ unit.T


def embedding_fidelity(reference_embeddings: torch.Tensor, candidate_embeddings: torch.Tensor) -> dict[str, float | int]:
    """Agreement of candidate with reference embeddings (both [n, d], same sentences).

    ``mean_cosine`` / ``min_cosine``: cosine between each sentence's two embeddings;
    ``spearman``: rank correlation of the upper triangles of the two pairwise cosine
    matrices (NaN for fewer than three sentences).
    """
    reference = torch.as_tensor(reference_embeddings)
    candidate = torch.as_tensor(candidate_embeddings)
    if reference.dim() != 2 or reference.shape != candidate.shape:
        raise ValueError(f"embeddings must both be [n, d] of one shape, got {tuple(reference.shape)} and {tuple(candidate.shape)}")
    n = reference.shape[0]
    if n == 0:
        raise ValueError("no embeddings to compare")
    cosine = torch.nn.functional.cosine_similarity(reference.to(torch.float64), candidate.to(torch.float64), dim=-1).clamp(-1.0, 1.0)
    rows, cols = torch.triu_indices(n, n, offset=1)
    rank_correlation = spearman(pairwise_cosine(reference)[rows, cols], pairwise_cosine(candidate)[rows, cols]) if n >= 3 else float("nan")
    return {"mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min()), "spearman": rank_correlation, "n": n}


def compare_encoders(
    reference_fn: Encoder,
    candidate_fn: Encoder,
    tokenizer: Any,
    sentences: Sequence[str],
    batch_size: int = 32,
    max_length: int = 128,
    *,
    input_names: Sequence[str] | None = None,
) -> dict[str, float | int]:
    """:func:`embedding_fidelity` of two encoders on the same sentences and tokenization."""
    reference = encode(reference_fn, tokenizer, sentences, batch_size=batch_size, max_length=max_length, input_names=input_names)
    candidate = encode(candidate_fn, tokenizer, sentences, batch_size=batch_size, max_length=max_length, input_names=input_names)
    return embedding_fidelity(reference, candidate)


# ---- decoders --------------------------------------------------------------------------------
LogitsFn = Callable[[torch.Tensor, torch.Tensor], Any]  # (input_ids, attention_mask) -> logits [batch, seq, vocab]


def next_token_fidelity(reference: Any, candidate: Any, batches_of_ids: Sequence[Sequence[Sequence[int]]]) -> dict[str, float]:
    """Teacher-forced next-token fidelity of ``candidate`` to ``reference`` on token batches
    (each row its own text, padded on the left here): top-1 agreement over every real position
    that has a next token, and both perplexities of the actual next tokens and their ratio.

    ``reference`` and ``candidate``: a Hugging Face causal LM, or any ``logits_fn(input_ids,
    attention_mask)`` returning logits (e.g. :meth:`graphopt.export.generation.Generator.logits`).
    """
    agree = total = 0
    nll_ref = nll_cand = 0.0
    for rows in batches_of_ids:
        rows = [list(r) for r in rows if len(r) >= 2]
        if not rows:
            continue
        ids, mask = left_pad(rows, 0)
        ref = _logits(reference, ids, mask)[:, :-1].double()
        cand = _logits(candidate, ids, mask)[:, :-1].double()
        targets = ids[:, 1:]
        real = (mask[:, :-1] * mask[:, 1:]).bool()
        agree += int(((ref.argmax(-1) == cand.argmax(-1)) & real).sum())
        total += int(real.sum())
        nll_ref += float(-(torch.log_softmax(ref, -1).gather(-1, targets[..., None])[..., 0])[real].sum())
        nll_cand += float(-(torch.log_softmax(cand, -1).gather(-1, targets[..., None])[..., 0])[real].sum())
    if total == 0:
        raise ValueError("next_token_fidelity needs rows of at least two tokens")
    ppl_ref, ppl = float(np.exp(nll_ref / total)), float(np.exp(nll_cand / total))
    return {"agreement": agree / total, "ppl_reference": ppl_ref, "ppl": ppl, "ppl_ratio": ppl / ppl_ref, "tokens": total}


def _logits(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if isinstance(model, torch.nn.Module):
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits.float()
    out = model(ids, mask)
    return out if isinstance(out, torch.Tensor) else torch.from_numpy(np.asarray(out))

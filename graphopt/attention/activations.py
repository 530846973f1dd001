"""Real attention inputs at long sequence lengths, from MiniLM on long text.

MiniLM has 512 positions, so a sequence of n > 512 tokens is built as n / 512 windows of
consecutive text: each window runs through the model on its own (real positions 0…511),
the hidden states entering layer ``layer`` are concatenated along the sequence, and that
layer's own query/key/value projections give q, k, v for the whole length. The activations
are real (real text, real weights, real projections); only the positions repeat every
512 tokens.
"""

from __future__ import annotations

import torch

WINDOW = 512


def long_text_ids(tokenizer, tokens: int, *, heldout: bool = True) -> torch.Tensor:
    """(1, tokens) token ids of running text from the corpus (held-out sentences by default)."""
    from graphopt.data import heldout_sentences, train_sentences

    sentences = heldout_sentences() if heldout else train_sentences()
    ids: list[int] = []
    for sentence in sentences:
        ids.extend(tokenizer(sentence, add_special_tokens=False)["input_ids"])
        if len(ids) >= tokens:
            break
    if len(ids) < tokens:
        raise ValueError(f"the corpus has only {len(ids)} tokens, {tokens} asked")
    return torch.tensor(ids[:tokens])[None]


@torch.no_grad()
def long_hidden_states(model, tokenizer, seq: int, layer: int = 0, *, window: int = WINDOW) -> torch.Tensor:
    """(1, seq, hidden): the states entering ``model.encoder.layer[layer]``'s attention.

    ``seq`` tokens of held-out text are cut into windows of ``window - 2`` tokens, each run
    framed by [CLS] … [SEP] like a real input; the special tokens are dropped again.
    """
    inner = window - 2
    text = long_text_ids(tokenizer, seq)[0]
    attention = model.encoder.layer[layer].attention.self
    captured: list[torch.Tensor] = []
    handle = attention.register_forward_pre_hook(lambda _m, args, kwargs: captured.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    hidden = []
    try:
        for start in range(0, seq, inner):
            piece = text[start : start + inner]
            ids = torch.cat([torch.tensor([tokenizer.cls_token_id]), piece, torch.tensor([tokenizer.sep_token_id])])[None]
            captured.clear()
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
            hidden.append(captured[0][:, 1:-1])
    finally:
        handle.remove()
    return torch.cat(hidden, 1)[:, :seq]


@torch.no_grad()
def minilm_qkv(model, tokenizer, seq: int, layer: int = 0, *, window: int = WINDOW) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(q, k, v, scale) of ``model.encoder.layer[layer]`` on ``seq`` tokens of held-out text.

    Shapes (1, heads, seq, head_dim): the layer's own projections of :func:`long_hidden_states`.
    """
    states = long_hidden_states(model, tokenizer, seq, layer, window=window)
    attention = model.encoder.layer[layer].attention.self
    heads = model.config.num_attention_heads
    head_dim = states.shape[-1] // heads

    def split(linear):
        return linear(states).view(1, seq, heads, head_dim).transpose(1, 2).contiguous()

    return split(attention.query), split(attention.key), split(attention.value), head_dim**-0.5

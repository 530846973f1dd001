"""Tiny, deterministic, random-weight models for tests and benchmarks (no downloads).

``tiny_model(arch)`` builds a Hugging Face model from a small ``transformers`` config;
``example_inputs(arch)`` gives matching keyword inputs. ``PlainAttention`` is a
hand-written multi-head attention block with the textbook matmul/softmax graph.
"""

from __future__ import annotations

import math

import torch
from torch import nn

ARCHS = ("bert", "roberta", "distilbert", "gpt2", "llama", "vit")
# Hidden 32 with 4 heads (head_dim 8) keeps capture fast; llama uses 2 kv heads (GQA).
HIDDEN, HEADS, KV_HEADS, FFN, VOCAB, MAX_POS = 32, 4, 2, 64, 128, 128
IMAGE, PATCH = 16, 4


def _config(arch: str, layers: int):
    import transformers as tf

    if arch in ("bert", "roberta"):
        cls = tf.BertConfig if arch == "bert" else tf.RobertaConfig
        # RoBERTa positions start after padding_idx (1), so it needs two more positions.
        return cls(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
                   intermediate_size=FFN, max_position_embeddings=MAX_POS + 2)
    if arch == "distilbert":
        return tf.DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=layers, n_heads=HEADS, hidden_dim=FFN,
                                   max_position_embeddings=MAX_POS)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=layers, n_head=HEADS, n_inner=FFN,
                             n_positions=MAX_POS, use_cache=False, bos_token_id=0, eos_token_id=0)
    if arch == "llama":
        return tf.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
                              num_key_value_heads=KV_HEADS, intermediate_size=FFN, max_position_embeddings=MAX_POS,
                              use_cache=False)
    if arch == "vit":
        return tf.ViTConfig(hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
                            intermediate_size=FFN, image_size=IMAGE, patch_size=PATCH, num_channels=3)
    raise ValueError(f"unknown arch '{arch}'; choose one of {', '.join(ARCHS)}")


def tiny_model(arch: str, attn: str = "eager", layers: int = 2, seed: int = 0) -> nn.Module:
    """A tiny random ``transformers`` model of ``arch`` with the given attention implementation, in eval mode."""
    import transformers as tf

    if attn not in ("eager", "sdpa"):
        raise ValueError(f"attn must be 'eager' or 'sdpa', got '{attn}'")
    config = _config(arch, layers)
    torch.manual_seed(seed)
    return tf.AutoModel.from_config(config, attn_implementation=attn).eval()


def example_inputs(arch: str, batch: int = 2, seq: int = 16, padded: bool = True, seed: int = 0) -> dict:
    """Keyword inputs for ``tiny_model(arch)`` (or ``PlainAttention`` for ``arch="plain"``).

    With ``padded`` there is an ``attention_mask`` whose second row ends in padding (on
    the right, so no query row of a causal model is fully masked); without it there is
    no mask at all. ViT takes ``pixel_values`` only (``seq`` and ``padded`` are ignored).
    """
    gen = torch.Generator().manual_seed(seed)
    if arch == "plain":
        return plain_inputs(batch, seq, padded, seed)
    if arch == "vit":
        return {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=gen)}
    if arch not in ARCHS:
        raise ValueError(f"unknown arch '{arch}'; choose one of {', '.join(ARCHS)} or 'plain'")
    # Token ids from 3 up, so no id collides with RoBERTa's padding_idx (1) or special ids.
    inputs = {"input_ids": torch.randint(3, VOCAB, (batch, seq), generator=gen)}
    if padded:
        inputs["attention_mask"] = _key_mask(batch, seq).long()
    return inputs


def _key_mask(batch: int, seq: int) -> torch.Tensor:
    mask = torch.ones(batch, seq, dtype=torch.bool)
    if batch > 1:
        mask[1, seq - max(1, seq // 4):] = False
    return mask


class PlainAttention(nn.Module):
    """Textbook multi-head self-attention: ``softmax(q @ k^T / sqrt(d) + mask) @ v``.

    ``mask`` is optional: a boolean ``(batch, seq)`` key-padding mask (True = keep),
    applied with ``masked_fill`` so the graph has a boolean fill, not an additive mask.
    """

    def __init__(self, hidden: int = HIDDEN, heads: int = HEADS, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.heads, self.head_dim = heads, hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.eval()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(b, s, -1)
        return self.out(out)


def plain_inputs(batch: int = 2, seq: int = 16, padded: bool = True, seed: int = 0) -> dict:
    """Inputs for ``PlainAttention``: ``x`` and, with ``padded``, a boolean key mask."""
    gen = torch.Generator().manual_seed(seed)
    inputs = {"x": torch.randn(batch, seq, HIDDEN, generator=gen)}
    if padded:
        inputs["mask"] = _key_mask(batch, seq)
    return inputs


# ---- causal LMs for generation -------------------------------------------------------------
CAUSAL_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gpt2")


def tiny_causal_lm(arch: str, attn: str = "eager", layers: int = 2, seed: int = 0) -> nn.Module:
    """A tiny random ``*ForCausalLM`` of ``arch`` (GQA where the architecture has it), in eval
    mode, with bos 1, eos 2 and pad 0 inside its vocabulary."""
    import transformers as tf

    if attn not in ("eager", "sdpa"):
        raise ValueError(f"attn must be 'eager' or 'sdpa', got '{attn}'")
    tokens = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    common = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": layers, "num_attention_heads": HEADS,
              "num_key_value_heads": KV_HEADS, "intermediate_size": FFN, "max_position_embeddings": MAX_POS * 2, **tokens}
    configs = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, common),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, common),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {**common, "head_dim": HIDDEN // HEADS}),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, common),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, common),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {**common, "head_dim": HIDDEN // HEADS}),
        "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel, {"vocab_size": VOCAB, "n_embd": HIDDEN, "n_layer": layers, "n_head": HEADS,
                                                     "n_inner": FFN, "n_positions": MAX_POS * 2, **tokens}),
    }
    if arch not in configs:
        raise ValueError(f"unknown causal arch '{arch}'; choose one of {', '.join(CAUSAL_ARCHS)}")
    config_class, model_class, fields = configs[arch]
    torch.manual_seed(seed)
    return model_class(config_class(**fields, attn_implementation=attn)).eval()

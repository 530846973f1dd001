"""Zero-argument model factories for `graphopt optimize --model factories:NAME` in tests,
tiny Hugging Face directories with a tokenizer, and a pass that crashes (for reproducers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import fx

from graphopt import Pass, register_pass, zoo

# A WordPiece vocabulary as small as the tiny models' (zoo.VOCAB = 128 ids): specials, the
# letters and their continuations, digits, punctuation and common English words. Unknown
# words become [UNK]; the sentences still differ in length and content.
_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
_WORDS = ["the", "a", "an", "of", "to", "in", "is", "and", "or", "for", "on", "be", "it", "as", "by", "with", "that", "this",
          "are", "not", "from", "at", "if", "can", "value", "object", "return", "function", "name", "list", "type", "class"]
TINY_VOCAB = _SPECIALS + _LETTERS + [f"##{c}" for c in _LETTERS] + list("0123456789") + list(".,:;()'\"!?-") + _WORDS


def tiny_bert():
    return zoo.tiny_model("bert"), zoo.example_inputs("bert")


def tiny_gpt2():
    return zoo.tiny_model("gpt2"), zoo.example_inputs("gpt2")


def save_tiny_text_model(folder: str | Path, *, tokenizer: str = "good") -> Path:
    """A tiny BERT directory (config + weights) with a tokenizer that fits its vocabulary.

    ``tokenizer``: ``"good"`` (a WordPiece tokenizer of :data:`TINY_VOCAB`), ``"none"`` (no
    tokenizer files), ``"broken"`` (a tokenizer.json that is not JSON)."""
    from transformers import BertTokenizer

    folder = Path(folder)
    zoo.tiny_model("bert").save_pretrained(folder)
    if tokenizer == "good":
        assert len(TINY_VOCAB) <= zoo.VOCAB
        vocab = folder / "vocab.txt"
        vocab.write_text("\n".join(TINY_VOCAB) + "\n")
        BertTokenizer(vocab=str(vocab), do_lower_case=True).save_pretrained(folder)
    elif tokenizer == "broken":
        (folder / "tokenizer.json").write_text("{this is not json")
        (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizerFast"}))
    return folder


# ---- a capture that falls back to symbolic_trace ----------------------------------------------
@fx.wrap
def numpy_tanh(y):
    # a NumPy implementation of an op: fx keeps it as a leaf call, torch.export cannot trace it
    return torch.from_numpy(np.tanh(y.detach().numpy())).to(y.dtype)


class NumpyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return numpy_tanh(self.lin(x)) + x


def numpy_net():
    torch.manual_seed(0)
    return NumpyNet(), {"x": torch.randn(3, 4)}


class ConvNet(torch.nn.Module):
    """No linear layer, no embedding: nothing for quantize to match."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(4, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


def conv_net():
    torch.manual_seed(0)
    return ConvNet(), {"x": torch.randn(2, 4, 8)}


# ---- a pass that crashes ------------------------------------------------------------------------
@register_pass
class CrashForRepro(Pass):
    """Crashes on purpose, so a reproducer is written (graphopt repro tests)."""

    name: ClassVar[str] = "test-factories-crash"

    def run(self, program, ctx):
        raise RuntimeError("boom in test-factories-crash")


def save_tiny_causal_lm(folder: str | Path, arch: str = "llama") -> Path:
    """A tiny causal LM directory (config with its ``*ForCausalLM`` architecture, weights) with
    a WordPiece tokenizer of :data:`TINY_VOCAB`; the model's pad, bos and eos ids are set to the
    tokenizer's [PAD], [CLS] and [SEP]."""
    from transformers import BertTokenizer

    folder = Path(folder)
    model = zoo.tiny_causal_lm(arch)
    vocab = folder / "vocab.txt"
    folder.mkdir(parents=True, exist_ok=True)
    vocab.write_text("\n".join(TINY_VOCAB) + "\n")
    tokenizer = BertTokenizer(vocab=str(vocab), do_lower_case=True)
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.sep_token_id
    model.config.bos_token_id = model.generation_config.bos_token_id = tokenizer.cls_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

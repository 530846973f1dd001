"""Generation over an ONNX Runtime session of a decoder graph (:mod:`graphopt.decoder`).

:class:`Generator` runs the one step graph for prefill and then once per new token:

- prompts of different lengths are padded on the left (as ``transformers`` does for
  decoders); position ids count each row's real tokens;
- greedy decoding, or sampling with a seed (temperature, then top-k, then top-p, as
  ``transformers``' logits processors apply them); stop tokens end a row, whose later
  slots get the pad token; ``max_new_tokens`` bounds the run;
- the cache never leaves ONNX Runtime. Where the export marked the graph shareable
  (:mod:`graphopt.export.kv_buffer`: every present written by ``GroupQueryAttention`` from
  its past), one ``[batch, kv_heads, prompt + max_new_tokens, head_dim]`` buffer per key and
  value is allocated and bound once per generation as both past and present (a step rebinds
  only its three small inputs and the array its logits go to), so no step copies the cache.
  Otherwise each step's ``present.N.*`` outputs are bound, as OrtValues, as the next step's
  ``past_key_values.N.*`` inputs through IO binding: nothing goes through Python, but ORT
  writes the grown cache inside each step.
- a windowed cache (``window-attention``) is trimmed by the graph, or, where the export handed
  the window to the runtime (:data:`graphopt.export.kv_buffer.RUNTIME_WINDOW`, a shared-buffer
  graph), here: the slots the window drops are masked at once, and the kept ones are moved to
  the front of the buffer only when it fills, ``window_slack`` steps after the last move, so
  a step neither copies nor attends beyond ``sinks + window + window_slack`` entries.
- a ``streamer`` callable receives each step's new tokens as they are chosen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from graphopt.data import left_pad, positions
from graphopt.decoder import ATTENTION_MASK, INPUT_IDS, POSITION_IDS, DecoderSpec, trim_to_window
from graphopt.errors import ConfigError
from graphopt.export.keep_logits import LOGITS_TO_KEEP

Streamer = Callable[[np.ndarray], None]  # new token of every row, shape [batch]


@dataclass
class GenerationResult:
    """``sequences [batch, prompt + new]`` (the left-padded prompt, then the new tokens; rows
    that stopped early are filled with the pad token), the per-step ``logits [batch, vocab]``
    when asked for, the run's timings, and the cache length after each step (what a windowed
    cache caps)."""

    sequences: np.ndarray
    prompt_length: int
    logits: list[np.ndarray] = field(default_factory=list)
    prefill_ms: float = 0.0
    decode_ms: list[float] = field(default_factory=list)
    cache_lengths: list[int] = field(default_factory=list)  # entries the graph's present cache holds after each step
    buffer_slots: int = 0  # entries allocated per key and value buffer when they are shared (0: ORT grows each present)

    @property
    def new_tokens(self) -> np.ndarray:
        return self.sequences[:, self.prompt_length :]

    def timings(self) -> dict[str, float]:
        decode = float(np.sum(self.decode_ms)) / 1e3
        steps = len(self.decode_ms)
        return {"prefill_ms": round(self.prefill_ms, 3), "new_tokens": steps + 1, "decode_steps": steps,
                "decode_tokens_per_s": round(steps / decode, 2) if decode > 0 else 0.0,
                "decode_ms_median": round(float(np.median(self.decode_ms)), 3) if steps else 0.0}


@dataclass(frozen=True)
class SamplingOptions:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature} (use do_sample=False for greedy decoding)")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


def session_spec(session: ort.InferenceSession) -> DecoderSpec:
    """The :class:`DecoderSpec` graphopt's export stored in the model's metadata."""
    import json

    from graphopt.export.onnx_export import DECODER_METADATA

    stored = session.get_modelmeta().custom_metadata_map.get(DECODER_METADATA)
    if stored is None:
        raise ConfigError("the ONNX model is not a graphopt decoder export (its metadata has no "
                          f"{DECODER_METADATA!r}); export a program captured with graphopt.decoder.capture_decoder")
    return DecoderSpec.from_dict(json.loads(stored))


class Generator:
    """Generate with a decoder session; ``spec`` defaults to the one the export recorded.
    ``shared_buffer`` says whether it binds one cache buffer as past and present (set from the
    export's mark; setting it False runs a marked graph with its cache copied each step)."""

    def __init__(self, session: ort.InferenceSession, spec: DecoderSpec | None = None) -> None:
        if not hasattr(session, "io_binding"):
            raise ConfigError(f"generation needs an onnxruntime session (KV buffers are bound in place through its IO binding); "
                              f"this one runs on {session.get_providers()}: build decoders for an onnxruntime provider")
        self.session = session
        self.spec = spec = spec if spec is not None else session_spec(session)
        declared = [i.name for i in session.get_inputs()]
        expected = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *spec.past_names()]
        missing = [name for name in expected if name not in declared]
        if missing:
            raise ConfigError(f"the ONNX model is not a graphopt decoder step for this spec: it lacks inputs {missing[:4]}")
        self.output_names = [o.name for o in session.get_outputs()]
        if self.output_names[: 1 + 2 * spec.layers] != ["logits", *spec.present_names()]:
            raise ConfigError(f"the ONNX model's outputs {self.output_names[:3]}... are not logits, present.0.key, ...")
        self.cache_dtype = np.dtype(spec.cache_dtype)
        from graphopt.export.kv_buffer import KV_BUFFER_METADATA, RUNTIME_WINDOW, SHARED, WINDOW_METADATA

        metadata = session.get_modelmeta().custom_metadata_map
        self.shared_buffer = metadata.get(KV_BUFFER_METADATA) == SHARED
        # a windowed graph either gathers its kept slots into each present (never shared) or
        # returns its whole cache and leaves the window to the runtime (shared-buffer graphs)
        self.runtime_window = spec.cache_window is not None and metadata.get(WINDOW_METADATA) == RUNTIME_WINDOW
        self.window_slack = WINDOW_SLACK
        # the shared-buffer step binds its logits to an array of this type and vocabulary size
        # (None: outputs beyond logits and presents, or a vocabulary the graph leaves symbolic)
        logits_info = session.get_outputs()[0]
        vocab = logits_info.shape[-1] if logits_info.shape else None
        self._vocab = vocab if isinstance(vocab, int) else 0
        only_cache = len(self.output_names) == 1 + 2 * spec.layers
        self._logits_dtype = _NUMPY_TYPES.get(logits_info.type) if only_cache and self._vocab else None
        # a step needs the last position's logits only: a graph that can compute just those
        # (graphopt.export.keep_logits) is told so at every step, and prefill skips the others
        self.keeps_last = LOGITS_TO_KEEP in {i.name for i in session.get_overridable_initializers()}
        self._keep_last = ort.OrtValue.ortvalue_from_numpy(np.array(1, dtype=np.int64))

    @property
    def binds_once(self) -> bool:
        """Whether a generation binds the shared buffers once (and each step's logits to an
        array ORT writes into) instead of binding every cache every step."""
        return self.shared_buffer and self._logits_dtype is not None

    def _run_step(self, binding: Any, step_ids: np.ndarray, step_positions: np.ndarray, cache: _KvCache) -> tuple[np.ndarray, list[Any]]:
        """One step: the logits ``[batch, seq or 1, vocab]`` (the last position's alone where the
        graph can compute just those) and the presents (empty when shared)."""
        feeds = {INPUT_IDS: step_ids, ATTENTION_MASK: cache.mask, POSITION_IDS: step_positions}
        if self.keeps_last:
            feeds[LOGITS_TO_KEEP] = self._keep_last
        if self.binds_once:
            return self._run_shared_step(binding, feeds, cache), []
        past = dict(zip(self.spec.past_names(), cache.values))
        shared = dict(zip(self.spec.present_names(), cache.values)) if cache.shared else {}
        outputs = _bind_and_run(self.session, binding, self.output_names, feeds, past, shared)
        return outputs[0].numpy(), outputs[1 : 1 + 2 * self.spec.layers]

    def _run_shared_step(self, binding: Any, feeds: dict[str, Any], cache: _KvCache) -> np.ndarray:
        """A step on the shared buffers. They never move (a window compacts them in place), so
        ``generate`` binds them once; each step rebinds the three small inputs and a
        logits array ORT writes into: no per-step binding of 2 x layers caches, and no
        wrapping of every output afterwards (about 0.6 ms of a 16 ms step at the 0.5B shape)."""
        _bind_feeds(binding, feeds)  # binding a name again replaces it
        batch, seq = feeds[INPUT_IDS].shape
        seq = 1 if self.keeps_last else seq
        if cache.logits is None or cache.logits.shape[:2] != (batch, seq):
            cache.logits = np.empty((batch, seq, self._vocab), dtype=self._logits_dtype)
            binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(cache.logits))
        self.session.run_with_iobinding(binding)
        return cache.logits

    def logits(self, input_ids: Any, attention_mask: Any) -> np.ndarray:
        """Logits of every position of one prefill (past length 0): ``[batch, seq, vocab]``
        (teacher-forced scoring, e.g. :func:`graphopt.fidelity.next_token_fidelity`)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.asarray(attention_mask, dtype=np.int64)
        feed = {INPUT_IDS: ids, ATTENTION_MASK: mask, POSITION_IDS: _positions(mask)}
        empty = np.zeros((ids.shape[0], self.spec.kv_heads, 0, self.spec.head_dim), dtype=self.cache_dtype)
        feed.update(dict.fromkeys(self.spec.past_names(), empty))
        return self.session.run(["logits"], feed)[0]

    def __call__(self, input_ids: Any, attention_mask: Any) -> np.ndarray:
        return self.logits(input_ids, attention_mask)

    def generate(
        self,
        input_ids: Sequence[Sequence[int]] | np.ndarray,
        attention_mask: np.ndarray | None = None,
        *,
        max_new_tokens: int = 32,
        sampling: SamplingOptions | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        streamer: Streamer | None = None,
        return_logits: bool = False,
    ) -> GenerationResult:
        """Generate up to ``max_new_tokens`` per row. ``input_ids`` is a 2-D array (with
        ``attention_mask`` marking real tokens; padding must be on the left) or a list of
        token lists of any lengths (padded here). ``eos_token_id`` defaults to the model's."""
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        sampling = sampling or SamplingOptions()
        spec = self.spec
        pad = pad_token_id if pad_token_id is not None else (spec.pad_token_id if spec.pad_token_id is not None else (spec.eos_token_ids or (0,))[0])
        ids, mask = _prompt_arrays(input_ids, attention_mask, pad)
        batch, prompt_length = ids.shape
        unbounded = spec.cache_window is not None and spec.rotary  # a windowed rotary cache runs past the trained context
        if spec.max_positions is not None and not unbounded and int(mask.sum(1).max()) + max_new_tokens > spec.max_positions:
            raise ConfigError(f"a prompt of {int(mask.sum(1).max())} tokens plus max_new_tokens={max_new_tokens} exceeds the model's context "
                              f"of {spec.max_positions} positions")
        if spec.cache_window is not None and ids.shape[1] > sum(spec.cache_window):
            raise ConfigError(f"the prompt of {ids.shape[1]} tokens is longer than the windowed cache ({sum(spec.cache_window)} entries): "
                              "prefill it in pieces or widen the window")
        stops = set(spec.eos_token_ids if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id))
        rng = np.random.default_rng(sampling.seed)

        binding = self.session.io_binding()
        cache = self._empty_cache(mask, prompt_length + max_new_tokens)
        if self.binds_once:  # the buffers never move: bound here, for every step
            for name, value in zip(spec.past_names(), cache.values):
                binding.bind_ortvalue_input(name, value)
            for name, value in zip(spec.present_names(), cache.values):
                binding.bind_ortvalue_output(name, value)
        result = GenerationResult(sequences=ids, prompt_length=prompt_length, buffer_slots=cache.capacity if cache.shared else 0)
        finished = np.zeros(batch, dtype=bool)
        new_tokens: list[np.ndarray] = []
        step_ids, full_mask = ids, mask  # ``full_mask`` covers every token so far: positions count it
        for step in range(max_new_tokens):
            start = time.perf_counter()
            step_positions = _positions(full_mask)[:, -step_ids.shape[1] :]
            step_logits, presents = self._run_step(binding, step_ids, step_positions, cache)
            logits = step_logits[:, -1, :]
            result.cache_lengths.append(cache.stepped(presents))
            token = _choose(logits, sampling, rng)
            token = np.where(finished, pad, token)
            elapsed = (time.perf_counter() - start) * 1e3
            if step == 0:
                result.prefill_ms = elapsed
            else:
                result.decode_ms.append(elapsed)
            if return_logits:
                result.logits.append(logits.copy())
            new_tokens.append(token)
            if streamer is not None:
                streamer(token)
            finished |= np.isin(token, list(stops)) if stops else False
            if finished.all():
                break
            step_ids = token[:, None]
            full_mask = np.concatenate([full_mask, np.ones((batch, 1), dtype=full_mask.dtype)], axis=1)
            cache.make_room(1)
        result.sequences = np.concatenate([ids, np.stack(new_tokens, axis=1)], axis=1)
        return result

    def _empty_cache(self, prompt_mask: np.ndarray, needed: int) -> _KvCache:
        """The cache before the prefill: empty, or the shared buffers (``needed`` entries, or
        the window's sinks + window + slack when that is fewer)."""
        spec = self.spec
        batch = prompt_mask.shape[0]
        window = spec.cache_window if self.runtime_window else None
        if not self.shared_buffer:
            arrays = [np.zeros((batch, spec.kv_heads, 0, spec.head_dim), dtype=self.cache_dtype) for _ in range(2 * spec.layers)]
            graph_window = spec.cache_window if not self.runtime_window else None
            return _KvCache(arrays, prompt_mask, shared=False, window=window, slack=self.window_slack, graph_window=graph_window)
        capacity = needed if window is None else min(needed, sum(window) + max(1, self.window_slack))
        return _KvCache(self._new_buffers(batch, capacity), prompt_mask, shared=True, window=window, slack=self.window_slack)

    def _new_buffers(self, batch: int, capacity: int) -> list[np.ndarray]:
        """One shared buffer per key and value; never read beyond the mask's entries, so left uninitialised."""
        spec = self.spec
        return [np.empty((batch, spec.kv_heads, capacity, spec.head_dim), dtype=self.cache_dtype) for _ in range(2 * spec.layers)]


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
WINDOW_SLACK = 64  # entries a runtime-applied window's buffer holds past sinks + window: it is compacted once per this many steps


class _KvCache:
    """The cache between steps: its values as ORT holds them (the shared buffers, or the last
    step's presents), and ``mask``, the next step's attention mask over the cache's slots and
    its new tokens. A window is trimmed by the graph (``graph_window``: the mask follows it) or
    applied here (``window``): slots the window drops are masked, and the kept ones move to
    the front once the buffer (or, for copied caches, sinks + window + slack) is full."""

    def __init__(self, arrays: list[np.ndarray], prompt_mask: np.ndarray, *, shared: bool, window: tuple[int, int] | None = None,
                 slack: int = WINDOW_SLACK, graph_window: tuple[int, int] | None = None) -> None:
        self.arrays = arrays  # the shared buffers: ORT reads and writes this memory (OrtValues over it, not copies)
        self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
        self.mask = prompt_mask
        self.shared, self.window, self.graph_window = shared, window, graph_window
        # slots the cache may hold before a runtime window compacts it
        self.capacity = arrays[0].shape[2] if shared and arrays else (sum(window) + max(1, slack) if window else 0)
        self.length = 0  # slots written
        self.logits: np.ndarray | None = None  # the array ORT writes a shared step's logits into

    def stepped(self, presents: list[Any]) -> int:
        """Take a step's presents; return how many entries the cache keeps."""
        if self.shared:  # the step wrote into the buffers; the mask says how far
            self.length = self.mask.shape[1]
        else:
            self.values = presents
            self.length = int(presents[0].shape()[2]) if presents else 0
        if self.window is None:
            return self.length
        sinks, recent = self.window
        if self.length > sinks + recent:  # dropped by the window: masked until the next compaction
            self.mask = self.mask.copy()
            self.mask[:, sinks : self.length - recent] = 0
        return min(self.length, sinks + recent)

    def make_room(self, seq: int) -> None:
        """Extend the mask by ``seq`` new tokens, compacting a runtime window first if they would not fit."""
        if self.graph_window is not None:
            self.mask = trim_to_window(self.mask, self.graph_window)
        elif self.window is not None and self.length + seq > self.capacity:
            self._compact()
        self.mask = np.concatenate([self.mask, np.ones((self.mask.shape[0], seq), dtype=self.mask.dtype)], axis=1)

    def _compact(self) -> None:
        """Move the last ``window`` slots to just after the sinks: one copy per ``slack`` steps."""
        assert self.window is not None
        sinks, recent = self.window
        start, end = self.length - recent, self.length
        if self.shared:
            for array in self.arrays:  # in place, in the buffers ORT reads and writes
                array[:, :, sinks : sinks + recent] = array[:, :, start:end]
        else:  # an OrtValue from NumPy keeps its array alive
            kept = (np.concatenate([a[:, :, :sinks], a[:, :, start:end]], axis=2) for a in (v.numpy() for v in self.values))
            self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in kept]
        self.mask = trim_to_window(self.mask, self.window)
        self.length = sinks + recent


def _bind_feeds(binding: Any, feeds: dict[str, Any]) -> None:
    for name, array in feeds.items():
        if isinstance(array, ort.OrtValue):  # ORT binds an input that has a default (logits_to_keep) only as an OrtValue
            binding.bind_ortvalue_input(name, array)
        else:
            binding.bind_cpu_input(name, np.ascontiguousarray(array, dtype=np.int64))


def _bind_and_run(session: ort.InferenceSession, binding: Any, output_names: list[str], feeds: dict[str, Any], past: dict[str, Any],
                  shared: dict[str, Any]) -> list[Any]:
    """One step through IO binding; ``shared`` maps present outputs to the past buffers they write into."""
    binding.clear_binding_inputs()
    binding.clear_binding_outputs()
    _bind_feeds(binding, feeds)
    for name, value in past.items():  # the previous step's present, still inside ORT
        binding.bind_ortvalue_input(name, value)
    for name in output_names:
        if name in shared:
            binding.bind_ortvalue_output(name, shared[name])
        else:
            binding.bind_output(name, "cpu")
    session.run_with_iobinding(binding)
    return binding.get_outputs()


def _prompt_arrays(input_ids: Any, attention_mask: np.ndarray | None, pad: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(input_ids, np.ndarray) or hasattr(input_ids, "numpy"):
        ids = np.asarray(input_ids.numpy() if hasattr(input_ids, "numpy") else input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ConfigError(f"input_ids must be [batch, seq] with seq >= 1, got shape {ids.shape}")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask.numpy() if hasattr(attention_mask, "numpy") else attention_mask, dtype=np.int64)
        if mask.shape != ids.shape:
            raise ConfigError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
        if (mask.sum(1) == 0).any():
            raise ConfigError("a prompt row has no real token (its attention_mask is all zeros)")
        if (mask[:, -1] == 0).any():
            raise ConfigError("prompts must be padded on the left (a row's last attention_mask entry is 0): a decoder continues from the last slot")
        return ids, mask
    ids_t, mask_t = left_pad([list(map(int, row)) for row in input_ids], pad)
    return ids_t.numpy(), mask_t.numpy()


def _positions(mask: np.ndarray) -> np.ndarray:
    return positions(torch.from_numpy(mask)).numpy()


def _choose(logits: np.ndarray, sampling: SamplingOptions, rng: np.random.Generator) -> np.ndarray:
    if not sampling.do_sample:
        return logits.argmax(-1).astype(np.int64)
    scores = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k:
        k = min(sampling.top_k, scores.shape[-1])
        kth = np.partition(scores, -k, axis=-1)[:, -k][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    if sampling.top_p < 1.0:
        order = np.argsort(scores, axis=-1)  # ascending, as transformers' TopPLogitsWarper
        sorted_scores = np.take_along_axis(scores, order, axis=-1)
        probs = _softmax(sorted_scores)
        remove = np.cumsum(probs, axis=-1) <= 1 - sampling.top_p
        remove[:, -1] = False  # keep at least the most likely token
        mask = np.zeros_like(remove)
        np.put_along_axis(mask, order, remove, axis=-1)
        scores = np.where(mask, -np.inf, scores)
    probs = _softmax(scores)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs], dtype=np.int64)


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)

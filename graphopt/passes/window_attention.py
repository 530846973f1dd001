"""Bounded-memory attention for long generation: a sliding window plus attention sinks.

StreamingLLM (Xiao et al., ICLR 2024) keeps the first ``sinks`` cache entries (the tokens
that soak up attention mass a softmax must put somewhere) and the last ``window`` ones, so
the KV cache never holds more than ``sinks + window`` entries however long the generation
runs, on a pretrained decoder without retraining.

The pass rewrites every ``present.N.key|value`` output of a decoder program (captured by
:func:`graphopt.decoder.capture_decoder`) into the slots ``[0, sinks)`` and
``[max(sinks, L - window), L)`` of it (one gather, see ``_kept_slots``), where ``L`` is its length; while ``L <= sinks +
window`` that is the whole cache, so the program is unchanged on every sequence that fits
(the verification batches are far shorter) and the pass is checked like an exact one there.
It records the policy in the program's decoder spec; the generation runtime trims the
attention mask by the same rule, and position ids keep counting every token generated (the
cache stores keys after rotary, so the distances between the query and the kept keys are
the true ones). Where every layer's cache is a ``GroupQueryAttention`` (``gqa-attention``),
the export leaves the gather out and the runtime applies the same policy on one shared
buffer instead, masking the dropped slots and compacting once the buffer fills, so no step
copies the cache (:mod:`graphopt.export.kv_buffer`).

Limits: sinks count cache slots, so a left-padded row spends sink slots on its padding;
models whose own sliding-window mask is computed from cache indices (Mistral's
``sliding_window``) would see trimmed indices: the pass refuses a window larger than such a
model's own.
"""

from __future__ import annotations

import operator
from typing import ClassVar

import torch
from pydantic import Field

from graphopt.context import PassContext
from graphopt.decoder import DecoderSpec, decoder_spec, is_decoder_spec
from graphopt.errors import ConfigError
from graphopt.passbase import Pass, PassConfig, PassInfo, PassResult, register_pass
from graphopt.program import Program
from graphopt.surgery import stamp


class WindowAttentionConfig(PassConfig):
    sinks: int = Field(4, ge=0, description="first cache entries always kept (attention sinks)")
    window: int = Field(1020, ge=1, description="most recent cache entries kept")


class WindowAttentionInfo(PassInfo):
    sinks: int = 0
    window: int = 0
    cache_limit: int = 0
    presents_trimmed: int = 0


@register_pass
class WindowAttention(Pass):
    """Cap a decoder's KV cache at sinks + window entries (StreamingLLM); exact while the sequence fits."""

    name: ClassVar[str] = "window-attention"
    Config: ClassVar[type[PassConfig]] = WindowAttentionConfig
    Info: ClassVar[type[PassInfo]] = WindowAttentionInfo
    config: WindowAttentionConfig

    @classmethod
    def is_exact(cls, config: WindowAttentionConfig) -> bool:
        return False  # exact only while the sequence fits in sinks + window

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        if not is_decoder_spec(program):
            return PassResult.skipped(program, "not a decoder captured for generation (graphopt.decoder.capture_decoder)", WindowAttentionInfo())
        spec = decoder_spec(program)
        sinks, window = self.config.sinks, self.config.window
        if spec.cache_window is not None:
            raise ConfigError(f"the program's cache is already windowed ({spec.cache_window}); run window-attention once")
        model_window = program.meta.get("sliding_window")
        if isinstance(model_window, int) and sinks + window > model_window:
            raise ConfigError(f"window-attention keeps {sinks + window} entries, more than the model's own sliding window of {model_window}")
        longest = max((int(kwargs["attention_mask"].shape[1]) for _, kwargs in ctx.verification if "attention_mask" in kwargs), default=0)
        if longest > sinks + window:
            raise ConfigError(f"window-attention's cache of {sinks + window} entries is shorter than the verification runs ({longest} tokens), "
                              "so the pass could not be checked where it must be exact: use a larger window (it is meant to be far longer "
                              "than the texts the build verifies on)")
        graph = program.graph
        output = next(n for n in graph.nodes if n.op == "output")
        values = list(output.args[0])
        names = program.output_names
        trimmed = 0
        kept_slots = None  # one index vector for every present: they all hold the same number of entries
        for index, name in enumerate(names):
            if not name.startswith("present."):
                continue
            present = values[index]
            with graph.inserting_before(output):
                if kept_slots is None:
                    kept_slots = self._kept_slots(graph, present, sinks, window)
                kept = stamp(graph.call_function(torch.ops.aten.index_select.default, (present, 2, kept_slots)), self.name, present)
            values[index] = kept
            trimmed += 1
        if not trimmed:
            return PassResult.of(program, False, WindowAttentionInfo(sinks=sinks, window=window), "the program has no present.N outputs")
        output.args = (tuple(values),) if isinstance(output.args[0], tuple) else (values,)
        program.meta["decoder"] = DecoderSpec.from_dict({**spec.to_dict(), "cache_window": (sinks, window)}).to_dict()
        info = WindowAttentionInfo(sinks=sinks, window=window, cache_limit=sinks + window, presents_trimmed=trimmed)
        return PassResult.of(program, True, info)

    def _kept_slots(self, graph, present, sinks: int, window: int):
        """``cat(arange(s), arange(max(s, L - window), L))`` with ``s = min(sinks, L)`` (a
        prompt may be shorter than the sinks): the cache slots kept. One Gather by these indices
        copies the cache once; Slice, Slice and Concat copied it twice (int4 Qwen2.5-0.5B shape:
        the windowed graph's first 256 decode steps ran at 0.93x full attention's before, within
        noise of it after; benchmarks/window_long.py)."""
        call = graph.call_function
        length = stamp(call(torch.ops.aten.sym_size.int, (present, 2)), self.name, present)
        kept_sinks = stamp(call(torch.sym_min, (sinks, length)), self.name, present)
        tail = stamp(call(operator.sub, (length, window)), self.name, present)
        start = stamp(call(torch.sym_max, (kept_sinks, tail)), self.name, present)
        head = stamp(call(torch.ops.aten.arange.start, (0, kept_sinks), {"dtype": torch.long}), self.name, present)
        rest = stamp(call(torch.ops.aten.arange.start, (start, length), {"dtype": torch.long}), self.name, present)
        return stamp(call(torch.ops.aten.cat.default, ([head, rest],)), self.name, present)

"""One KV buffer for past and present: ``GroupQueryAttention``'s shared-buffer mode.

A decoder step graph (:mod:`graphopt.decoder`) takes the cache as ``past_key_values.N.*``
``[batch, kv_heads, past, head_dim]`` and returns ``present.N.*`` with ``past + seq``
entries. When every present is written by a ``GroupQueryAttention`` kernel straight from its
layer's past, the runtime can instead allocate one ``[batch, kv_heads, max_length, head_dim]``
buffer per key and value, once, and bind it as both past and present: the kernel sees the two
are the same memory, writes the new entries in place, and neither zeroes nor copies the cache
(ORT's ``past_present_share_buffer``; it is what the onnxruntime-genai builder's graphs run
in). Each step then costs nothing for the cache it carries.

Two things stand in the way in a captured graph, and :func:`share_kv_buffer` removes both:

- the graph reads the past length from the past's shape (transformers builds the causal
  mask from ``cache.get_seq_length()``), which a max-length buffer would get wrong. The
  graph's contract says ``attention_mask`` is ``[batch, past + seq]``, so the past length is
  rewritten as ``mask width - seq``: the same number for every input the graph accepts, and
  the right one when the past is a larger buffer;
- a present written by anything but ``GroupQueryAttention`` from its own past (a
  concatenation, the windowed cache's gather) grows or moves the cache, and such a graph is
  left as it is and not marked.

The lowering's ``seqlens_k`` and ``total_sequence_length`` already come from the mask (see
:func:`graphopt.attention.lowering.gqa_attention_onnx`), so the kernel attends over the
mask's ``past + seq`` entries of the buffer and writes the new ones after them.

A windowed cache (``window-attention``) writes each present as a ``Gather`` of the kept slots
of the kernel's present: a copy of the whole window every step, which is what made a 1,024-entry
window decode at 0.66-0.79x the short-sequence rate (benchmarks/README.md). With ``window``
set, :func:`share_kv_buffer` hands that policy to the runtime instead: the presents become the
kernel's own again and the graph is marked :data:`RUNTIME_WINDOW`, so the generator masks
the slots the window dropped (the kernel takes the mask as its bias) and moves the kept ones
to the front of the buffer only when it fills (:class:`graphopt.export.generation.Generator`).
Each step then attends over exactly the entries the windowed program keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

KV_BUFFER_METADATA = "graphopt.kv_buffer"  # model metadata: "shared" when the cache may be one preallocated buffer
SHARED = "shared"
# model metadata: "runtime" when the graph returns its whole cache and the runtime applies the
# decoder spec's cache_window (masking dropped slots, compacting the buffer when it fills)
WINDOW_METADATA = "graphopt.cache_window"
RUNTIME_WINDOW = "runtime"


@dataclass(frozen=True)
class KvBufferResult:
    shared: bool
    reason: str  # why not, when not shared
    rewritten_shapes: int = 0
    window_to_runtime: bool = False  # the window's Gathers were removed: the runtime applies it


def share_kv_buffer(model: ir.Model, past_names: list[str], present_names: list[str], *, mask_name: str, ids_name: str,
                    window: bool = False) -> KvBufferResult:
    """Make ``model`` runnable with past and present bound to one buffer, and mark it so
    (:data:`KV_BUFFER_METADATA`); or leave it unchanged and say why not. The graph stays
    exact under its usual contract (past of ``past`` entries, a mask of ``past + seq``).
    ``window``: the program's cache is windowed; its presents' Gathers go to the runtime."""
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    outputs = {v.name: v for v in graph.outputs}
    if mask_name not in inputs or ids_name not in inputs:
        return KvBufferResult(False, f"the graph has no {mask_name!r} or {ids_name!r} input")
    missing = [n for n in (*past_names, *present_names) if n not in (inputs if n in past_names else outputs)]
    if missing:
        return KvBufferResult(False, f"the graph lacks the cache values {missing[:2]}")
    written = dict(outputs)  # each present as the kernel writes it (before a window's Gather)
    if window:
        reason = _window_gathers_reason(outputs, present_names)
        if reason:
            return KvBufferResult(False, reason)
        written.update({name: _kernel_present(outputs[name]) for name in present_names})
    for slot, (past, present) in enumerate(zip(past_names, present_names)):
        producer = written[present].producer()
        if producer is None or producer.op_type != "GroupQueryAttention" or producer.domain != "com.microsoft":
            kind = "a graph input" if producer is None else f"{producer.op_type} ({producer.name})"
            return KvBufferResult(False, f"{present} is written by {kind}, not by GroupQueryAttention from {past}")
        index = 3 + slot % 2  # past_key, past_value
        if producer.inputs[index] is not inputs[past] or producer.outputs[1 + slot % 2] is not written[present]:
            return KvBufferResult(False, f"{present} is not GroupQueryAttention's update of {past}")
    shape_reads: list[ir.Node] = []
    for name in past_names:
        for node, index in inputs[name].uses():
            if node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft" and index in (3, 4):
                continue
            if node.op_type == "Shape" and node.domain in ("", "ai.onnx"):
                start, end = _shape_range(node)
                if end <= 2 or start >= 3:  # batch, kv heads or head_dim: the buffer has them too
                    continue
                if (start, end) == (2, 3):
                    shape_reads.append(node)
                    continue
            return KvBufferResult(False, f"{node.op_type} ({node.name}) reads {name} other than its batch, heads or head size")
    if shape_reads:
        past_length = _past_length_from_mask(graph, inputs[mask_name], inputs[ids_name])
        for node in shape_reads:
            node.outputs[0].replace_all_uses_with(past_length)
        for node in shape_reads:
            graph.remove(node, safe=True)
    if window:
        _hand_window_to_runtime(model, outputs, present_names)
    model.metadata_props[KV_BUFFER_METADATA] = SHARED
    return KvBufferResult(True, "", len(shape_reads), window_to_runtime=window)


def _kernel_present(present: ir.Value) -> ir.Value:
    """The value a window's ``Gather(kernel present, kept slots, axis=2)`` reads, or ``present``."""
    node = present.producer()
    if node is None or node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or node.inputs[0] is None:
        return present
    axis = node.attributes.get("axis")
    return node.inputs[0] if axis is not None and axis.as_int() in (2, -2) else present


def _window_gathers_reason(outputs: dict[str | None, ir.Value], present_names: list[str]) -> str:
    """Why the windowed presents cannot go to the runtime ("" when they can): each must be one
    Gather (on the cache axis) of what the layer wrote, all by the same kept slots."""
    slots = set()
    for name in present_names:
        gather = outputs[name].producer()
        if gather is None or _kernel_present(outputs[name]) is outputs[name]:
            kind = "a graph input" if gather is None else f"{gather.op_type} ({gather.name})"
            return f"the windowed {name} is written by {kind}, not by a Gather of the cache's slots"
        slots.add(id(gather.inputs[1]))
    return "" if len(slots) == 1 else "the windowed presents are gathered by different slot indices"


def _hand_window_to_runtime(model: ir.Model, outputs: dict[str | None, ir.Value], present_names: list[str]) -> None:
    """Return each kernel's present itself in place of its window's Gather, drop the Gathers
    and the slot arithmetic feeding them, and mark the graph :data:`RUNTIME_WINDOW`."""
    graph = model.graph
    positions = {value.name: index for index, value in enumerate(graph.outputs)}
    for name in present_names:
        gathered = outputs[name]
        gather = gathered.producer()
        kernel_present = _kernel_present(gathered)
        gathered.name = f"{name}_windowed"
        graph.outputs[positions[name]] = kernel_present
        kernel_present.name = name
        if gather is not None:
            graph.remove(gather, safe=True)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    model.metadata_props[WINDOW_METADATA] = RUNTIME_WINDOW


def _shape_range(node: ir.Node) -> tuple[int, int]:
    """The dimensions ``[start, end)`` a Shape node reads of a rank-4 cache tensor."""
    start_attr, end_attr = node.attributes.get("start"), node.attributes.get("end")
    start = start_attr.as_int() if start_attr is not None else 0
    end = end_attr.as_int() if end_attr is not None else 4
    return (start + 4 if start < 0 else start), (end + 4 if end < 0 else end)


def _past_length_from_mask(graph: ir.Graph, mask: ir.Value, ids: ir.Value) -> ir.Value:
    """``Shape(mask)[1:2] - Shape(input_ids)[1:2]``: the past length the graph's contract implies."""
    total = ir.node("Shape", [mask], attributes={"start": 1, "end": 2}, name="kv_buffer_total")
    seq = ir.node("Shape", [ids], attributes={"start": 1, "end": 2}, name="kv_buffer_seq")
    past = ir.node("Sub", [total.outputs[0], seq.outputs[0]], name="kv_buffer_past_length")
    first = next(iter(graph))
    for node in (total, seq, past):  # at the top: the graph inputs are all they read
        graph.insert_before(first, node)
    past.outputs[0].name = "kv_buffer_past_length"
    return past.outputs[0]

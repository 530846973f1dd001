"""Logits only for the positions generation reads: the ``logits_to_keep`` input.

A decoder step graph returns ``logits [batch, seq, vocab]`` for every position it is given,
which teacher-forced scoring needs. Generation reads only the last position: at prefill over
a 128-token prompt the LM head (and whatever runs between the last layer and it) works for
127 positions nobody reads. At the Qwen2.5-0.5B shape that head is a 896 x 151,936 GEMM, a
fifth of the prefill's multiply-adds; with ``refine-head`` each position also runs a TopK over
the whole vocabulary.

:func:`keep_last_logits` gives the graph an optional input ``logits_to_keep`` (int64 scalar,
Hugging Face's name and meaning) and slices the position axis before the head: only the last
``logits_to_keep`` positions go on, and 0, its default, keeps them all. The default is stored
as an initializer of the same name (ONNX's overridable initializer), so a caller that does
not know the input, an ONNX checker, Optimum-style runtimes and onnxruntime-genai run the
graph as before, with every position's logits. graphopt's generator feeds 1.

Where to slice is found, not assumed: walking back from ``logits`` over the nodes that compute
it, the graph is cut at each value every path from the inputs to the logits goes through. The
earliest such value of shape ``[batch, seq, hidden]`` before which every node is position-wise
(elementwise ops with constants that broadcast over positions, matmuls on trailing axes,
``MatMulNBits``, top-k, gathers and scatters on the last axis, reductions and norms over the
last axis) is where the slice goes. That is the last layer's residual stream after its
attention in the decoders of the zoo, so its MLP, the final norm and the head run for the kept
positions only. A graph where no such cut exists (the head reads a value reshaped by another
input's shape, say) is left as it is, with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

LOGITS_TO_KEEP = "logits_to_keep"
KEPT_AXIS = "kept_sequence_length"  # the logits' position axis after the slice

# ops that act on each element alone (their constant inputs must broadcast over positions)
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Sigmoid", "Tanh", "Cast", "Neg", "Erf", "Relu",
                          "Exp", "Log", "Softplus", "Identity", "Max", "Min", "Gelu", "FastGelu", "QuickGelu"})
_REDUCE = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceL2", "ReduceSumSquare"})
_LAST_AXIS = frozenset({"TopK", "Softmax", "LogSoftmax", "GatherElements", "ScatterElements", "Split", "LayerNormalization",
                        "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "SkipLayerNormalization"})
_AXIS_DEFAULTS = {"Softmax": -1, "LogSoftmax": -1, "TopK": -1, "LayerNormalization": -1, "SimplifiedLayerNormalization": -1,
                  "SkipSimplifiedLayerNormalization": -1, "SkipLayerNormalization": -1, "Split": 0, "GatherElements": 0,
                  "ScatterElements": 0}


@dataclass(frozen=True)
class KeepLogitsResult:
    applied: bool
    reason: str  # why not, when not applied
    sliced: str = ""  # the value the slice reads
    nodes: int = 0  # nodes that now run on the kept positions only


def keep_last_logits(model: ir.Model, logits_name: str = "logits") -> KeepLogitsResult:
    """Add the ``logits_to_keep`` input to ``model`` (see the module doc) and return where it
    slices; or leave the model unchanged and say why not."""
    graph = model.graph
    logits = next((v for v in graph.outputs if v.name == logits_name), None)
    if logits is None:
        return KeepLogitsResult(False, f"the graph has no {logits_name!r} output")
    if any(v.name == LOGITS_TO_KEEP for v in graph.inputs) or LOGITS_TO_KEEP in graph.initializers:
        return KeepLogitsResult(False, f"the graph already has a {LOGITS_TO_KEEP!r} value")
    if logits.shape is None or len(logits.shape) != 3:
        return KeepLogitsResult(False, f"the logits' shape {logits.shape} is not [batch, seq, vocab]")
    cut = _head_cut(graph, logits)
    if isinstance(cut, str):
        return KeepLogitsResult(False, cut)
    hidden, region = cut
    _slice_positions(graph, hidden, region)
    for node in region:  # their position axis is no longer the inputs' sequence axis
        for value in node.outputs:
            if value.shape is not None and len(value.shape) >= 2:
                value.shape = ir.Shape([value.shape[0], KEPT_AXIS, *value.shape[2:]])
    return KeepLogitsResult(True, "", sliced=str(hidden.name), nodes=len(region))


def _head_cut(graph: ir.Graph, logits: ir.Value) -> tuple[ir.Value, list[ir.Node]] | str:
    """The earliest value that every input-to-logits path goes through, with only position-wise
    nodes after it, and those nodes; or why there is none."""
    variable = _input_dependent(graph)
    order = {id(node): index for index, node in enumerate(graph)}
    frontier: dict[int, ir.Value] = {id(logits): logits}
    region: list[ir.Node] = []
    best: tuple[ir.Value, list[ir.Node]] | None = None
    stopped_at = ""
    while frontier:
        if len(frontier) == 1:
            (value,) = frontier.values()
            if region and _is_positions_hidden(value, logits) and _closed(region, logits):
                best = (value, list(region))
        value = max(frontier.values(), key=lambda v: order.get(id(v.producer()), -1))
        node = value.producer()
        if node is None or not _position_wise(node, variable):
            stopped_at = "a graph input" if node is None else f"{node.op_type} {node.name!r}"
            break
        region.append(node)
        for output in node.outputs:
            frontier.pop(id(output), None)
        for source in node.inputs:
            if source is not None and id(source) in variable:
                frontier[id(source)] = source
    if best is None:
        return f"no [batch, seq, hidden] value before the logits has only position-wise nodes after it (the walk back stopped at {stopped_at})"
    return best


def _input_dependent(graph: ir.Graph) -> set[int]:
    """ids of the values that depend on a graph input (the rest are constants)."""
    variable = {id(v) for v in graph.inputs if v.name not in graph.initializers}
    for node in graph:
        if any(v is not None and id(v) in variable for v in node.inputs):
            variable.update(id(v) for v in node.outputs)
    return variable


def _is_positions_hidden(value: ir.Value, logits: ir.Value) -> bool:
    shape, out = value.shape, logits.shape
    return shape is not None and out is not None and len(shape) == 3 and shape[1] == out[1] and not isinstance(shape[1], int)


def _closed(region: list[ir.Node], logits: ir.Value) -> bool:
    """Whether the region's values are read by the region only (and the graph reads only the logits)."""
    members = {id(node) for node in region}
    for node in region:
        for value in node.outputs:
            if value.is_graph_output() and value is not logits:
                return False
            if any(id(use.node) not in members for use in value.uses()):
                return False
    return True


def _position_wise(node: ir.Node, variable: set[int]) -> bool:
    """Whether each position of ``node``'s outputs depends on that position of its inputs only,
    with positions on axis 1 of every variable input and output."""
    if node.domain not in ("", "ai.onnx", "com.microsoft") or any(a.type == ir.AttributeType.GRAPH for a in node.attributes.values()):
        return False
    inputs = [v for v in node.inputs if v is not None]
    varying = [v for v in inputs if id(v) in variable]
    constants = [v for v in inputs if id(v) not in variable]
    known = [_rank(v) for v in varying]
    ranks = {r for r in known if r is not None}
    if not ranks or None in known or min(ranks) < 3:  # positions on axis 1 of a known rank >= 3
        return False
    op = node.op_type
    if op in _ELEMENTWISE:
        return len(ranks) == 1 and all(_broadcasts_over_positions(v) for v in constants)
    if op == "MatMul":  # rows of a constant matrix, or batched over the leading axes
        return (len(varying) == 1 and node.inputs[0] is varying[0] and _rank(node.inputs[1]) == 2) or (len(varying) == 2 and min(ranks) >= 4)
    if op == "MatMulNBits":
        return len(varying) == 1 and node.inputs[0] is varying[0]
    if op == "Gather":  # rows of a constant table, picked by varying indices
        return len(varying) == 1 and node.inputs[1] is varying[0] and _attr(node, "axis", 0) == 0
    if op in ("Unsqueeze", "Squeeze"):
        axes = _constant_ints(node.inputs[1] if len(node.inputs) > 1 else None)
        if not axes:
            return False
        rank = max(ranks) + (len(axes) if op == "Unsqueeze" else 0)
        return all(_trailing(a, rank) for a in axes)
    rank = max(ranks)
    if op in _REDUCE:
        axes = _constant_ints(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else _attr_ints(node, "axes")
        return bool(axes) and all(_trailing(a, rank) for a in axes or ()) and all(v is node.inputs[0] for v in varying)
    if op in _LAST_AXIS:
        return len(ranks) == 1 and _trailing(_attr(node, "axis", _AXIS_DEFAULTS[op]), rank) and all(
            _broadcasts_over_positions(v) for v in constants if v is not node.inputs[0])
    return False


def _rank(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else len(value.shape)


def _trailing(axis: int, rank: int) -> bool:
    """Whether ``axis`` of a rank-``rank`` tensor lies after the position axis (1)."""
    return (axis + rank if axis < 0 else axis) >= 2


def _broadcasts_over_positions(value: ir.Value) -> bool:
    """A constant whose shape has no position axis of its own: rank <= 1, or all 1 but the last."""
    shape = value.shape
    if shape is None:
        return False
    return len(shape) <= 1 or all(isinstance(d, int) and d == 1 for d in list(shape)[:-1])


def _constant_ints(value: ir.Value | None) -> list[int] | None:
    if value is None:
        return None
    const = ir.convenience.get_const_tensor(value)
    return None if const is None else [int(x) for x in np.asarray(const.numpy()).reshape(-1)]


def _attr(node: ir.Node, name: str, default: int) -> int:
    attribute = node.attributes.get(name)
    return default if attribute is None else int(attribute.as_int())


def _attr_ints(node: ir.Node, name: str) -> list[int] | None:
    attribute = node.attributes.get(name)
    return None if attribute is None else [int(a) for a in attribute.as_ints()]


def _slice_positions(graph: ir.Graph, hidden: ir.Value, region: Iterable[ir.Node]) -> None:
    """``hidden[:, -logits_to_keep:, :]`` in place of ``hidden`` for the region's nodes."""
    keep = ir.Value(name=LOGITS_TO_KEEP, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.INT64),
                    const_value=ir.tensor(np.array(0, dtype=np.int64), name=LOGITS_TO_KEEP))
    graph.inputs.append(keep)
    graph.register_initializer(keep)

    def constant(name: str, values: list[int]) -> ir.Value:
        value = ir.Value(name=f"{LOGITS_TO_KEEP}_{name}", shape=ir.Shape([len(values)]), type=ir.TensorType(ir.DataType.INT64),
                         const_value=ir.tensor(np.array(values, dtype=np.int64), name=f"{LOGITS_TO_KEEP}_{name}"))
        graph.register_initializer(value)
        return value

    negated = ir.node("Neg", [keep], name=f"{LOGITS_TO_KEEP}_neg")
    start = ir.node("Reshape", [negated.outputs[0], constant("one_axis", [1])], name=f"{LOGITS_TO_KEEP}_start")
    kept = ir.node("Slice", [hidden, start.outputs[0], constant("end", [np.iinfo(np.int64).max]), constant("axis", [1])],
                   name=f"{LOGITS_TO_KEEP}_slice")
    for node, shape in ((negated, []), (start, [1])):
        node.outputs[0].name, node.outputs[0].shape, node.outputs[0].type = f"{node.name}_out", ir.Shape(shape), keep.type
    kept.outputs[0].name = f"{hidden.name}_kept"
    kept.outputs[0].type = hidden.type
    if hidden.shape is not None:
        kept.outputs[0].shape = ir.Shape([hidden.shape[0], KEPT_AXIS, *hidden.shape[2:]])
    members = {id(node) for node in region}
    for use in list(hidden.uses()):
        if id(use.node) in members:
            use.node.replace_input_with(use.idx, kept.outputs[0])
    producer = hidden.producer()
    new_nodes = [negated, start, kept]
    if producer is None:
        graph.insert_before(next(iter(graph)), new_nodes)
    else:
        graph.insert_after(producer, new_nodes)

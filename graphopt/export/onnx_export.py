"""Export a Program to ONNX through torch.onnx's dynamo exporter.

Beyond ``torch.onnx.export`` this module:
- names inputs after the program's arguments, outputs after ``program.output_names`` and
  dynamic axes ``batch`` / ``seq`` (a named ``torch.export.Dim`` keeps its own name);
- stores tensors with identical content once (tied weights, deduplicated weights);
- writes atomically: everything goes to a temporary folder beside the target and is moved
  into place with ``os.replace``, the model file last;
- keeps external data inside the output folder, and refuses locations that escape it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import onnx
import onnx_ir as ir
import torch

from graphopt.errors import ConfigError, ExportError
from graphopt.inputs import dynamic_axis_names, input_names, onnx_input_names
from graphopt.program import Program

from .lowerings import lowering_table
from .op_parity import OpSite, op_sites, rename_sites

# A protobuf message cannot pass 2 GiB; leave room for the graph itself.
EXTERNAL_DATA_THRESHOLD_BYTES = 2**31 - 2**26
# Folding e.g. Transpose(W) when W has other consumers would store W and W^T: a tied
# embedding/LM-head pair would be untied on disk. Below this size it does not matter.
_SHARED_FOLD_MIN_ELEMENTS = 1024
_MIN_ONNX_VERSION = (1, 21)


class UnsafeExternalDataError(ExportError, ValueError):
    """An external-data location points outside the model's folder (``..``, absolute, symlink)."""


@dataclass
class ExportResult:
    """What ``to_onnx`` wrote, with the figures a report needs."""

    path: Path
    bytes: int  # model file plus external data, on disk
    opset: int
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    initializer_count: int
    initializer_bytes: int
    export_seconds: float
    external_data_path: Path | None = None
    deduplicated_initializers: int = 0  # initializers merged because their content was equal
    # Where each graphopt op's output and activation inputs are in the written file (names
    # as written; None where the ONNX optimizer removed the value): the per-op parity check
    # reads it, so it needs no second export. See graphopt.export.op_parity.
    op_sites: tuple[OpSite, ...] = ()
    # Decoders: whether the runtime may bind one preallocated buffer as past and present
    # (graphopt.export.kv_buffer), and why not where it may not.
    kv_buffer: str = ""
    # Decoders lowered to ORT kernels: residual Adds fused with the RMSNorm after them
    # (graphopt.export.skip_norm).
    skip_norms: int = 0
    # Decoders: where the optional ``logits_to_keep`` input slices the positions before the
    # LM head (graphopt.export.keep_logits), or why it does not.
    logits_to_keep: str = ""


DECODER_METADATA = "graphopt.decoder"  # model metadata key: the DecoderSpec of a decoder step graph


def to_onnx(
    program: Program,
    path: str | os.PathLike,
    *,
    opset: int = 18,
    external_data: bool | str = "auto",
    external_data_name: str | None = None,
    check: bool = True,
    optimize: bool = True,
    custom_translation_table: Mapping[Any, Any] | None = None,
    strip_metadata: bool = False,
    skip_norm: bool = False,
) -> ExportResult:
    """Export ``program`` to ``path`` and return what was written.

    ``external_data``: ``"auto"`` (only when the model would pass the 2 GB protobuf limit),
    ``True`` or ``False``. The data file is ``<model file name>.data`` in the model's folder
    unless ``external_data_name`` names another place inside that folder.
    ``custom_translation_table`` is passed to ``torch.onnx.export`` (custom-op lowerings).
    ``strip_metadata``: drop the exporter's per-node and per-value ``metadata_props`` (stack
    traces, module paths: about 0.85 MB on MiniLM, which matters for a 12 MB clustered or
    int4 file; ORT never reads them). Kept by default, since they map nodes to source.
    ``skip_norm``: a decoder graph on ORT kernels gets each residual Add and the RMSNorm after
    it as one ``SkipSimplifiedLayerNormalization`` (:mod:`graphopt.export.skip_norm`; off by
    default, measured slower there).
    """
    _require_safe_onnx()
    if external_data not in ("auto", True, False):
        raise ConfigError(f"external_data must be 'auto', True or False, got {external_data!r}")
    target = Path(path).absolute()
    if target.is_dir():
        raise ExportError(f"{target} is a folder; give the path of the .onnx file to write")
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    data_name = external_data_name or f"{target.name}.data"
    validate_external_data_location(folder, data_name)  # fail before spending the export time

    start = time.perf_counter()
    onnx_program = _run_exporter(program, opset, custom_translation_table)
    model = onnx_program.model
    sites, deduplicated = finish_graph(program, onnx_program, optimize=optimize, strip_metadata=strip_metadata)
    inputs, output_names = _value_names(model.graph.inputs), _value_names(model.graph.outputs)
    dynamic_axes = dynamic_axis_names(program)
    onnx_program.rename_axes(_axis_rename_mapping(model.graph, dynamic_axes))
    inputs = _rename_inputs(model.graph, onnx_input_names(program))
    kv_buffer, skip_norms, logits_to_keep = "", 0, ""
    if "decoder" in program.meta:  # what a generation runtime needs to drive the cache
        model.metadata_props[DECODER_METADATA] = json.dumps(dict(program.meta["decoder"]))
        kv_buffer = _share_kv_buffer(model, program.meta["decoder"])
        if skip_norm and optimize and "com.microsoft" in model.opset_imports:  # already an ORT graph: its norms may be ORT's too
            from .skip_norm import fuse_skip_rms_norm

            skip_norms = fuse_skip_rms_norm(model)
        logits_to_keep = _keep_last_logits(model)

    initializer_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    use_external = initializer_bytes > EXTERNAL_DATA_THRESHOLD_BYTES if external_data == "auto" else external_data
    written_data = _write_atomically(model, target, data_name if use_external else None, check=check)
    seconds = time.perf_counter() - start

    size = target.stat().st_size + (written_data.stat().st_size if written_data else 0)
    return ExportResult(
        path=target,
        bytes=size,
        opset=opset,
        input_names=inputs,
        output_names=output_names,
        dynamic_axes=dynamic_axes,
        initializer_count=len(model.graph.initializers),
        initializer_bytes=initializer_bytes,
        export_seconds=seconds,
        external_data_path=written_data,
        deduplicated_initializers=deduplicated,
        op_sites=tuple(sites),
        kv_buffer=kv_buffer,
        skip_norms=skip_norms,
        logits_to_keep=logits_to_keep,
    )


def _share_kv_buffer(model: ir.Model, spec_dict: Mapping[str, Any]) -> str:
    from graphopt.decoder import ATTENTION_MASK, INPUT_IDS, DecoderSpec

    from .kv_buffer import SHARED, share_kv_buffer

    spec = DecoderSpec.from_dict(dict(spec_dict))
    shared = share_kv_buffer(model, spec.past_names(), spec.present_names(), mask_name=ATTENTION_MASK, ids_name=INPUT_IDS,
                             window=spec.cache_window is not None)
    if not shared.shared:
        return f"not shared: {shared.reason}"
    return f"{SHARED}; the runtime applies the cache window {spec.cache_window}" if shared.window_to_runtime else SHARED


def _keep_last_logits(model: ir.Model) -> str:
    from .keep_logits import LOGITS_TO_KEEP, keep_last_logits

    kept = keep_last_logits(model)
    return f"{LOGITS_TO_KEEP} slices {kept.sliced!r} ({kept.nodes} nodes after it)" if kept.applied else f"no {LOGITS_TO_KEEP}: {kept.reason}"


# ---- exporting and rewriting the ONNX graph ----------------------------------------------
def finish_graph(program: Program, onnx_program: torch.onnx.ONNXProgram, *, optimize: bool = True, strip_metadata: bool = False) -> tuple[list[OpSite], int]:
    """What ``to_onnx`` does to the exporter's graph before writing it: optimize, store equal
    tensors once, name inputs and outputs after the program's. Returns where the graphopt ops'
    values are under the final names (:mod:`graphopt.export.op_parity`) and how many
    initializers were merged."""
    model = onnx_program.model
    exported = onnx_program.exported_program
    sites = op_sites(program, exported) if exported is not None else []  # under the exporter's names
    aliases: dict[str, ir.Value] = {}
    if optimize:
        _optimize(model)
        aliases = drop_identity_reshapes(model)
    deduplicated = deduplicate_initializers(model)
    if strip_metadata:
        strip_metadata_props(model)
    survivors = {**aliases, **_all_value_names(model.graph)}
    _rename_inputs(model.graph, input_names(program))
    _rename_outputs(model.graph, program.output_names)
    return rename_sites(sites, {old: str(value.name) for old, value in survivors.items()}), deduplicated


def _run_exporter(program: Program, opset: int, custom_translation_table) -> torch.onnx.ONNXProgram:
    # The exporter logs a warning per torchvision op it cannot register (torchvision is not
    # a dependency) and a FutureWarning from torch's own pytree code: noise, not news.
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    previous_level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
            return _export(program, opset, custom_translation_table)
    finally:
        registration_log.setLevel(previous_level)


def _export(program: Program, opset: int, custom_translation_table) -> torch.onnx.ONNXProgram:
    # The exporter traces the module in several phases; a tensor that requires grad can make
    # them disagree. Swin's SDPA mask comes from a Parameter (relative_position_bias_table),
    # and requires_grad switches SDPA's CPU backend (math vs flash), hence its output layout,
    # between phases: "Cannot view a tensor with shape ... and strides ..." after the sdpa
    # pass. Nothing here needs gradients, so every tensor exports without them.
    tensors = [*program.module.parameters(), *program.module.buffers()]
    flags = [t.requires_grad for t in tensors]
    try:
        for tensor in tensors:
            tensor.requires_grad_(False)
        onnx_program = torch.onnx.export(
            program.module,
            tuple(program.args),
            kwargs=dict(program.kwargs) or None,
            dynamic_shapes=program.dynamic_shapes,
            dynamo=True,
            opset_version=opset,
            # We run the optimizer ourselves, with a rule that keeps shared weights shared.
            optimize=False,
            verbose=False,
            custom_translation_table=lowering_table(custom_translation_table) or None,
        )
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        model_class = program.meta.get("model_class", type(program.module).__name__)
        raise ExportError(f"torch.onnx.export failed for {model_class}: {type(exc).__name__}: {first}") from exc
    finally:
        for tensor, flag in zip(tensors, flags):
            tensor.requires_grad_(flag)
    if onnx_program is None:  # only the legacy (dynamo=False) exporter returns None
        raise ExportError("torch.onnx.export returned no ONNXProgram")
    return onnx_program


def _optimize(model: ir.Model) -> None:
    """What torch.onnx's ``optimize=True`` does, except folding shared weights."""
    import onnxscript.optimizer

    onnxscript.optimizer.optimize_ir(model, should_fold=_fold_unless_shared)
    try:
        from onnxscript.rewriter import onnx_fusions
    except ImportError:  # older onnxscript: no fusions, the graph is still valid
        return
    onnx_fusions.fuse(model)


def strip_metadata_props(model: ir.Model) -> int:
    """Remove ``metadata_props`` from every node and value of the model and its functions;
    return how many entries went. The model's own metadata (producer, opsets) stays."""
    removed = 0
    graphs: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
    for graph in graphs:
        for node in ir.traversal.RecursiveGraphIterator(graph) if isinstance(graph, ir.Graph) else graph:
            removed += len(node.metadata_props)
            node.metadata_props.clear()
            for value in node.outputs:
                removed += len(value.metadata_props)
                value.metadata_props.clear()
        for value in (*graph.inputs, *graph.outputs, *getattr(graph, "initializers", {}).values()):
            removed += len(value.metadata_props)
            value.metadata_props.clear()
    return removed


def _fold_unless_shared(node: ir.Node) -> bool | None:
    for value in node.inputs:
        if value is None or not value.is_initializer() or len(value.consumers()) < 2:
            continue
        if value.const_value is not None and value.const_value.size >= _SHARED_FOLD_MIN_ELEMENTS:
            return False
    return None  # onnxscript's default rules


def deduplicate_initializers(model: ir.Model) -> int:
    """Merge main-graph initializers with equal dtype, shape and bytes; return how many went.

    onnx_ir has passes for this, but ``DeduplicateInitializersPass`` skips tensors over 1024
    elements by default and ``DeduplicateHashedInitializersPass`` (onnx-ir 1.1) fails on
    non-contiguous arrays, which the exporter produces (expanded buffers).
    """
    graph = model.graph
    kept: dict[tuple, tuple[ir.Value, ir.TensorProtocol]] = {}  # the value kept, and its tensor
    dropped = 0
    for name, value in tuple(graph.initializers.items()):
        tensor = value.const_value
        if tensor is None or value.is_graph_input() or value.is_graph_output() or tensor.dtype == ir.DataType.STRING:
            continue
        data = tensor.tobytes()
        key = (tensor.dtype, tuple(tensor.shape.numpy()), hashlib.sha256(data).digest())
        keeper = kept.get(key)
        if keeper is None:
            kept[key] = (value, tensor)
            continue
        if keeper[1].tobytes() != data:  # a hash collision: keep both
            continue
        value.replace_all_uses_with(keeper[0])
        graph.initializers.pop(name)
        dropped += 1
    return dropped


# Contrib kernels whose first output has their first input's shape (shape inference does
# not know them): a Reshape chain through them can still be proven an identity.
_SHAPE_OF_FIRST_INPUT = {("com.microsoft", "RotaryEmbedding"), ("com.microsoft", "GroupQueryAttention")}


def _known_shape(value: ir.Value, depth: int = 0) -> tuple[int | str, ...] | None:
    """``value``'s shape with every dimension a number or a named symbol, else None."""
    producer = value.producer()
    if value.shape is None:
        if producer is not None and (producer.domain, producer.op_type) in _SHAPE_OF_FIRST_INPUT and value is producer.outputs[0] and depth < 4:
            first = producer.inputs[0]
            return _known_shape(first, depth + 1) if first is not None else None
        return None
    dims: list[int | str] = []
    for dim in value.shape:
        if isinstance(dim, int):
            dims.append(dim)
        elif getattr(dim, "value", None):
            dims.append(str(dim.value))
        else:
            return None
    return tuple(dims)


def drop_identity_reshapes(model: ir.Model) -> dict[str, ir.Value]:
    """Skip every chain of Reshapes (and Identities) that ends in the shape it started from.

    The exporter writes a view for each ``(batch, seq, heads * dim)`` <-> ``(batch, seq,
    heads, dim)`` change, and the attention lowerings add their own around kernels that take
    the flat layout: a 24-layer decoder ends with about 290 Reshapes, of which ORT's
    optimizer removes none (each a kernel launch per token). Shapes are compared by the
    exporter's symbolic dimensions (torch's own: equal names are equal sizes), so a chain is
    only skipped when it provably changes nothing. Returns the removed values' names with the
    values that replace them (the op-parity sites follow them)."""
    graph = model.graph
    outputs = set(graph.outputs)
    aliases: dict[str, ir.Value] = {}
    for node in list(graph):
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or node.outputs[0] in outputs:
            continue
        out = node.outputs[0]
        want = _known_shape(out)
        if want is None:
            continue
        source, match = node.inputs[0], None
        while source is not None:
            if _known_shape(source) == want:
                match = source
            producer = source.producer()
            if producer is None or producer.op_type not in ("Reshape", "Identity") or producer.domain not in ("", "ai.onnx"):
                break
            source = producer.inputs[0]
        if match is None:
            continue
        if out.name:
            aliases[out.name] = match
        out.replace_all_uses_with(match)
    if aliases:
        ir.passes.common.RemoveUnusedNodesPass()(model)  # the skipped Reshapes and their shape inputs
    return aliases


def _all_value_names(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {v.name: v for v in graph.inputs if v.name}
    values.update(dict(graph.initializers.items()))
    for node in graph:
        values.update({v.name: v for v in node.outputs if v.name})
    return values


def _rename_inputs(graph: ir.Graph, names: list[str]) -> list[str]:
    # Nested inputs (lists, dicts of tensors) flatten to more ONNX inputs than names: keep
    # the exporter's names then.
    if len(names) == len(graph.inputs):
        taken = _all_value_names(graph)
        for value, name in zip(graph.inputs, names):
            _set_name(value, name, taken)
    return _value_names(graph.inputs)


def _rename_outputs(graph: ir.Graph, names: list[str]) -> list[str]:
    if not names:
        return _value_names(graph.outputs)
    if len(names) != len(graph.outputs):
        raise ExportError(
            f"the ONNX graph has {len(graph.outputs)} outputs but the program names {len(names)}: {names}"
        )
    if len(set(names)) != len(names):
        raise ExportError(f"program.output_names has duplicates: {names}")
    clash = set(names) & {v.name for v in graph.inputs}
    if clash:
        raise ExportError(f"output names {sorted(clash)} are also input names; rename the outputs")
    taken = _all_value_names(graph)
    seen: set[int] = set()
    for index, name in enumerate(names):
        value = graph.outputs[index]
        # One ONNX value has one name: an output that is also an input, an initializer or
        # another output gets its own Identity.
        if value.is_graph_input() or value.is_initializer() or id(value) in seen:
            identity = ir.node("Identity", [value])
            graph.append(identity)
            value = identity.outputs[0]
            graph.outputs[index] = value
        seen.add(id(value))
        _set_name(value, name, taken)
    return _value_names(graph.outputs)


def _value_names(values: Iterable[ir.Value]) -> list[str]:
    """The names of graph inputs or outputs, which a graph always gives its values."""
    names: list[str] = []
    for value in values:
        if value.name is None:
            raise ExportError(f"the ONNX graph has an unnamed input or output: {value!r}")
        names.append(value.name)
    return names


def _set_name(value: ir.Value, name: str, taken: dict[str, ir.Value]) -> None:
    if value.name == name:
        return
    holder = taken.get(name)
    if holder is not None and holder is not value:
        suffix = 1
        while f"{name}_{suffix}" in taken:
            suffix += 1
        holder.name = f"{name}_{suffix}"
        taken[holder.name] = holder
    if value.name is not None:
        taken.pop(value.name, None)
    value.name = name
    taken[name] = value


# ---- dynamic axes ------------------------------------------------------------------------


def _axis_rename_mapping(graph: ir.Graph, axes: dict[str, dict[int, str]]) -> dict[str | ir.SymbolicDim, str]:
    mapping: dict[str | ir.SymbolicDim, str] = {}
    for value in graph.inputs:
        if value.shape is None or value.name is None:
            continue
        for axis, new_name in axes.get(value.name, {}).items():
            if axis >= len(value.shape):
                continue
            dim = value.shape[axis]
            if isinstance(dim, ir.SymbolicDim) and isinstance(dim.value, str):
                mapping.setdefault(dim.value, new_name)
    return mapping


# ---- writing -----------------------------------------------------------------------------


def _write_atomically(model: ir.Model, target: Path, data_name: str | None, *, check: bool) -> Path | None:
    """Stage model (+ data) in a temp folder beside ``target``, check, then move into place.

    The data file is moved before the model file, the commit point, so a new model only
    appears complete and beside its data. Two renames are not one atomic step: when an older
    model that uses the same data file is replaced, it sits beside the new data between them.
    """
    folder = target.parent
    previous_data = referenced_external_files(target) if target.is_file() else set()
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder))
    try:
        staged_model = staging / target.name
        _save_model(model, staged_model, data_name)
        if check:
            check_model_file(staged_model)
        data_path = None
        if data_name is not None:
            data_path = validate_external_data_location(folder, data_name)
            data_path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / data_name, data_path)
        os.replace(staged_model, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    # Only our own naming convention is cleaned up: another model may share other files.
    ours = validate_external_data_location(folder, f"{target.name}.data").resolve()
    if ours in previous_data and (data_path is None or data_path.resolve() != ours):
        ours.unlink(missing_ok=True)
    return data_path


def _save_model(model: ir.Model, path: Path, data_name: str | None) -> None:
    ir.save(model, path, external_data=data_name)


def check_model_file(path: str | os.PathLike) -> None:
    """``onnx.checker`` full check on a file (works past 2 GB, with external data)."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"the ONNX checker rejected the exported model: {type(exc).__name__}: {exc}") from exc


# ---- external data safety ----------------------------------------------------------------


def validate_external_data_location(folder: str | os.PathLike, location: str) -> Path:
    """The path of ``location`` inside ``folder``; raise if it could escape the folder.

    Refused: empty names, absolute paths (POSIX or Windows), any ``..`` component, and a
    symlink anywhere between the folder and the file.
    """
    if not isinstance(location, str) or not location.strip() or "\x00" in location:
        raise UnsafeExternalDataError(f"invalid external data location {location!r}")
    windows = PureWindowsPath(location)
    if PurePosixPath(location).is_absolute() or windows.is_absolute() or windows.drive or location.startswith("\\"):
        raise UnsafeExternalDataError(f"external data location {location!r} is absolute; it must be relative to {folder}")
    parts = [p for p in re.split(r"[\\/]", location) if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeExternalDataError(f"external data location {location!r} contains '..'; it must stay inside {folder}")
    if not parts:
        raise UnsafeExternalDataError(f"external data location {location!r} names no file")
    base = Path(folder).resolve()
    candidate = base
    for part in parts:
        candidate = candidate / part
        if candidate.is_symlink():
            raise UnsafeExternalDataError(f"external data location {location!r} goes through a symlink: {candidate}")
    if not candidate.resolve().is_relative_to(base):
        raise UnsafeExternalDataError(f"external data location {location!r} resolves outside {base}")
    return candidate


def external_data_locations(model: onnx.ModelProto) -> list[str]:
    """The ``location`` of every tensor stored as external data, in graphs and functions."""
    locations = []
    for tensor in _all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {entry.key: entry.value for entry in tensor.external_data}
            locations.append(entries.get("location", ""))
    return locations


def validate_model_external_data(path: str | os.PathLike, proto: onnx.ModelProto | None = None) -> list[Path]:
    """Check every external-data location of the model at ``path`` before anything loads it
    (``proto``: that model, already loaded without its external data)."""
    path = Path(path)
    proto = proto if proto is not None else onnx.load(str(path), load_external_data=False)
    return [validate_external_data_location(path.parent, loc) for loc in dict.fromkeys(external_data_locations(proto))]


def referenced_external_files(path: Path) -> set[Path]:
    try:
        return {p.resolve() for p in validate_model_external_data(path)}
    except Exception:  # noqa: BLE001 - an unreadable or unsafe old model: touch none of its files
        return set()


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices
        for sparse in attr.sparse_tensors:
            yield sparse.values
            yield sparse.indices
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for graph in attr.graphs:
            yield from _graph_tensors(graph)


def _require_safe_onnx() -> None:
    version = tuple(int(x) for x in re.findall(r"\d+", onnx.__version__)[:2])
    if version < _MIN_ONNX_VERSION:
        raise ExportError(
            f"onnx {onnx.__version__} is installed; graphopt needs onnx >= 1.21 "
            "(earlier releases have external-data path-traversal CVEs)"
        )

"""Op-by-op ONNX Runtime parity of graphopt's custom ops, on ORT's own activations.

Why: a program that quantizes activations at run time cannot match ORT element by element
end to end (an ulp of difference upstream flips a rounding, later layers spread it), so an
end-to-end gate loose enough for that noise cannot see one wrong scale in 37 layers. Each op
is therefore checked where it stands: its ORT output against ``torch.ops.graphopt.<op>``
called on the activations ORT fed it (no rounding propagates from upstream) and on the
*program's* stored tensors (a corrupted or renamed initializer shows), ``max |ort - ref| /
max |ref| <= OP_RTOL``; a NaN or inf where the reference has a number fails. Feeding the
program's own activations instead breaks 1e-5 (1-ulp input moves flip quantization codes).

Between the ops the *chain* is checked: the program runs in PyTorch with each op's output
replaced by ORT's, and each op's activation inputs and the graph outputs are compared with
ORT's, ``max rel <= CHAIN_RTOL``. What lies between two graphopt ops is fp32 ATen code (no
rounding to a grid), so this holds every standard lowering, and anything added to the graph
(a Mul, a Where), to a tight tolerance while the ops' rounding never accumulates.

Measured (MiniLM, ORT 1.32 CPU, 1 thread, example + 2 random + padded sets): per op,
linear_dynamic_int8 and embedding_int8/_nbits bit-exact, attention_int8 <= 5.2e-7,
bias_gelu <= 3.8e-7, attention_qkv_biased (fp32) <= 1.7e-6, linear_nbits <= 1.3e-6 except
where an activation code sits on a rounding boundary (int4 with int8 compute: 1 to 6 of
21888 codes in 1 to 3 of its 37 linears per input set, up to 6e-4, each within 0.98 of its
flip bound: see :func:`flip_allowance`); the chain <= 3.0e-7 (int8, int4) and 7.7e-7 (fp32).
On OpenVINO 2026.4 (CPU, f32 hint), linear_static_int8 (openvino-int8 MiniLM, 4 input sets):
18 ops flip codes up to 2.2e-3, every one within its flip bound; OpenVINO rounds
x / scale + zero_point, so a code is ambiguous relative to that sum (:func:`_static_int8_bound`).
Faults: one weight scale 2 % off in one of 37 linears, 2.0e-2 at that op (int8 and int4; the
end-to-end floor does not see it on every set), the int8 embedding lowering 2 % off, 2.0e-2
at the three embeddings (end to end blind: LayerNorm cancels it); ORT's output x1.5 or NaN at
padded positions: invisible op by op, 0.5 and non-finite along the chain.

Mapping: the program's fx names never reach ONNX (the exporter re-exports program.module,
which renames nodes). ONNX value names follow the re-exported graph: an op's output value is
named after its node there, its activation inputs after that node's arguments; the node's
``meta["from_node"]`` leads back to the program node (the NodeSource whose graph_id is the
program graph's). ``to_onnx`` records the sites under the names of the written file
(``ExportResult.op_sites``); :func:`sites_by_export` re-runs the exporter for a file that
comes without them. Node metadata_props are not used (strip_metadata removes them).

Unobservable ops: the ONNX optimizer removes some op boundaries (int4 MiniLM: the outputs of
fused_attention_biased go when Transpose pairs cancel). Such an op is reported as
unobservable, never skipped silently; in the chain its output is its reference on ORT's
inputs, so the next observed value (the next op's input, a graph output) checks it within
its segment.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch import fx

from graphopt.program import Program

# Each op on ORT's inputs: what an exact pass may move the outputs by (graphopt.verify).
OP_RTOL = 1e-5
# The chain: fp32 code run by two runtimes from the same inputs; parity's own default rtol,
# 130x what was measured.
CHAIN_RTOL = 1e-4
# Models above this size are observed through a temporary file with external data.
_IN_MEMORY_BYTES = 2**30


@dataclass(frozen=True)
class OpArg:
    """One argument of an op: ``value`` (an activation: its ONNX name, None where the ONNX
    graph does not hold it), ``tensor`` (stored in the program) or ``literal``."""

    kind: str
    name: str | None = None


@dataclass(frozen=True)
class OpSite:
    """A graphopt op of the program and where its values are in the ONNX model."""

    node: str  # the program's fx node name
    op: str  # torch.ops.graphopt.<op>
    output: str | None  # ONNX name of its output; None where the ONNX optimizer removed it
    args: tuple[OpArg, ...] = ()
    kwargs: tuple[tuple[str, OpArg], ...] = ()
    note: str = ""

    def values(self) -> list[str]:
        refs = [*self.args, *(ref for _, ref in self.kwargs)]
        return [n for n in [self.output, *(r.name for r in refs if r.kind == "value")] if n]


@dataclass
class OpCheck:
    """One op over every input set: the worst figures and where they were seen."""

    node: str
    op: str
    output: str | None
    max_rel: float = 0.0  # ORT output vs the reference on ORT's inputs (nan: not observable)
    max_abs: float = 0.0
    input_rel: float = 0.0  # the chain's activation inputs vs ORT's
    worst_input_set: str = ""
    observable: bool = True
    note: str = ""
    problems: list[str] = field(default_factory=list)
    input_sets: int = 0  # how many input sets ran it

    @property
    def passed(self) -> bool:
        return not self.problems


def is_graphopt_op(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "namespace", None) == "graphopt"


def op_name(node: fx.Node) -> str:
    target: Any = node.target
    return target.name().split("::")[-1].split(".")[0]


# ---- where the ops are -----------------------------------------------------------------------
def op_sites(program: Program, exported: torch.export.ExportedProgram) -> list[OpSite]:
    """The program's graphopt ops with the ONNX names the exporter gives their values
    (``exported``: ``onnx_program.exported_program`` of the same export)."""
    ours = [n for n in program.graph.nodes if is_graphopt_op(n)]
    if not ours:
        return []
    theirs = [n for n in exported.graph.nodes if is_graphopt_op(n)]
    by_source: dict[str, fx.Node] = {}
    for node in theirs:
        for name in _source_names(node, id(program.graph)):
            by_source.setdefault(name, node)
    same_order = len(ours) == len(theirs)
    sites = []
    for index, node in enumerate(ours):
        if isinstance(node.meta.get("val"), (tuple, list)):  # e.g. gqa_attention's (out, present_k, present_v)
            sites.append(OpSite(node.name, op_name(node), None, note="of a multi-output op is not mapped to one ONNX value"))
            continue
        match = by_source.get(node.name) or (theirs[index] if same_order else None)
        if match is None or match.target != node.target:
            sites.append(OpSite(node.name, op_name(node), None, note="not found in the exported graph"))
            continue
        args = tuple(_arg(ours_, theirs_) for ours_, theirs_ in zip(node.args, match.args))
        kwargs = tuple((key, _arg(value, match.kwargs.get(key))) for key, value in node.kwargs.items())
        sites.append(OpSite(node.name, op_name(node), match.name, args, kwargs))
    return sites


def _source_names(node: fx.Node, graph_id: int) -> list[str]:
    """Names of the program nodes ``node`` came from: NodeSources of the program's graph,
    else the roots of its provenance."""
    ours, roots = [], []

    def walk(sources) -> None:
        for source in sources or ():
            if source.graph_id == graph_id:
                ours.append(source.name)
            if source.from_node:
                walk(source.from_node)
            else:
                roots.append(source.name)

    walk(node.meta.get("from_node"))
    return ours or roots


def _arg(ours: Any, theirs: Any) -> OpArg:
    if isinstance(ours, fx.Node) and ours.op == "get_attr":
        return OpArg("tensor", str(ours.target))
    if isinstance(ours, fx.Node):
        return OpArg("value", theirs.name if isinstance(theirs, fx.Node) else None)
    if any(isinstance(leaf, fx.Node) for leaf in torch.utils._pytree.tree_leaves(ours)):
        return OpArg("value", None)  # a list of activations: taken from the chain
    return OpArg("literal")


def rename_sites(sites: Sequence[OpSite], names: Mapping[str, str]) -> list[OpSite]:
    """Sites under the model's final names (``names``: exporter name -> final name; a name
    not in it is a value the ONNX optimizer removed)."""

    def ref(arg: OpArg) -> OpArg:
        return replace(arg, name=names.get(arg.name)) if arg.kind == "value" and arg.name else arg

    return [
        replace(s, output=names.get(s.output) if s.output else None, args=tuple(ref(a) for a in s.args), kwargs=tuple((k, ref(a)) for k, a in s.kwargs))
        for s in sites
    ]


def sites_by_export(program: Program, opset: int = 18, custom_translation_table: Mapping | None = None, optimize: bool = True) -> list[OpSite]:
    """The sites of the model ``to_onnx`` writes for ``program`` with these settings, found by
    exporting it again (the exporter's names are deterministic); costs one export."""
    from .onnx_export import _run_exporter, finish_graph

    if not any(is_graphopt_op(n) for n in program.graph.nodes):
        return []
    sites, _ = finish_graph(program, _run_exporter(program, opset, custom_translation_table), optimize=optimize)
    return sites


# ---- observing the values ---------------------------------------------------------------------
def load_model(source: str | os.PathLike | bytes) -> ir.Model:
    """The model at ``source`` (a path, or serialized bytes) as an onnx_ir model."""
    if isinstance(source, (bytes, bytearray)):
        return ir.from_proto(onnx.load_from_string(bytes(source)))
    return ir.load(os.fspath(source))


class Observation:
    """A copy of ``model`` whose sites' values are graph outputs too, in one ORT session
    opened by ``open_session`` (path or bytes -> session: the deployed settings)."""

    def __init__(self, model: ir.Model, sites: Sequence[OpSite], open_session: Callable[[str | bytes], Any]):
        graph = model.graph
        values = _values(graph)
        self.sites = list(sites)
        self.outputs = [str(v.name) for v in graph.outputs]
        self.constants: dict[str, np.ndarray] = {}
        self.missing: set[str] = set()
        exposed = {id(v) for v in graph.outputs}
        for name in dict.fromkeys(n for s in sites for n in s.values()):
            value = values.get(name)
            if value is None:
                self.missing.add(name)
            elif value.is_initializer() and value.const_value is not None:
                self.constants[name] = value.const_value.numpy()
            elif not value.is_graph_input() and id(value) not in exposed:
                graph.outputs.append(value)
                exposed.add(id(value))
        self.names = [str(v.name) for v in graph.outputs]
        tensors = [v.const_value for v in graph.initializers.values() if v.const_value is not None]
        if sum(t.nbytes for t in tensors) > _IN_MEMORY_BYTES or any(isinstance(t, ir.ExternalTensor) for t in tensors):
            # Serialized bytes can hold neither 2 GB nor a reference to the model's data file.
            self._folder = tempfile.TemporaryDirectory(prefix="graphopt-observed-")
            path = Path(self._folder.name) / "observed.onnx"
            ir.save(model, path, external_data="observed.onnx.data")
            self.session = open_session(str(path))
        else:
            self.session = open_session(ir.to_proto(model).SerializeToString())

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every observed value by name (graph inputs from ``feed``, constants from the model)."""
        fetched = dict(zip(self.names, self.session.run(None, dict(feed))))
        fetched.update({name: value for name, value in feed.items() if name not in fetched})
        fetched.update(self.constants)
        return fetched


def _values(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {v.name: v for v in graph.inputs if v.name}
    values.update(graph.initializers)
    for node in graph:
        values.update({v.name: v for v in node.outputs if v.name})
    return values


# ---- checking ----------------------------------------------------------------------------------
def relative_error(reference: np.ndarray, got: np.ndarray) -> tuple[float, float, str]:
    """``(max |got - ref| / max |ref|, max |got - ref|, problem)`` over the finite positions;
    a shape or non-finite mismatch is a problem (and inf)."""
    if reference.shape != got.shape:
        return math.inf, math.inf, f"shape {got.shape} from ONNX Runtime, {reference.shape} from PyTorch"
    ref, out = reference.astype(np.float64), got.astype(np.float64)
    finite = np.isfinite(ref)
    bad = (finite & ~np.isfinite(out)) | (~finite & ~((ref == out) | (np.isnan(ref) & np.isnan(out))))
    if bad.any():
        return math.inf, math.inf, f"{int(bad.sum())} NaN/inf values where the reference has {'numbers' if finite[bad].all() else 'other values'}"
    if not finite.any():
        return 0.0, 0.0, ""
    diff = np.abs(ref[finite] - out[finite]).max()
    scale = np.abs(ref[finite]).max()
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
    return float(rel), float(diff), ""


@dataclass
class SetRecord:
    """One op on one input set."""

    rel: float  # nan: output not observable
    max_abs: float
    input_rel: float
    problem: str = ""
    flips: str = ""  # how rounding flips explain a rel above OP_RTOL (see flip_allowance)


class Chain(fx.Interpreter):
    """Runs the program with each observed op output replaced by ORT's; checks every op on
    ORT's inputs and compares the chain's activations with ORT's on the way."""

    def __init__(self, program: Program, sites: Sequence[OpSite], fetched: Mapping[str, np.ndarray]):
        super().__init__(program.module)
        self.sites = {s.node: s for s in sites}
        self.fetched = fetched
        self.records: dict[str, SetRecord] = {}

    def run_node(self, n: fx.Node) -> Any:
        site = self.sites.get(n.name)
        if site is None:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        seen: list[tuple[float, str]] = []
        ort_args = [self._ort(ref, value, seen) for ref, value in zip(site.args, args)] + list(args[len(site.args):])
        keyed = dict(site.kwargs)
        ort_kwargs = {k: self._ort(keyed[k], v, seen) if k in keyed else v for k, v in kwargs.items()}
        target: Any = n.target
        with torch.no_grad():
            reference = target(*ort_args, **ort_kwargs)
        input_rel = max((rel for rel, _ in seen), default=0.0)
        problem = "; ".join(p for _, p in seen if p)
        got = self.fetched.get(site.output) if site.output else None
        if got is None:
            self.records[n.name] = SetRecord(math.nan, math.nan, input_rel, problem)
            return reference
        ref = reference.detach().numpy()
        rel, diff, mismatch = relative_error(ref, got)
        flips = flip_allowance(site.op, ort_args, ort_kwargs, ref, got) if math.isfinite(rel) and rel > OP_RTOL else ""
        self.records[n.name] = SetRecord(rel, diff, input_rel, "; ".join(p for p in (mismatch, problem) if p), flips)
        return torch.from_numpy(np.array(got)).to(reference.dtype)

    def _ort(self, ref: OpArg, chain_value: Any, seen: list[tuple[float, str]]) -> Any:
        if ref.kind != "value" or ref.name is None or ref.name not in self.fetched or not isinstance(chain_value, torch.Tensor):
            return chain_value
        ort_value = np.array(self.fetched[ref.name])
        rel, _, problem = relative_error(chain_value.detach().numpy(), ort_value)
        seen.append((rel, f"input '{ref.name}': {problem}" if problem else ""))
        return torch.from_numpy(ort_value).to(chain_value.dtype)


# ---- rounding flips of run-time-quantized ops ---------------------------------------------------
# An activation code is ambiguous when its quotient x / scale lies this close (relative) to a
# .5 rounding boundary: ORT may compute the scale or the quotient some ulps differently
# (2**-20 is 8 ulps of fp32), and then rounds the other way. A flipped code moves output
# element n by scale * |w[k, n]| * w_scale[n]; the bound is the sum over ambiguous codes.
FLIP_TOLERANCE = 2.0**-20
# At most this share of an op's activation codes (or MIN_AMBIGUOUS of them, for one-row
# inputs such as a pooler's) may be ambiguous: more would excuse too much.
MAX_AMBIGUOUS_FRACTION = 1e-3
MIN_AMBIGUOUS = 2


def _ambiguous(quotient: torch.Tensor, magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """1 where ``quotient`` lies within fp32 rounding of a .5 boundary, the rounding error being
    relative to ``magnitude`` (default: the quotient itself)."""
    frac = quotient - torch.floor(quotient)
    size = (quotient if magnitude is None else magnitude).abs().clamp(min=1.0)
    return ((frac - 0.5).abs() <= FLIP_TOLERANCE * size).double()


Bound = tuple[torch.Tensor, torch.Tensor]  # per output element; the ambiguous codes (0/1)


def _dynamic_int8_bound(x, w_q, w_scale, *rest) -> Bound:
    from graphopt.quant.ops import dynamic_quant_params

    scale, _ = dynamic_quant_params(x)
    ambiguous = _ambiguous(x.double() / scale.double())
    bound = (ambiguous @ w_q.double().abs()) * scale.double() * w_scale.double()
    return bound, ambiguous


def _static_int8_bound(x, x_scale, x_zero_point, w_q, w_scale, w_zero_point, *rest) -> Bound:
    # A runtime may add the zero point before rounding (OpenVINO's FakeQuantize does), so the
    # quotient it rounds is x / scale + zero_point and its fp32 error is relative to that.
    scale = x_scale.double()
    quotient = x.double() / scale
    ambiguous = _ambiguous(quotient, quotient + x_zero_point.double())
    bound = (ambiguous @ (w_q.double() - w_zero_point.double()).abs()) * scale * w_scale.double()
    return bound, ambiguous


def _nbits_bound(x, w_packed, scales, zero_points, bias, K, N, bits, block_size, accuracy_level) -> Bound | None:
    if accuracy_level != 4:  # fp32 compute: no activation rounding
        return None
    from graphopt.quant.packing import unpack_nbits, unpack_zero_points

    codes = unpack_nbits(w_packed, bits, K)
    blocks = codes.shape[1] // block_size
    centered = codes.reshape(N, blocks, block_size) - unpack_zero_points(zero_points, bits, blocks).reshape(N, blocks, 1)
    a = torch.nn.functional.pad(x.double().reshape(-1, K), (0, blocks * block_size - K)).reshape(-1, blocks, block_size)
    a_scale = a.abs().amax(dim=-1, keepdim=True) / 127.0
    ambiguous = _ambiguous(torch.where(a_scale == 0, torch.zeros_like(a), a / a_scale.clamp(min=1e-300)))
    per_block = torch.einsum("mbk,nbk->mnb", ambiguous, centered.double().abs())
    bound = (per_block * a_scale.squeeze(-1)[:, None, :] * scales.double().reshape(N, blocks)[None]).sum(-1)
    return bound.reshape(*x.shape[:-1], N), ambiguous


FLIP_BOUNDS: dict[str, Callable[..., Bound | None]] = {
    "linear_dynamic_int8": _dynamic_int8_bound, "linear_static_int8": _static_int8_bound, "linear_nbits": _nbits_bound}


def flip_allowance(op: str, args: Sequence[Any], kwargs: Mapping[str, Any], reference: np.ndarray, got: np.ndarray) -> str:
    """Why a run-time-quantized op's ORT output may exceed OP_RTOL and still be right: every
    element within the flip bound of its ambiguous activation codes (plus OP_RTOL max |ref|),
    and at most MAX_AMBIGUOUS_FRACTION of the codes ambiguous. '' when that does not hold."""
    bound_of = FLIP_BOUNDS.get(op)
    found = bound_of(*args, **kwargs) if bound_of is not None else None
    if found is None:
        return ""
    bound, ambiguous = found
    diff = torch.from_numpy(np.abs(reference.astype(np.float64) - got.astype(np.float64)))
    worst = float((diff / (bound + OP_RTOL * float(np.abs(reference).max()))).max())
    count = int(ambiguous.sum())
    if count > max(MAX_AMBIGUOUS_FRACTION * ambiguous.numel(), MIN_AMBIGUOUS) or worst > 1.0:
        return ""
    return f"rounding flips: {count} of {ambiguous.numel()} activation codes sit on a rounding boundary; every element within their flip bound (worst {worst:.2f}x)"


def flat_inputs(program: Program, args: tuple, kwargs: Mapping[str, Any]) -> list[Any]:
    """The program's inputs in its graph's placeholder order."""
    spec = getattr(program.module, "_in_spec", None)
    if spec is not None:
        return list(torch.fx._pytree.tree_flatten_spec((tuple(args), dict(kwargs)), spec))
    import inspect

    bound = inspect.signature(program.module.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return list(bound.arguments.values())


def run_chain(program: Program, sites: Sequence[OpSite], fetched: Mapping[str, np.ndarray], args: tuple, kwargs: Mapping[str, Any]) -> tuple[Chain, list[torch.Tensor]]:
    """One input set through the chain: the interpreter (with its per-op records) and the
    chain's flattened outputs."""
    chain = Chain(program, sites, fetched)
    with torch.no_grad():
        out = chain.run(*flat_inputs(program, args, kwargs), enable_io_processing=False)
    leaves = torch.utils._pytree.tree_leaves(out)
    return chain, [t for t in leaves if isinstance(t, torch.Tensor)]


def new_checks(program: Program, sites: Sequence[OpSite], missing: Collection[str] = frozenset()) -> dict[str, OpCheck]:
    """One check per graphopt op of the program; those whose output the model does not hold
    (or that no site names) are unobservable: checked within their segment of the chain."""
    checks = {}
    for site in sites:
        check = OpCheck(site.node, site.op, site.output, note=site.note)
        if site.output is None or site.output in missing:
            check.observable, check.max_rel, check.max_abs = False, math.nan, math.nan
            why = site.note or ("removed by the ONNX optimizer" if site.output is None else f"'{site.output}' is not in the model")
            check.note = f"output {why}: checked within its segment of the chain"
        checks[site.node] = check
    for node in program.graph.nodes:
        if is_graphopt_op(node) and node.name not in checks:
            checks[node.name] = OpCheck(node.name, op_name(node), None, math.nan, math.nan, observable=False,
                                        note="no ONNX site names it (sites of another export?): checked within its segment of the chain")
    return checks


def finish_checks(checks: Mapping[str, OpCheck]) -> None:
    """A site that no input set ran names no node of this program: say so, never pass it."""
    for check in checks.values():
        if check.input_sets == 0 and check.observable:
            check.problems.append("no node of the program has this name: the sites describe another program")


def record(checks: Mapping[str, OpCheck], chain: Chain, label: str) -> None:
    """Fold one input set's chain records into the per-op checks (worst figures kept)."""
    for node, rec in chain.records.items():
        check = checks[node]
        check.input_sets += 1
        if rec.problem:
            check.problems.append(f"{label}: {rec.problem}")
        check.input_rel = max(check.input_rel, rec.input_rel)
        if rec.input_rel > CHAIN_RTOL:
            check.problems.append(f"{label}: its activation inputs differ from the chain's by max rel {rec.input_rel:.3e} > {CHAIN_RTOL:g}")
        if not check.observable or math.isnan(rec.rel):
            continue
        if rec.rel > check.max_rel or not check.worst_input_set:
            check.max_rel, check.max_abs, check.worst_input_set = rec.rel, rec.max_abs, label
        if rec.flips:
            check.note = f"{label}: {rec.flips}"
        elif rec.rel > OP_RTOL:
            check.problems.append(f"{label}: max rel {rec.rel:.3e} > {OP_RTOL:g} against torch.ops.graphopt.{check.op} on ORT's inputs")

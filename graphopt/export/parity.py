"""Parity: ONNX Runtime against the PyTorch program and the original model, on the session
settings that are deployed.

Three checks, each on every input set (the example; seeded random sets over the declared
dynamic axes, right-padded; a padded set with left padding and a padding run longer than
most attention windows, so that query rows that see no key at all occur; user sets):

1. **End to end, against the optimized program** (``program.run``): export must not move
   the numbers, whatever the passes did. ORT must be finite wherever the program is (padding
   included). A program without run-time quantization is held element by element to
   ``atol + rtol |ref|``. A program that quantizes activations at run time cannot be (an ulp
   of difference upstream flips a rounding and later layers spread it), so it is held to its
   *rounding floor*: the relative L2 distance (real positions) between ORT and the program
   must stay within ``FLOOR_FACTOR`` x max(floor, ``FP32_FLOOR``), the floor being the
   largest relative L2 distance of the program from copies whose quantized ops' activation
   inputs moved by ``FLOOR_NUDGE`` x their largest magnitude (seeded random signs): the size
   of ORT's own fp32 disagreement with PyTorch at those inputs (up to 8e-7 of the largest
   value; the chain measures it). A few ulps per element instead undershoot on the small
   elements: such floors were bimodal, and ORT, flipping a code where they did not, reached
   2955 floors on the balanced preset. The floor is the size of the rounding noise once one
   code flips (int8 MiniLM: 0.10 to 0.16), so it is loose where ORT flips nothing (2.4e-7)
   and tight where it does (up to 0.72 floors, 0.11): that is the nature of end-to-end
   parity under run-time quantization, and why check 2 exists. A norm test adds nothing:
   the relative L2 distance bounds |norm ratio - 1|.
2. **Op by op and along the chain** (:mod:`graphopt.export.op_parity`): every graphopt op on
   ORT's own input activations at 1e-5, and the program run with the ops' outputs forced to
   ORT's, compared with ORT at each op's inputs and at the outputs. This is what holds a
   quantized program tightly: end to end is blind to one scale 2 % off in 37 layers.
3. **Against the original model** (``original``). Exact pipelines (``original_max_rel``, the
   exact tolerance): max |ort - orig| / max |orig| over every position within that tolerance
   plus ORT's own deviation from the program on the same set (the two add; the second is
   held by check 1). Lossy pipelines (``original_min_cosine``, the budget's): ORT finite
   wherever the original is, on every set and position; the budget's cosine on the real
   positions of the example inputs. On the random sets the cosine is reported, not gated:
   random token ids lie off the data the budget holds on (MiniLM int8's own cosine to the
   original there is 0.987, int4's 0.953, under budgets met on text).

Measured on MiniLM (ORT 1.32 CPU, 1 thread; relative L2 on real positions; the example,
random (1, 7), (3, 19), (4, 32), (2, 64), (1, 5), (2, 9) and the padded set):
- int8 dynamic (37 quantized linears): floors 0.10 to 0.16. ORT 9e-8 to 3.8e-7 where nothing
  flips; where a code flips (one flip decorrelates the rounding noise downstream) 1.2e-2 to
  1.1e-1, at most 0.72 floors.
- int4 weight-only with int8 compute: floors 1.8e-2 to 3.6e-2, ORT 0.47 to 0.96 floors.
- balanced (int8 with 3 int8 weight-only linears): floors 7.9e-2 to 1.5e-1, ORT <= 0.92 floors.
  Hence FLOOR_FACTOR = 2. FP32_FLOOR = 1e-5 is for programs whose rounding cannot cascade
  (ORT's fp32 noise: <= 3.8e-7).
- Faults: ORT's output x1.5 is 0.50 (int8: > 2 floors on every set, 2 floors being <= 0.32;
  int4: 14 floors or more), the chain sees 0.5; NaN at padded positions: non-finite where the
  program is finite, on every set (and along the chain); one linear's weight scale x1.02 and
  the int8 embedding lowering x1.02 stay within the floor end to end (LayerNorm even cancels
  the second): only op by op are they seen, 2.0e-2 each.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import fx

from graphopt.errors import ConfigError, ParityError
from graphopt.inputs import (
    named_inputs,
    onnx_feed_names,
    padded_inputs,
    random_inputs,
    split_inputs,
)
from graphopt.program import Program
from graphopt.verify import decoder_unread, drift, real_positions, settle

from . import op_parity
from .op_parity import OpCheck
from .session import _as_numpy, make_session, run

DEFAULT_RANDOM_SHAPES = ((1, 7), (3, 19))
# graphopt ops that round activations while the model runs (see the module doc); static int8
# rounds with a calibrated scale, but an ulp upstream flips its codes all the same.
RUNTIME_QUANTIZED_OPS = ("linear_dynamic_int8", "attention_int8", "linear_nbits", "linear_static_int8", "attention_static_int8")
FLOOR_NUDGE = 1e-6
FLOOR_SAMPLES = 4
FLOOR_FACTOR = 2.0
FP32_FLOOR = 1e-5


@dataclass
class OutputParity:
    """One output on one input set, against the program (or the original model)."""

    input_set: str
    input_shapes: dict[str, tuple[int, ...]]
    output: str
    max_abs: float
    max_rel: float  # |ort - torch| / max(|torch|, atol): near-zero references count against atol
    cosine: float
    tolerance_ratio: float  # max |ort - torch| / (atol + rtol |torch|)
    passed: bool
    note: str = ""
    rounding_floor: float | None = None  # run-time-quantized programs: relative L2 floor (real positions)
    rel_l2: float | None = None  # ||ort - torch|| / ||torch||, real positions
    chain_rel: float | None = None  # programs with graphopt ops: ORT against the chain, max rel
    scaled_rel: float | None = None  # max |ort - torch| / max |torch| (the exact tolerance's measure)
    reference: str = "program"  # or "original"

    def describe(self) -> str:
        shapes = ", ".join(f"{name} {tuple(shape)}" for name, shape in self.input_shapes.items())
        text = (f"output '{self.output}' on {self.input_set} ({shapes}) against the {self.reference}: max abs {self.max_abs:.3e}, "
                f"max rel {self.max_rel:.3e}, cosine {self.cosine:.6f}, {self.tolerance_ratio:.3g}x the tolerance")
        return f"{text}; {self.note}" if self.note else text


@dataclass
class ParityReport:
    atol: float
    rtol: float
    results: list[OutputParity] = field(default_factory=list)  # against the optimized program
    original: list[OutputParity] = field(default_factory=list)  # against the original model
    ops: list[OpCheck] = field(default_factory=list)  # per graphopt op, worst over the input sets
    session: dict[str, Any] = field(default_factory=dict)  # the settings every ORT run used
    input_sets: list[str] = field(default_factory=list)
    quantized: bool = False  # the program rounds activations at run time
    problems: list[str] = field(default_factory=list)  # checks that could not run

    @property
    def passed(self) -> bool:
        return not self.problems and all(r.passed for r in [*self.results, *self.original]) and all(c.passed for c in self.ops)

    @property
    def failures(self) -> list[OutputParity]:
        return [r for r in [*self.results, *self.original] if not r.passed]

    @property
    def op_failures(self) -> list[OpCheck]:
        return [c for c in self.ops if not c.passed]

    @property
    def unobservable(self) -> list[OpCheck]:
        return [c for c in self.ops if not c.observable]

    @property
    def worst(self) -> OutputParity | None:
        return max(self.results, key=lambda r: r.tolerance_ratio, default=None)

    def to_dict(self) -> dict:
        return {"passed": self.passed, **dict(asdict(self).items())}

    def summary(self) -> dict[str, Any]:
        """What the build report's ``parity`` section shows."""
        per_op: dict[str, dict[str, Any]] = {}
        for check in self.ops:
            entry = per_op.setdefault(check.op, {"count": 0, "max_rel": None, "unobservable": 0, "failed": 0, "rounding_flips": 0})
            entry["count"] += 1
            entry["unobservable"] += not check.observable
            entry["failed"] += not check.passed
            entry["rounding_flips"] += "rounding flips" in check.note
            if check.observable:
                entry["max_rel"] = max(entry["max_rel"] or 0.0, check.max_rel)
        figures = {"max_rel_l2": _worst(r.rel_l2 for r in self.results), "max_chain_rel": _worst(r.chain_rel for r in self.results),
                   "max_rounding_floor": _worst(r.rounding_floor for r in self.results), "worst": self.worst.describe() if self.worst else ""}
        original = {"passed": all(r.passed for r in self.original), "worst_rel_l2": _worst(r.rel_l2 for r in self.original),
                    "worst_scaled_rel": _worst(r.scaled_rel for r in self.original), "notes": sorted({r.note for r in self.original if not r.passed})[:5]} if self.original else None
        return {"passed": self.passed, "atol": self.atol, "rtol": self.rtol, "session": self.session, "input_sets": self.input_sets,
                "quantized_at_run_time": self.quantized, **figures, "ops": per_op, "op_tolerance": op_parity.OP_RTOL, "chain_tolerance": op_parity.CHAIN_RTOL,
                "unobservable": [f"{c.node} ({c.op}): {c.note}" for c in self.unobservable], "original": original,
                "failures": [r.describe() for r in self.failures][:10] + [f"{c.node} ({c.op}): {'; '.join(c.problems[:3])}" for c in self.op_failures][:10] + self.problems}

    def table(self) -> str:
        rows = ["| against | input set | output | max abs | max rel | rel L2 | floor | chain | ok |", "|---|---|---|---|---|---|---|---|---|"]
        for r in [*self.results, *self.original]:
            cells = [_fmt(r.rel_l2), _fmt(r.rounding_floor), _fmt(r.chain_rel)]
            rows.append(f"| {r.reference} | {r.input_set} | {r.output} | {r.max_abs:.3e} | {r.max_rel:.3e} | {' | '.join(cells)} | {'yes' if r.passed else 'NO'} |")
        return "\n".join(rows)

    def failure_message(self) -> str:
        lines = [f"ONNX Runtime differs from the PyTorch program beyond atol={self.atol:g}, rtol={self.rtol:g} (or its rounding floor):"]
        lines += [f"  {r.describe()}" for r in self.failures]
        lines += [f"  op {c.node} (torch.ops.graphopt.{c.op}, ONNX value '{c.output}'): {'; '.join(c.problems[:3])}" for c in self.op_failures]
        lines += [f"  {p}" for p in self.problems]
        lines += ["all results:", self.table()]
        return "\n".join(lines)


def _worst(values) -> float | None:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return max(finite, default=None)


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2e}"


def check_parity(
    program: Program,
    onnx_path_or_session: str | os.PathLike | ort.InferenceSession,
    *,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    provider: str = "cpu",
    threads: int | None = None,
    inter_threads: int | None = None,
    graph_optimization: str = "all",
    disabled_optimizers: str | Sequence[str] | None = None,
    original: Program | None = None,
    original_max_rel: float | None = None,
    original_min_cosine: float | None = None,
    op_sites: Sequence[op_parity.OpSite] | None = None,
    extra_inputs: Sequence[Mapping[str, Any] | tuple[tuple, dict]] | None = None,
    random_shapes: Sequence[tuple[int, int] | Mapping[str, int]] = DEFAULT_RANDOM_SHAPES,
    seed: int = 0,
    raise_on_failure: bool = True,
) -> ParityReport:
    """Compare ONNX Runtime with ``program.run`` (and ``original``) and raise ``ParityError``
    past tolerance.

    The session settings (``provider``, ``threads``, ``inter_threads``, ``graph_optimization``,
    ``disabled_optimizers``: :func:`make_session`'s) are those the model is deployed with:
    every ORT run of the check uses them. Given a session instead of a path, pass the
    settings it was made with (they open the per-op observation session).
    ``op_sites``: ``ExportResult.op_sites`` of the file (default: found by exporting the
    program again, when it holds graphopt ops). ``original``: compared with
    ``original_max_rel`` (exact: max rel over every position), else ``original_min_cosine``
    (lossy: finiteness and cosine on real positions), else atol/rtol.
    Input sets: the example; one random set per ``random_shapes`` entry (a ``(batch, seq)``
    pair or a mapping from axis name to size); the padded set; ``extra_inputs`` (mappings
    from input name to value, or ``(args, kwargs)``). Seeded.
    """
    if atol < 0 or rtol < 0:
        raise ConfigError(f"tolerances must be >= 0, got atol={atol}, rtol={rtol}")
    settings = {"provider": provider, "threads": threads, "inter_threads": inter_threads, "graph_optimization": graph_optimization,
                "disabled_optimizers": disabled_optimizers}
    shipped, source = _session(onnx_path_or_session, settings)
    sets = input_sets(program, random_shapes, seed, extra_inputs)
    quantized = quantizes_at_run_time(program)
    report = ParityReport(atol=atol, rtol=rtol, session={**settings, "providers": shipped.get_providers()}, input_sets=[s[0] for s in sets],
                          quantized=quantized)
    observation, checks = _observation(program, source, op_sites, settings, report)
    original_mode = _original_mode(original, original_max_rel, original_min_cosine)
    for label, args, kwargs in sets:
        named = onnx_feed_names(program, named_inputs(program, args, kwargs))
        feed = _feed(shipped, named, label)
        raw = run(shipped, feed)
        expected = [t.detach().cpu().numpy() for t in program.run(args, kwargs)]
        names = [o.name for o in shipped.get_outputs()]
        if len(raw) != len(expected):
            raise ParityError(f"on {label}: ONNX Runtime returned {len(raw)} outputs {names}, the program {len(expected)}")
        # a decoder step's padding logits and padding cache slots are read by nothing
        unread = decoder_unread(kwargs, [torch.from_numpy(e) for e in expected]) if "decoder" in program.meta else [None] * len(expected)
        got = [_settled(ref, out, mask) for ref, out, mask in zip(expected, raw, unread)]
        shapes = {name: tuple(v.shape) for name, v in named.items() if isinstance(v, torch.Tensor)}
        real = real_positions(kwargs)
        floors = _floors(program, args, kwargs, expected, real, seed) if quantized else [None] * len(expected)
        results = [_against_program(label, shapes, name, ref, out, atol, rtol, floor, real) for name, ref, out, floor in zip(names, expected, got, floors)]
        if observation is not None:
            _check_chain(program, observation, checks, results, got, feed, args, kwargs, label, quantized, unread)
        report.results += results
        if original is not None:
            reference = [t.detach().cpu().numpy() for t in original.run(args, kwargs)]
            # settled against the original's own values: a fused kernel's padding rows may differ from both
            report.original += [_against_original(label, shapes, name, ref, _settled(ref, out, mask), real, original_mode, atol, rtol, mine)
                                for name, ref, out, mask, mine in zip(names, reference, raw, unread, results)]
    op_parity.finish_checks(checks)
    report.ops = list(checks.values())
    if raise_on_failure and not report.passed:
        raise ParityError(report.failure_message())
    return report


def quantizes_at_run_time(program: Program) -> bool:
    """Whether the program holds an op that rounds activations while it runs."""
    return any(op_parity.is_graphopt_op(n) and op_parity.op_name(n) in RUNTIME_QUANTIZED_OPS for n in program.graph.nodes)


# ---- sessions and the per-op observation ---------------------------------------------------------
def _session(path_or_session: Any, settings: Mapping[str, Any]) -> tuple[ort.InferenceSession, str | bytes | None]:
    """The session to check and where its model is (None: unknown)."""
    if isinstance(path_or_session, ort.InferenceSession):
        # ORT keeps what the session was made from; the per-op check needs the model itself.
        source = getattr(path_or_session, "_model_path", None) or getattr(path_or_session, "_model_bytes", None)
        return path_or_session, source
    return make_session(path_or_session, **settings), os.fspath(path_or_session)


def _observation(program, source, sites, settings, report: ParityReport):
    has_ops = any(op_parity.is_graphopt_op(n) for n in program.graph.nodes)
    if not has_ops:
        return None, {}
    if source is None:
        report.problems.append("the per-op check could not run: the session does not say which model it runs; pass the model's path")
        return None, {}
    if sites is None:
        sites = op_parity.sites_by_export(program)
    model = op_parity.load_model(source)
    observation = op_parity.Observation(model, sites, lambda src: make_session(src, **settings))
    return observation, op_parity.new_checks(program, sites, observation.missing)


def _check_chain(program, observation, checks, results, got, feed, args, kwargs, label, quantized, unread) -> None:
    """The per-op checks of one input set, and the chain's outputs against ORT's."""
    fetched = observation.run(feed)
    chain, outputs = op_parity.run_chain(program, observation.sites, fetched, args, kwargs)
    op_parity.record(checks, chain, label)
    for result, shipped, name, mine, mask in zip(results, got, observation.outputs, outputs, unread):
        mine = mine.detach()
        observed = _settled(mine.numpy(), fetched[name], mask)
        shipped = _settled(mine.numpy(), shipped, mask)
        result.chain_rel, _, problem = op_parity.relative_error(mine.numpy(), observed)
        if problem or result.chain_rel > op_parity.CHAIN_RTOL:
            result.passed = False
            result.note = _join(result.note, f"the chain (the program with each graphopt op's output forced to ORT's) differs from ORT: "
                                             f"{problem or f'max rel {result.chain_rel:.3e} > {op_parity.CHAIN_RTOL:g}'}")
        if not np.array_equal(observed, shipped, equal_nan=True):
            moved, _, problem = op_parity.relative_error(shipped, observed)
            result.note = _join(result.note, f"exposing the ops' values changed ORT's output by max rel {moved:.2e} {problem}".rstrip())
            if not quantized and (problem or moved > op_parity.CHAIN_RTOL):  # a flipped rounding could explain it only with quantization
                result.passed = False


def _feed(session, named: Mapping[str, Any], label: str) -> dict[str, np.ndarray]:
    declared = {i.name: i.type for i in session.get_inputs()}
    missing = [name for name in declared if name not in named]
    if missing:
        raise ParityError(f"the ONNX model takes inputs {missing} that input set {label} does not provide ({list(named)})")
    return {name: _as_numpy(named[name], kind) for name, kind in declared.items()}


# ---- comparisons --------------------------------------------------------------------------------
def _settled(ref: np.ndarray, out: np.ndarray, unread: torch.Tensor | None) -> np.ndarray:
    """:func:`graphopt.verify.settle` on arrays: ``out`` with the values no later step reads
    taken from ``ref`` where they are finite."""
    if unread is None or ref.shape != out.shape:
        return out
    return settle(torch.from_numpy(ref), torch.from_numpy(out), unread).numpy()


def _against_program(label, shapes, name, ref, out, atol, rtol, floor, real) -> OutputParity:
    result = _compare_arrays(label, shapes, name, ref, out, atol, rtol)
    if floor is None or not np.issubdtype(ref.dtype, np.floating) or ref.shape != out.shape:
        result.rel_l2 = _rel_l2(ref, out, real) if ref.shape == out.shape and np.issubdtype(ref.dtype, np.floating) else None
        return result
    result.rounding_floor = floor
    result.rel_l2 = _rel_l2(ref, out, real)
    allowed = FLOOR_FACTOR * max(floor, FP32_FLOOR)
    nonfinite = _nonfinite_where_finite(ref, out)
    if nonfinite:
        result.passed, result.note = False, nonfinite
    elif result.rel_l2 > allowed:
        result.passed = False
        result.note = f"beyond the rounding floor of run-time activation quantization: relative L2 {result.rel_l2:.2e} > {FLOOR_FACTOR:g} x max({floor:.2e}, {FP32_FLOOR:g})"
    else:
        result.passed = True
        result.note = f"within the rounding floor of run-time activation quantization: relative L2 {result.rel_l2:.2e} <= {FLOOR_FACTOR:g} x max({floor:.2e}, {FP32_FLOOR:g})"
    return result


def _original_mode(original, max_rel, min_cosine) -> tuple[str, float | None]:
    if original is None:
        return ("", None)
    if max_rel is not None:
        return ("exact", max_rel)
    if min_cosine is not None:
        return ("cosine", min_cosine)
    return ("atol/rtol", None)


def _against_original(label, shapes, name, ref, out, real, mode, atol, rtol, program_result: OutputParity) -> OutputParity:
    """ORT against the original model's output (see the module doc, 3.)."""
    kind, bound = mode
    result = _compare_arrays(label, shapes, name, ref, out, atol, rtol)
    result.reference = "original"
    if kind == "atol/rtol" or ref.shape != out.shape or not np.issubdtype(ref.dtype, np.floating):
        return result
    result.rel_l2 = _rel_l2(ref, out, real)
    if kind == "exact":
        # |ort - original| <= |ort - program| + |program - original|: ORT's own deviation (held
        # by the first check) adds to what the exact passes may move.
        own = program_result.scaled_rel if program_result.passed and program_result.scaled_rel is not None else 0.0
        allowed = bound + own
        result.passed = result.scaled_rel is not None and result.scaled_rel <= allowed
        result.note = result.note or f"max rel {result.scaled_rel:.2e} {'<=' if result.passed else '>'} {allowed:.2e}: the exact tolerance {bound:.2e} + ORT's own {own:.2e} (every position)"
        return result
    nonfinite = _nonfinite_where_finite(ref, out)
    cosine = drift((torch.from_numpy(ref),), (torch.from_numpy(out),), real).cosine if not nonfinite else -1.0
    gated = label == "example"
    result.passed = not nonfinite and (cosine >= bound or not gated)
    result.note = nonfinite or (f"cosine {cosine:.6f} on real positions {'>=' if result.passed else '<'} the budget's {bound}" if gated else
                                f"cosine {cosine:.6f} on real positions (figure only: random inputs lie off the data the budget holds on)")
    return result


def _compare_arrays(label, shapes, name, ref: np.ndarray, out: np.ndarray, atol, rtol) -> OutputParity:
    def result(max_abs, max_rel, cosine, ratio, passed, note=""):
        return OutputParity(label, shapes, name, float(max_abs), float(max_rel), float(cosine), float(ratio), passed, note)

    if ref.shape != out.shape:
        return result(np.inf, np.inf, 0.0, np.inf, False, f"shape {out.shape} from ONNX Runtime, {ref.shape} from PyTorch")
    if ref.size == 0:
        return result(0.0, 0.0, 1.0, 0.0, True)
    scaled, _, problem = op_parity.relative_error(ref, out)
    r, o = ref.astype(np.float64), out.astype(np.float64)
    diff = np.abs(r - o)
    diff[np.isnan(r) & np.isnan(o)] = 0.0
    diff[np.isinf(r) & (r == o)] = 0.0
    diff[np.isnan(diff)] = np.inf  # NaN on one side only
    exact = not (np.issubdtype(ref.dtype, np.floating) or np.issubdtype(ref.dtype, np.complexfloating))
    allowed = np.zeros_like(r) if exact else atol + rtol * np.abs(np.nan_to_num(r))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(diff == 0, 0.0, diff / allowed)
        rel = diff / np.maximum(np.abs(np.nan_to_num(r)), max(atol, np.finfo(np.float64).tiny))
    compared = result(diff.max(), rel.max(), _cosine(r, o), ratio.max(), bool((diff <= allowed).all()), problem)
    compared.scaled_rel = scaled
    return compared


def _nonfinite_where_finite(ref: np.ndarray, out: np.ndarray) -> str:
    bad = np.isfinite(ref) & ~np.isfinite(out)
    return f"{int(bad.sum())} NaN/inf values where the program has numbers (padding included)" if bad.any() else ""


def _rel_l2(ref: np.ndarray, out: np.ndarray, real: torch.Tensor | None) -> float:
    """||out - ref|| / ||ref|| over the real positions (every position without a mask)."""
    r, o = ref.astype(np.float64), out.astype(np.float64)
    if real is not None and r.ndim >= 2 and tuple(r.shape[:2]) == tuple(real.shape):
        r, o = r[real.numpy()], o[real.numpy()]
    if not np.isfinite(o[np.isfinite(r)]).all():
        return math.inf
    finite = np.isfinite(r)
    norm = np.linalg.norm(r[finite])
    gap = np.linalg.norm(o[finite] - r[finite])
    return float(gap / norm) if norm > 0 else (0.0 if gap == 0 else math.inf)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.nan_to_num(a.ravel(), nan=0.0, posinf=0.0, neginf=0.0)
    b = np.nan_to_num(b.ravel(), nan=0.0, posinf=0.0, neginf=0.0)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a, b) / (na * nb))


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


# ---- the rounding floor ------------------------------------------------------------------------
class _Nudged(fx.Interpreter):
    """The program with every run-time-quantized op's activation input moved by
    FLOOR_NUDGE x its largest magnitude, each element up or down at random (seeded)."""

    def __init__(self, module: fx.GraphModule, seed: int):
        super().__init__(module)
        self.generator = torch.Generator().manual_seed(seed)

    def run_node(self, n: fx.Node) -> Any:
        if not (op_parity.is_graphopt_op(n) and op_parity.op_name(n) in RUNTIME_QUANTIZED_OPS):
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        x = args[0]
        signs = torch.randint(0, 2, x.shape, generator=self.generator).to(x.dtype) * 2 - 1
        target: Any = n.target
        return target(x + signs * (FLOOR_NUDGE * x.abs().max()), *args[1:], **kwargs)


def _floors(program, args, kwargs, expected, real, seed) -> list[float | None]:
    """Per output: the largest relative L2 distance (real positions) of the program from its
    nudged copies."""
    floors: list[float | None] = [0.0 if np.issubdtype(e.dtype, np.floating) else None for e in expected]
    inputs = op_parity.flat_inputs(program, args, kwargs)
    for sample in range(FLOOR_SAMPLES):
        with torch.no_grad():
            out = _Nudged(program.module, seed + sample).run(*inputs, enable_io_processing=False)
        moved = [t.detach().numpy() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        for index, (ref, other) in enumerate(zip(expected, moved)):
            floor = floors[index]
            if floor is not None and ref.shape == other.shape:
                floors[index] = max(floor, _rel_l2(ref, other, real))
    return floors


# ---- input sets ----------------------------------------------------------------------------------
def input_sets(program: Program, random_shapes=DEFAULT_RANDOM_SHAPES, seed: int = 0, extra_inputs=None) -> list[tuple[str, tuple, dict]]:
    """The example, one random set per shape, the padded set (where the program has a padding
    mask) and the user's sets, each as ``(label, args, kwargs)``."""
    sets = [("example", tuple(program.args), dict(program.kwargs))]
    if "decoder" in program.meta:
        # A decoder's inputs must agree with each other (mask = past + new tokens, positions,
        # the cache the prompt built): a short generation run instead of random sets.
        from graphopt.decoder import decoder_spec, decoder_steps

        sets += [(label, (), kwargs) for label, kwargs in decoder_steps(decoder_spec(program), program, seed=seed)]
        sets += [(f"extra[{index}]", *split_inputs(program, extra)) for index, extra in enumerate(extra_inputs or ())]
        return sets
    for index, shape in enumerate(random_shapes):
        sizes = dict(shape) if isinstance(shape, Mapping) else dict(zip(("batch", "seq"), shape))
        generator = torch.Generator().manual_seed(seed + index)
        label = "random[" + ",".join(f"{k}={v}" for k, v in sizes.items()) + "]"
        sets.append((label, *random_inputs(program, sizes, generator)))
    padded = padded_inputs(program, seed)
    if padded is not None:
        sets.append(padded)
    for index, extra in enumerate(extra_inputs or ()):
        sets.append((f"extra[{index}]", *split_inputs(program, extra)))
    return sets


__all__ = ["DEFAULT_RANDOM_SHAPES", "OutputParity", "ParityReport", "check_parity", "input_sets", "padded_inputs", "quantizes_at_run_time", "random_inputs"]

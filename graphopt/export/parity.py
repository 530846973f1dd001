"""Parity: ONNX Runtime against the PyTorch program, on the example and on other shapes.

The reference is ``program.run`` (the optimized program, not the original model): export
must not move the numbers, whatever the passes did. Random inputs are derived from the
example inputs and change only the axes the program declares dynamic, so the check covers
the shapes a user will send and not only the one the graph was traced with.

A program that quantizes activations at run time (dynamic int8, MatMulNBits with int8
compute) cannot match another runtime element by element: fp32 kernels (a MatMul kept in
fp32, LayerNorm) differ between ORT and PyTorch by an ulp or two, a value on the other side
of a rounding boundary becomes a whole quantization step, and later layers spread it. For
such a program each input set also measures the program's *rounding floor*: the largest
``1 - cosine`` (over the positions the attention mask marks as real) between the program
and copies of it whose fp32 tensors moved by ``FLOOR_PERTURBATION`` (relative). An output
that misses atol/rtol passes when its own ``1 - cosine`` to ORT is within ``FLOOR_FACTOR``
floors; both figures are in the report. Measured on MiniLM: floors of 2e-3 to 8e-3 for int8
plans (2e-4 for int4 weight-only), ORT at 0.2–1.1 floors. What this level cannot see: one
weight scale 5 % off in one of 37 layers lands at 1.4–1.6 floors; such errors are for the
per-op lowering tests (tests/test_quantize.py), which hold every op to 1e-5.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import onnxruntime as ort
import torch

from graphopt.errors import ConfigError, ParityError
from graphopt.program import Program
from graphopt.verify import drift, real_positions

from .onnx_export import dynamic_axis_names, positional_names
from .session import make_session, run

DEFAULT_RANDOM_SHAPES = ((1, 7), (3, 19))
# graphopt ops that round activations while the model runs (see the module doc).
RUNTIME_QUANTIZED_OPS = ("linear_dynamic_int8", "attention_int8", "linear_nbits")
FLOOR_PERTURBATION = 2.0**-20  # relative move of every fp32 tensor: a few ulp
FLOOR_SAMPLES = 4
# ORT's deviation is one more draw of the same rounding noise, so it lands above the largest
# of a few perturbed copies now and then: allow twice the floor.
FLOOR_FACTOR = 2.0


@dataclass
class OutputParity:
    """One output on one input set."""

    input_set: str
    input_shapes: dict[str, tuple[int, ...]]
    output: str
    max_abs: float
    max_rel: float  # |ort - torch| / max(|torch|, atol): near-zero references count against atol
    cosine: float
    tolerance_ratio: float  # max |ort - torch| / (atol + rtol |torch|); passes when <= 1 (or within the rounding floor)
    passed: bool
    note: str = ""
    # Programs that quantize activations at run time: the largest 1 - cosine (real positions)
    # of the program against its ulp-perturbed copies; None otherwise.
    rounding_floor: float | None = None

    def describe(self) -> str:
        shapes = ", ".join(f"{name} {tuple(shape)}" for name, shape in self.input_shapes.items())
        text = (
            f"output '{self.output}' on {self.input_set} ({shapes}): max abs {self.max_abs:.3e}, "
            f"max rel {self.max_rel:.3e}, cosine {self.cosine:.6f}, {self.tolerance_ratio:.3g}x the tolerance"
        )
        return f"{text}; {self.note}" if self.note else text


@dataclass
class ParityReport:
    atol: float
    rtol: float
    results: list[OutputParity] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> list[OutputParity]:
        return [r for r in self.results if not r.passed]

    @property
    def worst(self) -> OutputParity | None:
        return max(self.results, key=lambda r: r.tolerance_ratio, default=None)

    def to_dict(self) -> dict:
        return {"atol": self.atol, "rtol": self.rtol, "passed": self.passed, "results": [asdict(r) for r in self.results]}

    def table(self) -> str:
        rows = ["| input set | output | max abs | max rel | cosine | x tolerance | rounding floor | ok |", "|---|---|---|---|---|---|---|---|"]
        for r in self.results:
            floor = "–" if r.rounding_floor is None else f"{r.rounding_floor:.2e}"
            rows.append(
                f"| {r.input_set} | {r.output} | {r.max_abs:.3e} | {r.max_rel:.3e} | {r.cosine:.6f} | "
                f"{r.tolerance_ratio:.3g} | {floor} | {'yes' if r.passed else 'NO'} |"
            )
        return "\n".join(rows)

    def failure_message(self) -> str:
        lines = [f"ONNX Runtime differs from the PyTorch program beyond atol={self.atol:g}, rtol={self.rtol:g}:"]
        lines += [f"  {r.describe()}" for r in self.failures]
        lines += ["all results:", self.table()]
        return "\n".join(lines)


def check_parity(
    program: Program,
    onnx_path_or_session: str | os.PathLike | ort.InferenceSession,
    *,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    extra_inputs: Sequence[Mapping[str, Any] | tuple[tuple, dict]] | None = None,
    random_shapes: Sequence[tuple[int, int] | Mapping[str, int]] = DEFAULT_RANDOM_SHAPES,
    seed: int = 0,
    raise_on_failure: bool = True,
) -> ParityReport:
    """Compare ONNX Runtime with ``program.run`` and raise ``ParityError`` past tolerance.

    Input sets: the example inputs; one random set per ``random_shapes`` entry, a
    ``(batch, seq)`` pair or a mapping from axis name to size; and ``extra_inputs``, each a
    mapping from input name to value or an ``(args, kwargs)`` pair. Seeded: the same
    arguments give the same inputs.
    """
    if atol < 0 or rtol < 0:
        raise ConfigError(f"tolerances must be >= 0, got atol={atol}, rtol={rtol}")
    session = onnx_path_or_session if isinstance(onnx_path_or_session, ort.InferenceSession) else make_session(onnx_path_or_session)
    input_sets = [("example", tuple(program.args), dict(program.kwargs))]
    for index, shape in enumerate(random_shapes):
        sizes = dict(shape) if isinstance(shape, Mapping) else dict(zip(("batch", "seq"), shape))
        generator = torch.Generator().manual_seed(seed + index)
        label = "random[" + ",".join(f"{k}={v}" for k, v in sizes.items()) + "]"
        input_sets.append((label, *random_inputs(program, sizes, generator)))
    for index, extra in enumerate(extra_inputs or ()):
        input_sets.append((f"extra[{index}]", *_split_inputs(program, extra)))

    report = ParityReport(atol=atol, rtol=rtol)
    perturbed = [_perturbed(program, seed + i) for i in range(FLOOR_SAMPLES)] if quantizes_at_run_time(program) else []
    for label, args, kwargs in input_sets:
        report.results.extend(_compare_one(program, session, label, args, kwargs, atol, rtol, perturbed))
    if raise_on_failure and not report.passed:
        raise ParityError(report.failure_message())
    return report


def quantizes_at_run_time(program: Program) -> bool:
    """Whether the program holds an op that rounds activations while it runs."""
    for node in program.graph.nodes:
        target = node.target
        if node.op == "call_function" and getattr(target, "namespace", None) == "graphopt":
            if target.name().split("::")[-1].split(".")[0] in RUNTIME_QUANTIZED_OPS:
                return True
    return False


def _perturbed(program: Program, seed: int) -> Program:
    """A copy whose floating-point tensors each moved by +-FLOOR_PERTURBATION (relative)."""
    copy = program.clone()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in copy.tensors().values():
            if tensor.is_floating_point():
                signs = torch.randint(0, 2, tensor.shape, generator=generator).to(tensor.dtype) * 2 - 1
                tensor.mul_(1 + FLOOR_PERTURBATION * signs)
    return copy


def _one_minus_cosine(a: np.ndarray, b: np.ndarray, real: torch.Tensor | None) -> float:
    """``1 - cosine`` of two outputs on the real positions, as the pass manager's budget sees it."""
    return 1.0 - drift((torch.from_numpy(b),), (torch.from_numpy(a),), real).cosine


def _compare_one(program, session, label, args, kwargs, atol, rtol, perturbed: Sequence[Program] = ()) -> list[OutputParity]:
    named = _named(program, args, kwargs)
    shapes = {name: tuple(v.shape) for name, v in named.items() if isinstance(v, torch.Tensor)}
    declared = [i.name for i in session.get_inputs()]
    missing = [name for name in declared if name not in named]
    if missing:
        raise ParityError(f"the ONNX model takes inputs {missing} that input set {label} does not provide ({list(named)})")
    expected = [t.detach().cpu().numpy() for t in program.run(args, kwargs)]
    got = run(session, {name: named[name] for name in declared})
    names = [o.name for o in session.get_outputs()]
    if len(got) != len(expected):
        raise ParityError(f"on {label}: ONNX Runtime returned {len(got)} outputs {names}, the program {len(expected)}")
    results = [_compare_arrays(label, shapes, name, ref, out, atol, rtol) for name, ref, out in zip(names, expected, got)]
    if perturbed:
        real = real_positions(kwargs)
        moved = [[t.detach().cpu().numpy() for t in copy.run(args, kwargs)] for copy in perturbed]
        for index, (result, ref, out) in enumerate(zip(results, expected, got)):
            if not np.issubdtype(ref.dtype, np.floating) or ref.shape != out.shape:
                continue
            floor = max(_one_minus_cosine(run_[index], ref, real) for run_ in moved)
            result.rounding_floor = floor
            if not result.passed:
                drift = _one_minus_cosine(out, ref, real)
                if drift <= FLOOR_FACTOR * floor:
                    result.passed = True
                    result.note = f"within the rounding floor of run-time activation quantization: 1 - cosine {drift:.2e} <= {FLOOR_FACTOR:g} x {floor:.2e}"
                else:
                    result.note = f"beyond the rounding floor of run-time activation quantization: 1 - cosine {drift:.2e} > {FLOOR_FACTOR:g} x {floor:.2e}"
    return results


def _compare_arrays(label, shapes, name, ref: np.ndarray, out: np.ndarray, atol, rtol) -> OutputParity:
    def result(max_abs, max_rel, cosine, ratio, passed, note=""):
        return OutputParity(label, shapes, name, float(max_abs), float(max_rel), float(cosine), float(ratio), passed, note)

    if ref.shape != out.shape:
        return result(np.inf, np.inf, 0.0, np.inf, False, f"shape {out.shape} from ONNX Runtime, {ref.shape} from PyTorch")
    if ref.size == 0:
        return result(0.0, 0.0, 1.0, 0.0, True)
    r = ref.astype(np.float64)
    o = out.astype(np.float64)
    diff = np.abs(r - o)
    both_nan = np.isnan(r) & np.isnan(o)
    diff[both_nan] = 0.0
    diff[np.isnan(diff)] = np.inf  # NaN on one side only
    exact = not (np.issubdtype(ref.dtype, np.floating) or np.issubdtype(ref.dtype, np.complexfloating))
    allowed = np.zeros_like(r) if exact else atol + rtol * np.abs(np.nan_to_num(r))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(diff == 0, 0.0, diff / allowed)
        rel = diff / np.maximum(np.abs(np.nan_to_num(r)), max(atol, np.finfo(np.float64).tiny))
    return result(diff.max(), rel.max(), _cosine(r, o), ratio.max(), bool((diff <= allowed).all()))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.nan_to_num(a.ravel(), nan=0.0, posinf=0.0, neginf=0.0)
    b = np.nan_to_num(b.ravel(), nan=0.0, posinf=0.0, neginf=0.0)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a, b) / (na * nb))


# ---- inputs ------------------------------------------------------------------------------


def random_inputs(program: Program, sizes: Mapping[str, int], generator: torch.Generator) -> tuple[tuple, dict]:
    """Inputs like the example's, with each dynamic axis named in ``sizes`` resized.

    Token ids stay within the example's range, ``position_ids`` count up, attention masks
    get right padding (at least one real token per row), floats follow the example's mean
    and spread.
    """
    axes = dynamic_axis_names(program)
    named = {}
    for name, value in _named(program, program.args, program.kwargs).items():
        if not isinstance(value, torch.Tensor):
            named[name] = value
            continue
        shape = list(value.shape)
        for axis, axis_name in axes.get(name, {}).items():
            if axis_name in sizes:
                shape[axis] = int(sizes[axis_name])
        named[name] = _random_like(name, value, shape, generator)
    return _split_inputs(program, named)


def _random_like(name: str, example: torch.Tensor, shape: list[int], generator: torch.Generator) -> torch.Tensor:
    lowered = name.lower()
    if "mask" in lowered and len(shape) == 2 and _is_binary(example):
        return _padding_mask(shape, generator).to(example.dtype)
    if example.dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    if example.is_floating_point():
        mean, std = 0.0, 1.0
        if example.numel() > 1:
            mean, std = example.float().mean().item(), example.float().std().item()
            std = std if np.isfinite(std) and std > 0 else 1.0
        return (torch.randn(shape, generator=generator) * std + mean).to(example.dtype)
    if lowered == "position_ids" and len(shape) == 2:
        return torch.arange(shape[1]).expand(shape).to(example.dtype).contiguous()
    low = int(example.min()) if example.numel() else 0
    high = int(example.max()) if example.numel() else 1
    return torch.randint(low, high + 1, shape, generator=generator).to(example.dtype)


def _is_binary(t: torch.Tensor) -> bool:
    return t.dtype == torch.bool or bool(((t == 0) | (t == 1)).all())


def _padding_mask(shape: list[int], generator: torch.Generator) -> torch.Tensor:
    batch, seq = shape
    mask = torch.zeros(shape, dtype=torch.int64)
    for row in range(batch):
        if seq <= 1 or (row == 0 and batch > 1):
            length = seq  # keep one full row so the longest sequence is exercised
        else:
            length = int(torch.randint(1, seq, (1,), generator=generator))
        mask[row, :length] = 1
    return mask


def _named(program: Program, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    names = positional_names(program)
    names += [f"arg{i}" for i in range(len(names), len(args))]
    named = dict(zip(names, args))
    named.update(kwargs)
    return named


def _split_inputs(program: Program, inputs: Mapping[str, Any] | tuple) -> tuple[tuple, dict]:
    """An input set given by name (or as (args, kwargs)) -> (args, kwargs) for the program."""
    if isinstance(inputs, tuple):
        if len(inputs) != 2:
            raise ConfigError("an input set given as a tuple must be (args, kwargs)")
        return tuple(inputs[0]), dict(inputs[1])
    positional = positional_names(program)
    missing = [name for name in positional if name not in inputs]
    if missing:
        raise ConfigError(f"input set lacks positional inputs {missing}")
    args = tuple(inputs[name] for name in positional)
    kwargs = {name: value for name, value in inputs.items() if name not in positional}
    return args, kwargs

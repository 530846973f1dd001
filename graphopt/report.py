"""The build report: per-pass figures, export, gates; JSON and Markdown."""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class ProgramStats:
    nodes: int
    parameters: int
    parameter_bytes: int
    flops: int | None = None

    @classmethod
    def of(cls, program, *, flops: bool = True) -> ProgramStats:
        stats = program.parameter_stats()
        return cls(
            nodes=program.node_count(),
            parameters=stats["parameters"],
            parameter_bytes=stats["parameter_bytes"],
            flops=count_flops(program) if flops else None,
        )


def count_flops(program) -> int | None:
    """FLOPs of one run on the example inputs, as torch's flop counter sees them.

    graphopt's own ops (``graphopt::*``: quantized linears, fused attention, ...) are opaque to
    the counter, which would read 0 for them, so a quantized or fused program would seem to do
    no work. Each is counted by what its eager reference computes (see :func:`_own_op_formulas`).
    """
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False, custom_mapping=_own_op_formulas()) as counter:
            program.run()
        return int(counter.get_total_flops())
    except Exception:  # noqa: BLE001 - FLOPs are informative; never fail a build on them
        return None


def _own_op_formulas() -> dict:
    """A flop formula for CPU SDPA and for every registered ``graphopt::`` custom op: the FLOPs its eager
    reference performs, counted on meta copies of its inputs (shapes only, no compute) and on
    the real inputs where the reference needs values (a data-dependent shape, ``.item()``)."""
    from torch._library.custom_ops import OPDEFS  # the registry torch.library.custom_op fills
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    # torch counts SDPA's CUDA kernels but not the CPU one it dispatches to here
    formulas: dict = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _raw(lambda q, k, v, *_, **__: sdpa_flop_count(q.shape, k.shape, v.shape))}

    def counted(reference):
        def formula(*args, out_val=None, **kwargs) -> int:
            for inputs in (_on_meta(args, kwargs), (args, kwargs)):
                try:
                    with FlopCounterMode(display=False, custom_mapping=formulas) as inner:
                        reference(*inputs[0], **inputs[1])
                    return int(inner.get_total_flops())
                except Exception:  # noqa: BLE001 - meta could not run it: count on the real inputs
                    continue
            return 0

        return _raw(formula)

    def linear(out_features):
        # 2 * rows * K * N: the references pad K to whole blocks or split it into exact pieces,
        # which is how they compute, not the work of the kernel they stand for
        return _raw(lambda x, *args, **kwargs: 2 * x.numel() * int(out_features(args)))

    linears = {
        "linear_dynamic_int8": linear(lambda args: args[0].shape[1]),  # w_q [K, N]
        "linear_static_int8": linear(lambda args: args[2].shape[1]),  # x_scale, x_zero_point, w_q [K, N]
        "linear_nbits": linear(lambda args: args[5]),  # w_packed, scales, zero_points, bias, K, N
    }
    for qualname, opdef in OPDEFS.items():
        namespace, name = qualname.split("::", 1)
        if namespace == "graphopt":
            formulas[getattr(torch.ops.graphopt, name)] = linears.get(name) or counted(opdef._init_fn)
    return formulas


def _raw(formula):
    """Mark a flop formula as taking the op's own arguments (torch otherwise passes shapes)."""
    formula._get_raw = True
    return formula


def _on_meta(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def meta(value):
        return value.to("meta") if isinstance(value, torch.Tensor) else value

    return torch.utils._pytree.tree_map(meta, args), torch.utils._pytree.tree_map(meta, kwargs)


@dataclass
class PassRecord:
    name: str
    text: str
    exact: bool
    status: str  # applied | unchanged | skipped | rolled-back
    optional: bool = False  # the recipe marked it optional: changing nothing is no failure
    reason: str = ""
    wall_s: float = 0.0
    before: ProgramStats | None = None
    after: ProgramStats | None = None
    drift_step: dict | None = None  # against the program before this pass
    drift_total: dict | None = None  # against the original model
    info: dict = field(default_factory=dict)
    reproducer: str | None = None


@dataclass
class Report:
    pipeline: str = ""
    model: str = ""
    environment: dict = field(default_factory=dict)
    passes: list[PassRecord] = field(default_factory=list)
    initial: ProgramStats | None = None
    final: ProgramStats | None = None
    final_drift: dict | None = None
    verification: dict = field(default_factory=dict)  # what the budget was measured on
    budget: dict = field(default_factory=dict)  # what lossy passes were held to
    sections: dict[str, Any] = field(default_factory=dict)  # export, parity, latency, fidelity, gates
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def rolled_back(self) -> list[PassRecord]:
        return [p for p in self.passes if p.status == "rolled-back"]

    def to_dict(self) -> dict:
        return _jsonable(asdict(self) | {"ok": self.ok})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        lines = [f"# graphopt report: {self.model or 'model'}", ""]
        lines.append(f"Pipeline: `{self.pipeline}`  ")
        env = self.environment
        if env:
            lines.append("Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + "  ")
        lines.append(f"Status: {'OK' if self.ok else 'FAILED'}  ")
        if self.verification:
            v = self.verification
            lines.append(f"Verified on: {v.get('source', '')} ({v.get('samples', '?')} samples in {v.get('batches', '?')} batches, besides the example)")
        lines += ["", "| pass | status | time (s) | nodes | parameters | bytes | GFLOPs | step max rel | total cosine | note |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        if self.initial:
            lines.append(_row("(captured)", "", None, self.initial, None, None, ""))
        for rec in self.passes:
            note = rec.reason or _summarize_info(rec.info)
            lines.append(_row(rec.text, rec.status, rec.wall_s, rec.after or rec.before, rec.drift_step, rec.drift_total, note))
        for title, section in self.sections.items():
            lines += ["", f"## {title}", ""]
            lines += _section_markdown(section)
        if self.failures:
            lines += ["", "## Failures", ""] + [f"- {f}" for f in self.failures]
        return "\n".join(lines) + "\n"

    __str__ = to_markdown

    def write(self, out_dir: str | os.PathLike) -> tuple[Path, Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        json_path, md_path = out / "report.json", out / "report.md"
        atomic_write_text(json_path, self.to_json())
        atomic_write_text(md_path, self.to_markdown())
        return json_path, md_path


def environment() -> dict:
    from importlib import metadata

    import torch

    try:
        ort_version = metadata.version("onnxruntime")
    except metadata.PackageNotFoundError:
        ort_version = "not installed"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort_version,
        "cpu_isa": torch.backends.cpu.get_cpu_capability(),
        "cpus": os.cpu_count(),
    }


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a report is an ordinary file
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _row(text, status, wall, stats, step, total, note) -> str:
    def num(v, fmt):
        return "" if v is None else format(v, fmt)

    gflops = None if stats is None or stats.flops is None else stats.flops / 1e9
    return "| " + " | ".join([
        f"`{text}`" if text != "(captured)" else text,
        status,
        num(wall, ".2f"),
        num(stats.nodes if stats else None, "d"),
        num(stats.parameters if stats else None, ","),
        num(stats.parameter_bytes if stats else None, ","),
        num(gflops, ".3f"),
        num(step.get("max_rel") if step else None, ".2e") if step and isinstance(step.get("max_rel"), float) else "",
        num(total.get("cosine") if total else None, ".6f") if total and isinstance(total.get("cosine"), float) else "",
        note.replace("|", "/"),
    ]) + " |"


def _summarize_info(info: dict) -> str:
    parts = []
    for key, value in info.items():
        if isinstance(value, (int, float, str, bool)) and len(str(value)) < 60:
            parts.append(f"{key}={value}")
    return ", ".join(parts[:4])


def _section_markdown(section: Any) -> list[str]:
    if isinstance(section, dict) and section and all(isinstance(v, dict) for v in section.values()):
        keys = list(dict.fromkeys(k for v in section.values() for k in v))
        rows = ["| | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for name, values in section.items():
            rows.append(f"| {name} | " + " | ".join(_fmt(values.get(k)) for k in keys) + " |")
        return rows
    if isinstance(section, dict):
        lines = []
        for key, value in section.items():
            if isinstance(value, list) and value and all(isinstance(v, str) for v in value):  # e.g. the gates' failures
                lines += [f"- {key}:"] + [f"  - {v}" for v in value]
            else:
                lines.append(f"- {key}: {_fmt(value)}")
        return lines
    if isinstance(section, list):
        return [f"- {_fmt(v)}" for v in section]
    return [str(section)]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return ""
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "model_dump"):
        return _jsonable(value.model_dump(mode="json"))
    return str(value)

"""Recipe search: build every candidate, measure it on the target runtime, keep the best
that meets the gate (``--min-fidelity`` and/or ``--max-latency-ms``).

Each candidate is a full build (capture → optimize → export → ORT parity → latency and
held-out fidelity) into ``out/candidates/<name>/``; the winner's files are copied to
``out/``. Every candidate, with whether it met the gate and whether it is on the Pareto
front (no other candidate both faster and more faithful), is in ``search.json`` /
``search.md``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from graphopt.build import BuildOptions, build
from graphopt.recipe import Recipe
from graphopt.report import atomic_write_text

OURS = "graphopt → ORT"


@dataclass
class Candidate:
    name: str
    pipeline: str
    p50_ms: float | None = None
    heldout_mean_cos: float | None = None
    size_mb: float | None = None
    speedup_vs_eager: float | None = None
    ok: bool = False  # built, exported and within parity
    meets_gate: bool = False
    pareto: bool = False
    note: str = ""


@dataclass
class SearchResult:
    candidates: list[Candidate] = field(default_factory=list)
    winner: Candidate | None = None

    def to_markdown(self, min_fidelity: float | None, max_latency_ms: float | None) -> str:
        gate = ", ".join(g for g in (f"held-out mean cosine >= {min_fidelity}" if min_fidelity is not None else "",
                                     f"p50 <= {max_latency_ms} ms" if max_latency_ms is not None else "") if g)
        lines = [f"# graphopt recipe search ({gate})", "", "| candidate | pipeline | p50 ms | speed-up vs eager | size MB | held-out mean cos | meets gate | Pareto | note |",
                 "|---|---|---:|---:|---:|---:|---|---|---|"]
        for c in self.candidates:
            cells = [_fmt(c.p50_ms, ".2f"), _fmt(c.speedup_vs_eager, ".2f"), _fmt(c.size_mb, ".1f"), _fmt(c.heldout_mean_cos, ".5f")]
            lines.append(f"| {c.name}{' (chosen)' if c is self.winner else ''} | `{c.pipeline}` | " + " | ".join(cells)
                         + f" | {'yes' if c.meets_gate else 'no'} | {'yes' if c.pareto else ''} | {c.note} |")
        lines.append("")
        lines.append(f"Chosen: {self.winner.name}" if self.winner else "No candidate meets the gate.")
        return "\n".join(lines) + "\n"


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def search(
    loaded,
    candidates: list[Recipe],
    options: BuildOptions,
    *,
    min_fidelity: float | None = None,
    max_latency_ms: float | None = None,
    say: Callable[[str], None] = print,
) -> SearchResult:
    if min_fidelity is None and max_latency_ms is None:
        raise ValueError("search needs a gate: min_fidelity and/or max_latency_ms")
    out = Path(options.out_dir)
    result = SearchResult()
    folders: dict[str, Path] = {}
    for recipe in candidates:
        folder = out / "candidates" / recipe.name
        say(f"[graphopt] candidate '{recipe.name}': {recipe.pipeline_text()}")
        candidate = Candidate(name=recipe.name, pipeline=recipe.pipeline_text())
        try:
            built = build(loaded, recipe, replace(options, out_dir=folder, baseline_onnx=False), say=lambda _m: None)
        except Exception as exc:  # noqa: BLE001 - one broken candidate does not end the search
            candidate.note = f"failed: {type(exc).__name__}: {exc}"[:200]
            result.candidates.append(candidate)
            continue
        row = built.rows.get(OURS, {})
        candidate.p50_ms = row.get("p50_ms")
        candidate.heldout_mean_cos = row.get("heldout_mean_cos")
        candidate.size_mb = row.get("size_mb")
        candidate.speedup_vs_eager = row.get("speedup_vs_eager")
        candidate.ok = built.result.exported is not None and built.result.report.sections.get("parity", {}).get("passed", False)
        if not candidate.ok:
            candidate.note = "not exported or ORT parity failed"
        candidate.meets_gate = candidate.ok and _meets(candidate, min_fidelity, max_latency_ms)
        folders[recipe.name] = folder
        result.candidates.append(candidate)

    measured = [c for c in result.candidates if c.ok and c.p50_ms is not None]
    for c in measured:
        fidelity = c.heldout_mean_cos if c.heldout_mean_cos is not None else -1.0
        c.pareto = not any(
            o is not c and o.p50_ms <= c.p50_ms and (o.heldout_mean_cos or -1.0) >= fidelity and (o.p50_ms < c.p50_ms or (o.heldout_mean_cos or -1.0) > fidelity)
            for o in measured
        )
    meeting = [c for c in measured if c.meets_gate]
    if meeting:
        # With a fidelity gate the fastest wins; with only a latency gate the most faithful.
        key = (lambda c: c.p50_ms) if min_fidelity is not None else (lambda c: -(c.heldout_mean_cos or -1.0))
        result.winner = min(meeting, key=key)
        _promote(folders[result.winner.name], out)
    atomic_write_text(out / "search.json", json.dumps({"min_fidelity": min_fidelity, "max_latency_ms": max_latency_ms,
                                                       "winner": result.winner.name if result.winner else None,
                                                       "candidates": [c.__dict__ for c in result.candidates]}, indent=2))
    atomic_write_text(out / "search.md", result.to_markdown(min_fidelity, max_latency_ms))
    return result


def _meets(c: Candidate, min_fidelity: float | None, max_latency_ms: float | None) -> bool:
    if min_fidelity is not None and (c.heldout_mean_cos is None or c.heldout_mean_cos < min_fidelity):
        return False
    if max_latency_ms is not None and (c.p50_ms is None or c.p50_ms > max_latency_ms):
        return False
    return True


def _promote(folder: Path, out: Path) -> None:
    """Copy the winning candidate's bundle to the output folder."""
    for path in folder.iterdir():
        target = out / path.name
        if path.is_dir():
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(path, target)
        else:
            shutil.copy2(path, target)

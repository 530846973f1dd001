"""Recipe search: build every candidate, measure it on the target runtime, keep the best
that meets the gate (``--min-fidelity`` and/or ``--max-latency-ms``).

Each candidate is a full build (capture → optimize → export → ORT parity → latency and
held-out fidelity) into ``out/candidates/<name>/``; the winner's files are copied to
``out/``. Every candidate, with whether it met the gate and whether it is on the Pareto
front (no other candidate both faster and more faithful), is in ``search.json`` /
``search.md``.

Search chooses on one half of the held-out texts and reports the other half
(:func:`graphopt.data.halves`, by hash): the fidelity gate, the Pareto front and the
winner use the *selection* half, the figures quoted for the winner (search.md/json, its
report and manifest) come from the *report* half, which no choice looked at. With one
half both chosen on and quoted, the best of many candidates would look better than it is
(the winner's curse); both figures are shown, so the gap is visible.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from graphopt.build import BuildOptions, build
from graphopt.recipe import Recipe
from graphopt.report import atomic_write_text

OURS = "graphopt → ORT"


@dataclass
class Candidate:
    name: str
    pipeline: str
    p50_ms: float | None = None
    heldout_mean_cos: float | None = None  # on the report half: the quoted figure
    selection_mean_cos: float | None = None  # on the selection half: what the choice used
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
        lines = [f"# graphopt recipe search ({gate})", "",
                 "Chosen on the selection half of the held-out texts; the held-out figures quoted are those of the other half (report half).", "",
                 "| candidate | pipeline | p50 ms | speed-up vs eager | size MB | selection-half mean cos | held-out mean cos (report half) | meets gate | Pareto | note |",
                 "|---|---|---:|---:|---:|---:|---:|---|---|---|"]
        for c in self.candidates:
            cells = [_fmt(c.p50_ms, ".2f"), _fmt(c.speedup_vs_eager, ".2f"), _fmt(c.size_mb, ".1f"), _fmt(c.selection_mean_cos, ".5f"), _fmt(c.heldout_mean_cos, ".5f")]
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
    halves: dict[str, int | None] = {}
    for recipe in candidates:
        folder = out / "candidates" / recipe.name
        say(f"[graphopt] candidate '{recipe.name}': {recipe.pipeline_text()}")
        candidate, row = _build_candidate(loaded, recipe, replace(options, out_dir=folder, baseline_onnx=False, heldout_halves=True))
        candidate.meets_gate = candidate.ok and _meets(candidate, min_fidelity, max_latency_ms)
        if not halves and row.get("heldout_n"):
            halves = {"selection_texts": row.get("selection_n"), "report_texts": row["heldout_n"]}
        folders[recipe.name] = folder
        result.candidates.append(candidate)

    measured = [c for c in result.candidates if c.ok and c.p50_ms is not None]
    for c in measured:
        fidelity = _selection(c)
        c.pareto = not any(
            o is not c and _p50(o) <= _p50(c) and _selection(o) >= fidelity and (_p50(o) < _p50(c) or _selection(o) > fidelity)
            for o in measured
        )
    meeting = [c for c in measured if c.meets_gate]
    if meeting:
        # With a fidelity gate the fastest wins; with only a latency gate the most faithful.
        key = _p50 if min_fidelity is not None else (lambda c: -_selection(c))
        result.winner = min(meeting, key=key)
        _promote(folders[result.winner.name], out)
    atomic_write_text(out / "search.json", json.dumps({"min_fidelity": min_fidelity, "max_latency_ms": max_latency_ms, **halves,
                                                       "winner": result.winner.name if result.winner else None,
                                                       "candidates": [c.__dict__ for c in result.candidates]}, indent=2))
    atomic_write_text(out / "search.md", result.to_markdown(min_fidelity, max_latency_ms))
    return result


def _build_candidate(loaded, recipe: Recipe, options: BuildOptions) -> tuple[Candidate, dict]:
    """One candidate built and measured; a broken build is a candidate with a note, not the end of the search."""
    candidate = Candidate(name=recipe.name, pipeline=recipe.pipeline_text())
    try:
        built = build(loaded, recipe, options, say=lambda _m: None)
    except Exception as exc:  # noqa: BLE001 - one broken candidate does not end the search
        candidate.note = f"failed: {type(exc).__name__}: {exc}"[:200]
        return candidate, {}
    row = built.rows.get(OURS, {})
    candidate.p50_ms = row.get("p50_ms")
    candidate.heldout_mean_cos = row.get("heldout_mean_cos")
    candidate.selection_mean_cos = row.get("selection_mean_cos")
    candidate.size_mb = row.get("size_mb")
    candidate.speedup_vs_eager = row.get("speedup_vs_eager")
    report = built.result.report
    # The recipe's own gates are not the search's; any other failure (a requested pass that
    # changed nothing, a capture fallback) disqualifies the candidate.
    problems = [f for f in report.failures if not f.startswith("gate: ")]
    parity = report.sections.get("parity", {}).get("passed", False)
    candidate.ok = built.result.exported is not None and parity is True and not problems
    if not candidate.ok:
        candidate.note = (problems[0] if problems else "not exported or ORT parity failed")[:200]
    return candidate, row


def _p50(c: Candidate) -> float:
    """The median latency of a measured candidate."""
    if c.p50_ms is None:
        raise ValueError(f"candidate '{c.name}' has no measured latency")
    return c.p50_ms


def _selection(c: Candidate) -> float:
    return c.selection_mean_cos if c.selection_mean_cos is not None else -1.0


def _meets(c: Candidate, min_fidelity: float | None, max_latency_ms: float | None) -> bool:
    if min_fidelity is not None and (c.selection_mean_cos is None or c.selection_mean_cos < min_fidelity):
        return False
    return not (max_latency_ms is not None and (c.p50_ms is None or c.p50_ms > max_latency_ms))


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

"""The deployment build step: load → capture → optimize → export → measure → gate.

Shared by ``graphopt optimize`` and the demo. Everything it measures goes into the
report; gates decide the exit code.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from graphopt.api import OptimizeResult, optimize
from graphopt.bundle import write_manifest
from graphopt.capture import capture
from graphopt.errors import ParityError
from graphopt.recipe import Recipe


@dataclass
class BuildOptions:
    out_dir: Path
    threads: int | None = None
    bench_batch: int = 1
    bench_seq: int = 128
    bench_repeat: int = 30
    heldout: int = 64  # held-out sentences for fidelity (text models with a tokenizer)
    calibration: int = 64  # training sentences for calibrated passes (quantize, prune importance)
    baseline_onnx: bool = True  # also export the unoptimized model, to compare in ORT
    progress: bool = True


@dataclass
class BuildResult:
    result: OptimizeResult
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> latency / size / fidelity
    gate_failures: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.result.report.ok and not self.gate_failures


def build(loaded, recipe: Recipe, options: BuildOptions, *, say: Callable[[str], None] = print) -> BuildResult:
    """Run the whole build step for a loaded model (graphopt.models.LoadedModel)."""
    out = Path(options.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = options.threads or recipe.runtime.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    timings: dict[str, float] = {}
    example = loaded.example_kwargs or {}

    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        say = lambda _msg: None  # noqa: E731 - one rank speaks
    with _step(say, "capture", timings):
        program = capture(loaded.model, kwargs=example)
    program.meta["tokenizer"] = loaded.tokenizer
    program.meta["report_dir"] = str(out)
    if loaded.tokenizer is not None and "calibration" not in program.meta:
        program.meta["calibration"] = calibration_batches(loaded, options.calibration)
    with _step(say, f"optimize ({recipe.pipeline_text() or 'empty pipeline'})", timings):
        result = optimize(program, recipe, reproducer_dir=out, progress=options.progress and rank == 0)
    report = result.report
    report.model = loaded.name
    build_result = BuildResult(result=result, timings=timings)
    if rank != 0:  # data-parallel helpers: they took part in training; rank 0 exports and measures
        return build_result
    model_path = out / "model.onnx"
    with _step(say, "export + ORT parity", timings):
        try:
            result.export(model_path)
        except ParityError as exc:
            say(f"  parity failed: {exc}")

    if result.exported is not None:
        with _step(say, "measure latency and fidelity", timings):
            build_result.rows = measure(loaded, result, options, threads)
        report.sections["comparison"] = build_result.rows
    build_result.gate_failures = evaluate_gates(recipe, result, build_result.rows)
    report.sections["gates"] = {"passed": not build_result.gate_failures, "failures": build_result.gate_failures}
    report.failures.extend(f"gate: {g}" for g in build_result.gate_failures)
    report.sections["timings (s)"] = {k: round(v, 2) for k, v in timings.items()}
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(out / "tokenizer")
    report.write(out)
    session = report.sections.get("session", {})
    write_manifest(out, recipe=recipe, figures=build_result.rows, provider=recipe.runtime.provider, threads=threads, model=loaded.name,
                   disabled_optimizers=session.get("disabled_optimizers"))
    return build_result


@contextlib.contextmanager
def _step(say, name: str, timings: dict[str, float]):
    say(f"[graphopt] {name} ...")
    start = time.perf_counter()
    yield
    elapsed = time.perf_counter() - start
    timings[name.split(" (")[0]] = elapsed
    say(f"[graphopt] {name}: {elapsed:.1f} s")


def calibration_batches(loaded, sentences: int, batch_size: int = 16) -> list[tuple[tuple, dict]]:
    """Training sentences (never the held-out ones), tokenized, as ``(args, kwargs)`` batches
    for ``program.meta["calibration"]``: what quantize calibrates and prune ranks on."""
    from graphopt.data import batches, train_sentences

    names = set(loaded.example_kwargs or {})
    return [((), {k: v for k, v in batch.items() if not names or k in names}) for batch in batches(loaded.tokenizer, train_sentences(sentences), batch_size=batch_size)]


def benchmark_inputs(loaded, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """Inputs of the benchmark shape: real text for tokenized models, else the example resized."""
    from graphopt.data import heldout_sentences, tokenize

    if loaded.tokenizer is not None:
        sentences = (heldout_sentences(batch) * 1000)[:batch]
        long_text = [" ".join([s] * 40) for s in sentences]
        inputs = tokenize(loaded.tokenizer, long_text, max_length=seq, padding="max_length")
        return {k: v for k, v in inputs.items() if k in (loaded.example_kwargs or inputs)}
    return dict(loaded.example_kwargs or {})


def measure(loaded, result: OptimizeResult, options: BuildOptions, threads: int) -> dict[str, dict[str, Any]]:
    """Latency (PyTorch eager fp32 vs ORT), file size and held-out fidelity, in one process."""
    from graphopt.export import make_session, measure_latency, run as ort_run, to_onnx
    from graphopt.fidelity import compare_encoders

    inputs = benchmark_inputs(loaded, options.bench_batch, options.bench_seq)
    model = loaded.model
    rows: dict[str, dict[str, Any]] = {}
    runtime = result.recipe.runtime

    def eager():
        with torch.inference_mode():
            return model(**inputs)

    # PyTorch first, before any ORT session exists: ORT's intra-op threads spin after a
    # run and would steal the cores PyTorch is being timed on.
    eager_latency = measure_latency(eager, repeat=options.bench_repeat)
    rows["PyTorch eager fp32"] = {**_latency(eager_latency), "size_mb": _state_dict_mb(model)}

    # name -> (session factory, bytes). Sessions are opened one at a time: an idle ORT
    # session's spinning threads slow the one being timed (graphopt.export.alternating_latency).
    sessions: dict[str, tuple[Callable[[], Any], int]] = {}
    if options.baseline_onnx:
        baseline_program = capture(model, kwargs=loaded.example_kwargs or {})
        baseline = to_onnx(baseline_program, Path(options.out_dir) / "baseline" / "model.onnx")
        sessions["ORT fp32 (plain export)"] = (lambda: make_session(baseline.path, provider=runtime.provider, threads=threads), baseline.bytes)
    disabled = session_tuning(result, inputs, threads)
    sessions["graphopt → ORT"] = (
        lambda: make_session(result.exported.path, provider=runtime.provider, threads=threads, graph_optimization=runtime.graph_optimization, disabled_optimizers=disabled),
        result.exported.bytes,
    )

    for name, (open_session, size) in sessions.items():
        session = open_session()
        feed = {k: v for k, v in inputs.items() if k in {i.name for i in session.get_inputs()}}
        latency = measure_latency(lambda s=session, f=feed: ort_run(s, f), repeat=options.bench_repeat)
        rows[name] = {**_latency(latency), "size_mb": size / 1e6}
        del session
    for row in rows.values():
        row["speedup_vs_eager"] = eager_latency["p50_ms"] / row["p50_ms"]

    if loaded.tokenizer is not None and options.heldout > 0:
        from graphopt.data import heldout_sentences

        sentences = heldout_sentences(options.heldout)
        names = list(loaded.example_kwargs or {})
        for name, (open_session, _size) in sessions.items():
            fidelity = compare_encoders(model, _session_encoder(open_session()), loaded.tokenizer, sentences, input_names=names)
            rows[name].update({"heldout_mean_cos": fidelity["mean_cosine"], "heldout_min_cos": fidelity["min_cosine"], "spearman": fidelity["spearman"]})
        rows["PyTorch eager fp32"].update({"heldout_mean_cos": 1.0, "heldout_min_cos": 1.0, "spearman": 1.0})
    return rows


def session_tuning(result: OptimizeResult, inputs: dict, threads: int) -> list[str]:
    """The ORT transformers the deployed session leaves out (:func:`session_settings` for the
    built model), recorded in the report's ``session`` section and in the manifest."""
    section = session_settings(result.recipe.runtime, result.exported.path, inputs, threads)
    result.report.sections["session"] = section
    return section["disabled_optimizers"]


def session_settings(runtime, path: str | os.PathLike, inputs: dict, threads: int) -> dict[str, Any]:
    """The ORT session a model at ``path`` is deployed with under the recipe's ``runtime``
    settings: the transformers to leave out are measured on the model when the recipe says
    ``"auto"`` (with the trials), else taken as the recipe names them."""
    import onnx

    from graphopt.export import tune_disabled_optimizers
    from graphopt.export.session import resolve_disabled_optimizers

    section: dict[str, Any] = {"provider": runtime.provider, "threads": threads, "graph_optimization": runtime.graph_optimization}
    if runtime.disabled_optimizers == "auto":
        declared = {i.name for i in onnx.load(path, load_external_data=False).graph.input}
        feed = {k: v for k, v in inputs.items() if k in declared}
        tuned = tune_disabled_optimizers(path, feed, provider=runtime.provider, threads=threads)
        section.update(disabled_optimizers=tuned["disabled_optimizers"], tuning=tuned["trials"])
    else:
        section["disabled_optimizers"] = resolve_disabled_optimizers(runtime.disabled_optimizers, runtime.provider)
    return section


def _session_encoder(session):
    from graphopt.export import run as ort_run

    def encoder(**inputs):
        return torch.from_numpy(ort_run(session, inputs)[0])

    return encoder


def _latency(stats: dict) -> dict:
    return {"p50_ms": stats["p50_ms"], "p90_ms": stats["p90_ms"]}


def _state_dict_mb(model: torch.nn.Module) -> float:
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total / 1e6


def evaluate_gates(recipe: Recipe, result: OptimizeResult, rows: dict[str, dict[str, Any]]) -> list[str]:
    gates = recipe.gates
    failures: list[str] = []
    ours = rows.get("graphopt → ORT", {})
    final = result.report.final_drift or {}
    if gates.require_parity and result.report.sections.get("parity", {}).get("passed") is False:
        failures.append("ORT parity failed (see parity section)")
    if gates.require_parity and result.exported is None:
        failures.append("the model was not exported")
    if gates.min_cosine is not None and isinstance(final.get("cosine"), float) and final["cosine"] < gates.min_cosine:
        failures.append(f"min_cosine: outputs cosine {final['cosine']:.6f} < {gates.min_cosine}")
    _gate_min(failures, "min_heldout_cosine", ours.get("heldout_mean_cos"), gates.min_heldout_cosine, "held-out mean cosine")
    _gate_min(failures, "min_speedup", ours.get("speedup_vs_eager"), gates.min_speedup, "ORT speed-up over PyTorch eager fp32")
    if gates.max_latency_ms is not None and ours.get("p50_ms") is not None and ours["p50_ms"] > gates.max_latency_ms:
        failures.append(f"max_latency_ms: p50 {ours['p50_ms']:.2f} ms > {gates.max_latency_ms} ms")
    if gates.max_size_mb is not None and result.exported is not None and result.exported.bytes / 1e6 > gates.max_size_mb:
        failures.append(f"max_size_mb: {result.exported.bytes / 1e6:.1f} MB > {gates.max_size_mb} MB")
    return failures


def _gate_min(failures: list[str], key: str, value: float | None, bound: float | None, what: str) -> None:
    if bound is None:
        return
    if value is None:
        failures.append(f"{key}: {what} was not measured")
    elif value < bound:
        failures.append(f"{key}: {what} {value:.4f} < {bound}")


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    headers = ["", "p50 ms", "p90 ms", "speed-up vs eager", "size MB", "held-out mean cos", "min cos", "spearman"]
    keys = ["p50_ms", "p90_ms", "speedup_vs_eager", "size_mb", "heldout_mean_cos", "heldout_min_cos", "spearman"]
    fmts = [".2f", ".2f", ".2f", ".1f", ".6f", ".6f", ".6f"]
    lines = ["| " + " | ".join(headers) + " |", "|---" * len(headers) + "|"]
    for name, row in rows.items():
        cells = [format(row[k], f) if isinstance(row.get(k), (int, float)) else "" for k, f in zip(keys, fmts)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["BuildOptions", "BuildResult", "build", "measure", "evaluate_gates", "format_table"]

"""The deployment build step: load → capture → data → optimize → export → parity → measure → gate.

Shared by ``graphopt optimize`` and the demo. Everything it measures goes into the
report; gates decide the exit code.

The data: text models are calibrated and distilled on the training part, verified on the
verification part and gated on the held-out part of the recipe's ``[data]`` source (the
standard-library text, or the user's own: :mod:`graphopt.datasets`); models without a
tokenizer on seeded random inputs over their dynamic shapes. The ORT session is measured
first (:func:`session_settings`), and parity is checked on exactly those settings.

A capture that fell back to ``torch.fx.symbolic_trace`` fails the build when the pipeline
has a pass that needs the ATen graph, optional ones included: such a pass cannot run on
the fallback graph at all, which is not what ``?`` ("may find nothing to do") allows. A
pipeline of IR-independent passes (``dce,dedup``) loses nothing on that graph and is still
verified and parity-checked, so it may go on; the report records the fallback either way.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graphopt.api import OptimizeResult, optimize
from graphopt.bundle import write_manifest
from graphopt.capture import capture
from graphopt.context import PassContext, Target
from graphopt.datasets import (
    STDLIB,
    TextSplits,
    load_splits,
    passage_joiner,
    program_context,
    text_context,
)
from graphopt.errors import ConfigError, ParityError
from graphopt.program import Program
from graphopt.recipe import Recipe

OURS, EAGER = "graphopt → ORT", "PyTorch eager fp32"


@dataclass
class BuildOptions:
    out_dir: Path
    threads: int | None = None
    bench_batch: int = 1
    bench_seq: int | None = None  # None: the recipe's [data] passage_tokens, else 128
    bench_repeat: int = 30
    heldout: int | None = None  # held-out texts for fidelity (None: the recipe's [data] heldout; 0: skip)
    calibration: int | None = None  # training texts for calibrated passes (None: the recipe's [data] calibration)
    baseline_onnx: bool = True  # also export the unoptimized model, to compare in ORT
    progress: bool = True
    print_after_change: str | Path | None = None  # folder for the program's code after every changing pass
    heldout_halves: bool = False  # quote one half of the held-out texts, report the other as "selection" (search)


@dataclass
class BuildResult:
    result: OptimizeResult
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> latency / size / fidelity
    gate_failures: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    splits: TextSplits | None = None

    @property
    def ok(self) -> bool:
        return self.result.report.ok and not self.gate_failures


def build(loaded, recipe: Recipe, options: BuildOptions, *, say: Callable[[str], None] = print) -> BuildResult:
    """Run the whole build step for a loaded model (graphopt.models.LoadedModel).

    PyTorch runs on the build's threads (options, else the recipe's, else every core) while
    it lasts; the caller's thread count is restored afterwards, so a build called from
    Python leaves the process as it found it."""
    threads = options.threads or recipe.runtime.threads or os.cpu_count() or 1
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _build(loaded, recipe, options, threads, say)
    finally:
        torch.set_num_threads(previous)


def _build(loaded, recipe: Recipe, options: BuildOptions, threads: int, say: Callable[[str], None]) -> BuildResult:
    out = Path(options.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recipe = _resolve_precision(recipe, say)
    target = Target(provider=recipe.runtime.provider, threads=threads, precision=recipe.runtime.precision)
    timings: dict[str, float] = {}
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        say = lambda _msg: None
    for note in getattr(loaded, "notes", ()):
        say(f"[graphopt] note: {note}")

    splits = build_splits(loaded, recipe, options)  # before the capture: bad data fails fast
    if getattr(loaded, "generates", False):
        return build_decoder(loaded, recipe, options, splits, target=target, threads=threads, say=say, timings=timings)
    with _step(say, "capture", timings):
        program = capture(loaded.model, kwargs=loaded.example_kwargs or {})
    capture_failure = capture_problem(program, recipe)
    if program.ir != "aten":
        say(f"[graphopt] {'FAILED' if capture_failure else 'warning'}: capture fell back to torch.fx.symbolic_trace: {_first_line(program.meta.get('capture_fallback', ''))}")
    with _step(say, "data", timings):
        ctx = build_context(loaded, program, splits, recipe, target=target, artifacts=out)
    say(f"[graphopt] data: calibration on {ctx.calibration_source}; verification on {ctx.verification_source}"
        + (f"; held-out: {len(splits.heldout)} texts" if splits is not None else "; held-out: none (no tokenizer)"))
    with _step(say, f"optimize ({recipe.pipeline_text() or 'empty pipeline'})", timings):
        result = optimize(program, recipe, context=ctx, reproducer_dir=out, progress=options.progress and rank == 0, print_after_change=options.print_after_change)
    report = result.report
    report.model = loaded.name
    report.sections["target"] = target.to_dict()
    report.sections["data"] = data_section(loaded, splits, ctx, recipe)
    report.sections["capture"] = {"ir": program.ir, "fallback": program.meta.get("capture_fallback", "")}
    if capture_failure:
        report.failures.append(capture_failure)
    build_result = BuildResult(result=result, timings=timings, splits=splits)
    if rank != 0:  # data-parallel helpers: they took part in training; rank 0 exports and measures
        return build_result

    inputs = benchmark_inputs(loaded, options.bench_batch, bench_seq(options, recipe), splits.heldout if splits else None)
    # PyTorch is timed first, before any ORT session exists (session tuning and parity open
    # several): ORT's intra-op threads spin after a run and would steal its cores.
    eager = eager_latency(loaded.model, inputs, options.bench_repeat) if capture_failure is None else None
    if capture_failure is None:
        with _step(say, "export + session settings + ORT parity", timings):
            export_and_check(result, program, out / "model.onnx", inputs, threads, say)
    if result.exported is not None:
        with _step(say, "measure latency and fidelity", timings):
            build_result.rows = measure(loaded, result, options, threads, splits, inputs, eager=eager)
        report.sections["comparison"] = build_result.rows
    _finish(build_result, loaded, recipe, out, threads, target)
    return build_result


def _finish(build_result: BuildResult, loaded, recipe: Recipe, out: Path, threads: int, target: Target) -> None:
    result, report = build_result.result, build_result.result.report
    build_result.gate_failures = evaluate_gates(recipe, result, build_result.rows)
    report.sections["gates"] = {"passed": not build_result.gate_failures, "failures": build_result.gate_failures}
    not_applied = gates_not_applied(recipe, is_decoder="decoder" in result.program.meta)
    if not_applied:  # said, not dropped: a gate the user set and nothing checked must show
        report.sections["gates"]["not applied"] = not_applied
    report.failures.extend(f"gate: {g}" for g in build_result.gate_failures)
    report.sections["timings (s)"] = {k: round(v, 2) for k, v in build_result.timings.items()}
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(out / "tokenizer")
    report.write(out)
    session = report.sections.get("session", {})
    write_manifest(out, recipe=recipe, figures=build_result.rows, provider=recipe.runtime.provider, threads=threads, model=loaded.name,
                   disabled_optimizers=session.get("disabled_optimizers"), graph_optimization=recipe.runtime.graph_optimization,
                   target=target.to_dict(), data=report.sections.get("data"), precision=recipe.runtime.precision)


@contextlib.contextmanager
def _step(say, name: str, timings: dict[str, float]):
    say(f"[graphopt] {name} ...")
    start = time.perf_counter()
    yield
    elapsed = time.perf_counter() - start
    timings[name.split(" (")[0]] = elapsed
    say(f"[graphopt] {name}: {elapsed:.1f} s")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


# ---- decoders ---------------------------------------------------------------------------------
DECODER_NEW_TOKENS = 32  # tokens generated per timed run of a decoder build


def build_decoder(loaded, recipe: Recipe, options: BuildOptions, splits: TextSplits | None, *, target: Target, threads: int,
                  say: Callable[[str], None], timings: dict[str, float]) -> BuildResult:
    """The build step of a causal LM: capture with a KV cache, fit and verify on short
    generation runs (prefill and decode steps) of training / verification text, export with
    Optimum's names, check parity, then measure prefill latency and decode tokens/s against
    PyTorch's cached ``generate`` and the plain export, and next-token agreement and
    perplexity ratio on held-out text."""
    from graphopt.decoder import capture_decoder, decoder_context, text_prompt_batches

    out = Path(options.out_dir)
    with _step(say, "capture (KV-cache decoder)", timings):
        program = capture_decoder(loaded.model)
    with _step(say, "data", timings):
        if splits is not None:
            calibration = text_prompt_batches(loaded.tokenizer, splits.calibration_texts(), recipe.data.max_length)
            verification = text_prompt_batches(loaded.tokenizer, list(splits.verification), recipe.data.max_length)
            ctx = decoder_context(program, calibration=calibration, verification=verification, artifacts=out, target=target,
                                  tokenizer=loaded.tokenizer, training_texts=tuple(splits.train))
        else:
            ctx = decoder_context(program, artifacts=out, target=target)
    say(f"[graphopt] data: calibration on {ctx.calibration_source}; verification on {ctx.verification_source}"
        + (f"; held-out: {len(splits.heldout)} texts" if splits is not None else "; held-out: none (no tokenizer)"))
    with _step(say, f"optimize ({recipe.pipeline_text() or 'empty pipeline'})", timings):
        result = optimize(program, recipe, context=ctx, reproducer_dir=out, progress=options.progress, print_after_change=options.print_after_change)
    report = result.report
    report.model = loaded.name
    report.sections["target"] = target.to_dict()
    report.sections["data"] = data_section(loaded, splits, ctx, recipe)
    report.sections["capture"] = {"ir": program.ir, "decoder": dict(program.meta["decoder"])}
    build_result = BuildResult(result=result, timings=timings, splits=splits)
    prompt = _benchmark_prompt(loaded, program, bench_seq(options, recipe), splits)
    eager = eager_generation(loaded.model, prompt, DECODER_NEW_TOKENS)  # before any ORT session exists
    with _step(say, "export + ORT parity", timings):
        runtime = recipe.runtime
        result.export(out / "model.onnx", parity=False)
        from graphopt.export.session import resolve_disabled_optimizers

        disabled = [] if runtime.disabled_optimizers == "auto" else resolve_disabled_optimizers(runtime.disabled_optimizers, runtime.provider)
        session = {"provider": runtime.provider, "threads": threads, "graph_optimization": runtime.graph_optimization, "disabled_optimizers": disabled}
        report.sections["session"] = session
        try:
            result.check_parity(session=dict(session), original=program)
        except ParityError as exc:
            say(f"  parity failed: {exc}")
    with _step(say, "measure prefill, decode and held-out fidelity", timings):
        build_result.rows = measure_decoder(loaded, result, program, options, threads, prompt, splits, eager=eager)
    report.sections["comparison"] = build_result.rows
    if (generation_config := getattr(loaded.model, "generation_config", None)) is not None:
        generation_config.save_pretrained(out)
    from graphopt.bundle import GENAI_CONFIG, genai_config
    from graphopt.decoder import decoder_spec
    from graphopt.report import atomic_write_text

    window = decoder_spec(result.program).cache_window
    if window is None:  # onnxruntime-genai reads the bundle too (tests/test_decoder_build.py runs it when installed)
        atomic_write_text(out / GENAI_CONFIG, json.dumps(genai_config(decoder_spec(program), loaded.model.config, threads=threads), indent=2))
    else:
        report.sections["export"]["genai_config"] = f"not written: onnxruntime-genai would not apply the cache window {window}"
    _finish(build_result, loaded, recipe, out, threads, target)
    return build_result


def _benchmark_prompt(loaded, program: Program, length: int, splits: TextSplits | None) -> list[int]:
    """A prompt of ``length`` tokens: held-out text repeated (tokenized models), else seeded ids."""
    from graphopt.decoder import decoder_spec

    if loaded.tokenizer is not None and splits is not None and splits.heldout:
        ids: list[int] = []
        for text in list(splits.heldout) * 50:
            ids += loaded.tokenizer(text)["input_ids"]
            if len(ids) >= length:
                return ids[:length]
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, decoder_spec(program).vocab_size, (length,), generator=generator).tolist()


def eager_generation(model: torch.nn.Module, prompt: list[int], new_tokens: int, repeat: int = 3) -> dict[str, float]:
    """PyTorch eager fp32 ``generate`` with its cache: prefill ms (the first token) and decode
    tokens/s (the rest), medians over ``repeat`` runs."""
    import statistics

    ids = torch.tensor([prompt])
    generate: Callable[..., Any] = model.generate  # type: ignore[assignment]
    prefill, decode = [], []
    with torch.inference_mode():
        for _ in range(repeat):
            start = time.perf_counter()
            generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, min_new_tokens=1, do_sample=False)
            first = time.perf_counter() - start
            start = time.perf_counter()
            generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            whole = time.perf_counter() - start
            prefill.append(first * 1e3)
            decode.append((new_tokens - 1) / max(whole - first, 1e-9))
    return {"prefill_ms": statistics.median(prefill), "decode_tokens_per_s": statistics.median(decode)}


def measure_decoder(loaded, result: OptimizeResult, program: Program, options: BuildOptions, threads: int, prompt: list[int],
                    splits: TextSplits | None, *, eager: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Prefill ms and decode tokens/s (medians of alternating rounds, one session alive at a
    time), size, and held-out next-token agreement and perplexity ratio against PyTorch fp32."""
    import statistics

    from graphopt.export import make_session, to_onnx
    from graphopt.export.generation import Generator

    runtime = result.recipe.runtime
    disabled = result.report.sections.get("session", {}).get("disabled_optimizers")
    rows: dict[str, dict[str, Any]] = {EAGER: {**{k: round(v, 3) for k, v in eager.items()}, "size_mb": _state_dict_mb(loaded.model)}}
    sessions: dict[str, tuple[Callable[[], Any], int]] = {}
    if options.baseline_onnx:
        baseline = to_onnx(program, Path(options.out_dir) / "baseline" / "model.onnx")
        sessions["ORT fp32 (plain export)"] = (lambda: make_session(baseline.path, provider=runtime.provider, threads=threads), baseline.bytes)
    sessions[OURS] = (lambda: make_session(result.exported.path, provider=runtime.provider, threads=threads,
                                           graph_optimization=runtime.graph_optimization, disabled_optimizers=disabled), result.exported.bytes)
    samples: dict[str, dict[str, list[float]]] = {name: {"prefill_ms": [], "decode_tokens_per_s": []} for name in sessions}
    rounds = max(2, min(5, options.bench_repeat // 10))
    for _ in range(rounds):
        for name, (open_session, _) in sessions.items():
            generator = Generator(open_session())
            generator.generate([prompt], max_new_tokens=4, eos_token_id=[])  # warm-up
            timings = generator.generate([prompt], max_new_tokens=DECODER_NEW_TOKENS, eos_token_id=[]).timings()
            samples[name]["prefill_ms"].append(timings["prefill_ms"])
            samples[name]["decode_tokens_per_s"].append(timings["decode_tokens_per_s"])
            del generator
    for name, (_, size) in sessions.items():
        rows[name] = {key: round(statistics.median(values), 3) for key, values in samples[name].items()}
        rows[name]["size_mb"] = size / 1e6
    for row in rows.values():
        row["decode_speedup_vs_eager"] = round(row["decode_tokens_per_s"] / eager["decode_tokens_per_s"], 3)
        row["prefill_speedup_vs_eager"] = round(eager["prefill_ms"] / row["prefill_ms"], 3)
    if loaded.tokenizer is not None and splits is not None and splits.heldout:
        from graphopt.decoder import text_prompt_batches
        from graphopt.fidelity import next_token_fidelity

        blocks = text_prompt_batches(loaded.tokenizer, list(splits.heldout), result.recipe.data.max_length, sizes=(4,))
        for name, (open_session, _) in sessions.items():
            figures = next_token_fidelity(loaded.model, Generator(open_session()), blocks)
            rows[name].update({"heldout_agreement": figures["agreement"], "heldout_ppl_ratio": figures["ppl_ratio"], "heldout_tokens": figures["tokens"]})
        rows[EAGER].update({"heldout_agreement": 1.0, "heldout_ppl_ratio": 1.0})
    return rows


# ---- data and capture ------------------------------------------------------------------------
def build_splits(loaded, recipe: Recipe, options: BuildOptions) -> TextSplits | None:
    """The recipe's ``[data]`` split for a model with a tokenizer (``options`` may override
    the calibration and held-out counts); None for a model without one, which is verified on
    seeded random inputs, so a text source given for it is an error rather than ignored."""
    settings = recipe.data
    if loaded.tokenizer is None:
        if settings.source != STDLIB:
            raise ConfigError(f"the data source {settings.source} is text, but the model {loaded.name} has no tokenizer to read it with")
        return None
    check_positions(loaded, settings.max_length)
    calibration = settings.calibration if options.calibration is None else options.calibration
    heldout = settings.heldout if options.heldout is None else options.heldout
    join = passage_joiner(loaded.tokenizer, settings.passage_tokens) if settings.passage_tokens else None
    return load_splits(settings.source, settings.field, calibration=calibration, verification=settings.verification, heldout=heldout,
                       fractions=settings.fractions, seed=settings.seed, join=join)


def bench_seq(options: BuildOptions, recipe: Recipe) -> int:
    """The benchmark's sequence length: the option, else the recipe's passage length, else 128."""
    return options.bench_seq or recipe.data.passage_tokens or 128


def check_positions(loaded, max_length: int) -> None:
    """Refuse texts longer than a learned absolute position table (BERT's 512): graphopt does
    not extend position embeddings, and past the table the model would read out of range."""
    config = getattr(loaded.model, "config", None)
    table = getattr(config, "max_position_embeddings", None)
    rotary = any(getattr(config, name, None) is not None for name in ("rope_theta", "rope_scaling", "rope_parameters"))
    if isinstance(table, int) and not rotary and getattr(config, "position_embedding_type", "absolute") == "absolute" and max_length > table:
        raise ConfigError(
            f"[data] max_length {max_length} exceeds {loaded.name}'s position table (max_position_embeddings = {table}): "
            f"its learned absolute positions stop there and graphopt does not extend them; use max_length <= {table}"
        )


def build_context(loaded, program: Program, splits: TextSplits | None, recipe: Recipe, *, target: Target, artifacts: Path) -> PassContext:
    """The pass context of a build: tokenized splits, or seeded random inputs over the
    program's dynamic shapes when there is no tokenizer."""
    if splits is None:
        return program_context(program, artifacts=artifacts, target=target)
    names = list(loaded.example_kwargs) if loaded.example_kwargs else None
    return text_context(loaded.tokenizer, splits, names, max_length=recipe.data.max_length, artifacts=artifacts, target=target)


def data_section(loaded, splits: TextSplits | None, ctx: PassContext, recipe: Recipe) -> dict[str, Any]:
    """What the report's and the manifest's ``data`` sections say the build was fed."""
    section: dict[str, Any] = {"calibration": ctx.calibration_source, "verification": ctx.verification_source}
    if splits is None:
        return {"source": "seeded random inputs over the declared dynamic shapes (no tokenizer)", **section, "heldout": "none", "notes": list(getattr(loaded, "notes", ()))}
    return {**splits.to_dict(), **section, "max_length": recipe.data.max_length, "fractions": list(recipe.data.fractions), "seed": recipe.data.seed}


def capture_problem(program: Program, recipe: Recipe) -> str | None:
    """Why a capture that fell back to symbolic_trace fails this build (None: it does not;
    see the module doc for why optional ATen passes count too)."""
    if program.ir == "aten":
        return None
    needs = [p.text() for p in recipe.manager().leaves() if "aten" in p.requires_ir and program.ir not in p.requires_ir]
    if not needs:
        return None
    why = _first_line(program.meta.get("capture_fallback", "")) or "torch.export failed"
    return f"capture fell back to torch.fx.symbolic_trace ({why}), so the passes that need the ATen graph cannot run: {', '.join(needs)}"


# ---- export and parity ---------------------------------------------------------------------
def export_and_check(result: OptimizeResult, original: Program, path: Path, inputs: dict, threads: int, say: Callable[[str], None]) -> None:
    """Export, measure the deployed session's settings, then check ORT parity on exactly
    those settings against the optimized and the original program."""
    runtime = result.recipe.runtime
    result.export(path, parity=False)  # parity comes below, on the settings measured here
    section = session_settings(runtime, result.exported.path, inputs, threads)
    result.report.sections["session"] = section
    session = {"provider": runtime.provider, "threads": threads, "graph_optimization": runtime.graph_optimization, "disabled_optimizers": section["disabled_optimizers"]}
    try:
        result.check_parity(session=session, original=original)
    except ParityError as exc:
        say(f"  parity failed: {exc}")


def benchmark_inputs(loaded, batch: int, seq: int, sentences: list[str] | tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """Inputs of the benchmark shape: real text (``sentences``, default the standard
    library's held-out ones) for tokenized models, else the example resized."""
    from graphopt.data import heldout_sentences, tokenize

    if loaded.tokenizer is not None:
        sentences = (list(sentences or heldout_sentences(batch)) * 1000)[:batch]
        long_text = [" ".join([s] * 40) for s in sentences]
        inputs = tokenize(loaded.tokenizer, long_text, max_length=seq, padding="max_length")
        return {k: v for k, v in inputs.items() if k in (loaded.example_kwargs or inputs)}
    return dict(loaded.example_kwargs or {})


# ---- measurement -----------------------------------------------------------------------------
def baseline_label(runtime) -> str:
    """The plain export's row: run on the recipe's runtime, at its precision."""
    from graphopt.export.openvino_session import RUNTIME
    from graphopt.export.session import resolve_provider

    if runtime.provider.lower() in ("openvino", "openvinoruntime") and resolve_provider(runtime.provider) == RUNTIME:
        return f"OpenVINO {runtime.precision} (plain export)"
    return "ORT fp32 (plain export)"


def eager_latency(model: torch.nn.Module, inputs: dict, repeat: int) -> dict[str, float]:
    """PyTorch eager fp32 latency on ``inputs``: time it before any ORT session exists."""
    from graphopt.export import measure_latency

    def eager():
        with torch.inference_mode():
            return model(**inputs)

    return measure_latency(eager, repeat=repeat)


def measure(loaded, result: OptimizeResult, options: BuildOptions, threads: int, splits: TextSplits | None = None, inputs: dict | None = None,
            *, eager: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """Latency (PyTorch eager fp32 vs ORT), file size and held-out fidelity, in one process;
    the ORT session of the built model has the settings in the report's ``session`` section.
    ``eager``: PyTorch's latency, timed earlier (default: now, which is only right while no
    ORT session has run in this process)."""
    from graphopt.export import make_session, measure_latency, to_onnx
    from graphopt.export import run as ort_run

    inputs = inputs if inputs is not None else benchmark_inputs(loaded, options.bench_batch, bench_seq(options, result.recipe))
    model = loaded.model
    rows: dict[str, dict[str, Any]] = {}
    runtime = result.recipe.runtime
    eager = eager if eager is not None else eager_latency(model, inputs, options.bench_repeat)
    rows[EAGER] = {**_latency(eager), "size_mb": _state_dict_mb(model)}

    # name -> (session factory, bytes). Sessions are opened one at a time: an idle ORT
    # session's spinning threads slow the one being timed (graphopt.export.alternating_latency).
    sessions: dict[str, tuple[Callable[[], Any], int]] = {}
    if options.baseline_onnx:
        baseline_program = capture(model, kwargs=loaded.example_kwargs or {})
        baseline = to_onnx(baseline_program, Path(options.out_dir) / "baseline" / "model.onnx")
        # on the recipe's runtime and precision: the plain export is what graphopt must beat there
        sessions[baseline_label(runtime)] = (lambda: make_session(baseline.path, provider=runtime.provider, threads=threads, precision=runtime.precision),
                                               baseline.bytes)
    disabled = result.report.sections.get("session", {}).get("disabled_optimizers")
    sessions[OURS] = (
        lambda: make_session(result.exported.path, provider=runtime.provider, threads=threads, graph_optimization=runtime.graph_optimization, disabled_optimizers=disabled,
                             precision=runtime.precision),
        result.exported.bytes,
    )

    for name, (open_session, size) in sessions.items():
        session = open_session()
        feed = {k: v for k, v in inputs.items() if k in {i.name for i in session.get_inputs()}}
        latency = measure_latency(functools.partial(ort_run, session, feed), repeat=options.bench_repeat)
        rows[name] = {**_latency(latency), "size_mb": size / 1e6}
        del session
    for row in rows.values():
        row["speedup_vs_eager"] = eager["p50_ms"] / row["p50_ms"]

    if loaded.tokenizer is not None and splits is not None and splits.heldout:
        heldout_fidelity(loaded, {name: open_session for name, (open_session, _) in sessions.items()}, list(splits.heldout), rows, halves=options.heldout_halves,
                         max_length=result.recipe.data.max_length)
    return rows


def heldout_fidelity(loaded, sessions: dict[str, Callable[[], Any]], sentences: list[str], rows: dict[str, dict[str, Any]], *, halves: bool = False,
                     max_length: int = 128) -> None:
    """Held-out fidelity of every ORT session against the PyTorch model, into ``rows``.

    With ``halves`` (recipe search) the held-out texts are split in two
    (:func:`graphopt.data.halves`): ``selection_*`` figures come from the half a search
    chooses on, the quoted ``heldout_*`` ones from the other half, which no choice saw."""
    from graphopt.data import halves as split_halves
    from graphopt.fidelity import embedding_fidelity, encode

    names = list(loaded.example_kwargs or {}) or None
    reference = encode(loaded.model, loaded.tokenizer, sentences, input_names=names, max_length=max_length)
    selection, quoted = split_halves(sentences) if halves else ([], sentences)
    index = {s: i for i, s in enumerate(sentences)}
    parts = {"heldout": [index[s] for s in quoted], "selection": [index[s] for s in selection]}
    for name, open_session in sessions.items():
        candidate = encode(_session_encoder(open_session()), loaded.tokenizer, sentences, input_names=names, max_length=max_length)
        for prefix, rows_of in parts.items():
            if rows_of:
                rows[name].update(_fidelity_row(prefix, embedding_fidelity(reference[rows_of], candidate[rows_of])))
    for prefix, rows_of in parts.items():
        if rows_of:  # the reference against itself
            rows[EAGER].update(_fidelity_row(prefix, {"mean_cosine": 1.0, "min_cosine": 1.0, "spearman": 1.0, "n": len(rows_of)}))


def _fidelity_row(prefix: str, figures: dict[str, Any]) -> dict[str, Any]:
    row = {f"{prefix}_mean_cos": figures.get("mean_cosine"), f"{prefix}_min_cos": figures.get("min_cosine"), f"{prefix}_n": figures.get("n")}
    row["spearman" if prefix == "heldout" else f"{prefix}_spearman"] = figures.get("spearman")
    return row


def _resolve_precision(recipe: Recipe, say: Callable[[str], None]) -> Recipe:
    """The recipe with ``runtime.precision = "auto"`` replaced by what this machine's runtime
    runs at, so the report, the gates and the bundle all name the precision that was used."""
    if recipe.runtime.precision != "auto":
        return recipe
    from graphopt.export.session import resolve_precision

    precision = resolve_precision(recipe.runtime.provider, "auto")
    say(f"[graphopt] runtime.precision 'auto' -> {precision!r} on this machine ({recipe.runtime.provider})")
    return recipe.model_copy(update={"runtime": recipe.runtime.model_copy(update={"precision": precision})})


def session_settings(runtime, path: str | os.PathLike, inputs: dict, threads: int) -> dict[str, Any]:
    """The ORT session a model at ``path`` is deployed with under the recipe's ``runtime``
    settings: the transformers to leave out are measured on the model when the recipe says
    ``"auto"`` (with the trials), else taken as the recipe names them."""
    import onnx

    from graphopt.export import tune_disabled_optimizers
    from graphopt.export.session import resolve_disabled_optimizers

    section: dict[str, Any] = {"provider": runtime.provider, "threads": threads, "graph_optimization": runtime.graph_optimization, "precision": runtime.precision}
    if runtime.precision != "fp32":
        section["parity_precision"] = "fp32"  # parity checks the export; the held-out gates measure the bf16 run
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
    ours = rows.get(OURS, {})
    failures = _shared_gates(recipe, result)
    if "decoder" in result.program.meta:
        return failures + _decoder_gates(recipe, ours)
    final = result.report.final_drift or {}
    if gates.min_cosine is not None and isinstance(final.get("cosine"), float) and final["cosine"] < gates.min_cosine:
        failures.append(f"min_cosine: outputs cosine {final['cosine']:.6f} < {gates.min_cosine}")
    _gate_min(failures, "min_heldout_cosine", ours.get("heldout_mean_cos"), gates.min_heldout_cosine, "held-out mean cosine")
    _gate_min(failures, "min_speedup", ours.get("speedup_vs_eager"), gates.min_speedup, "ORT speed-up over PyTorch eager fp32")
    if gates.max_latency_ms is not None and ours.get("p50_ms") is not None and ours["p50_ms"] > gates.max_latency_ms:
        failures.append(f"max_latency_ms: p50 {ours['p50_ms']:.2f} ms > {gates.max_latency_ms} ms")
    return failures


ENCODER_GATES = {"min_heldout_cosine": "held-out cosine of mean-pooled embeddings is an encoder's measure; a decoder is gated by min_token_agreement and max_perplexity_ratio"}
DECODER_GATES = {"min_token_agreement": "next-token agreement is a decoder's measure; an encoder is gated by min_heldout_cosine",
                 "max_perplexity_ratio": "perplexity is a decoder's measure; an encoder is gated by min_heldout_cosine"}


def gates_not_applied(recipe: Recipe, *, is_decoder: bool) -> list[str]:
    """The recipe's gates that do not apply to this kind of model, each with the reason (the
    presets carry encoder gates, and a decoder build must say it did not check them)."""
    other = ENCODER_GATES if is_decoder else DECODER_GATES
    return [f"{key} = {getattr(recipe.gates, key)}: {why}" for key, why in other.items() if getattr(recipe.gates, key) is not None]


def _shared_gates(recipe: Recipe, result: OptimizeResult) -> list[str]:
    """The gates of every build, encoder or decoder: parity, an export, the file size."""
    gates = recipe.gates
    failures: list[str] = []
    if gates.require_parity and result.report.sections.get("parity", {}).get("passed") is False:
        failures.append("ORT parity failed (see parity section)")
    if gates.require_parity and result.exported is None:
        failures.append("the model was not exported")
    if gates.max_size_mb is not None and result.exported is not None and result.exported.bytes / 1e6 > gates.max_size_mb:
        failures.append(f"max_size_mb: {result.exported.bytes / 1e6:.1f} MB > {gates.max_size_mb} MB")
    return failures


def _decoder_gates(recipe: Recipe, ours: dict[str, Any]) -> list[str]:
    """A decoder's own gates: next-token agreement and perplexity ratio on held-out text,
    decode speed-up over PyTorch's own cached generation, prefill latency. The embedding
    gates (``min_heldout_cosine``) are an encoder's and do not apply: :func:`gates_not_applied`
    lists them in the report."""
    gates = recipe.gates
    failures: list[str] = []
    _gate_min(failures, "min_token_agreement", ours.get("heldout_agreement"), gates.min_token_agreement, "held-out next-token agreement")
    if gates.max_perplexity_ratio is not None:
        ratio = ours.get("heldout_ppl_ratio")
        if ratio is None:
            failures.append("max_perplexity_ratio: the held-out perplexity ratio was not measured")
        elif ratio > gates.max_perplexity_ratio:
            failures.append(f"max_perplexity_ratio: held-out perplexity ratio {ratio:.4f} > {gates.max_perplexity_ratio}")
    _gate_min(failures, "min_speedup", ours.get("decode_speedup_vs_eager"), gates.min_speedup, "decode tokens/s over PyTorch eager fp32 generate")
    if gates.max_latency_ms is not None and ours.get("prefill_ms") is not None and ours["prefill_ms"] > gates.max_latency_ms:
        failures.append(f"max_latency_ms: prefill {ours['prefill_ms']:.2f} ms > {gates.max_latency_ms} ms")
    return failures


def _gate_min(failures: list[str], key: str, value: float | None, bound: float | None, what: str) -> None:
    if bound is None:
        return
    if value is None:
        failures.append(f"{key}: {what} was not measured")
    elif value < bound:
        failures.append(f"{key}: {what} {value:.4f} < {bound}")


DECODER_COLUMNS = [("prefill ms", "prefill_ms", ".2f"), ("decode tokens/s", "decode_tokens_per_s", ".1f"), ("decode × eager", "decode_speedup_vs_eager", ".2f"),
                   ("size MB", "size_mb", ".1f"), ("held-out next-token agreement", "heldout_agreement", ".4f"), ("perplexity ratio", "heldout_ppl_ratio", ".4f")]


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    if any("decode_tokens_per_s" in row for row in rows.values()):
        return _table(rows, DECODER_COLUMNS)
    columns = [("p50 ms", "p50_ms", ".2f"), ("p90 ms", "p90_ms", ".2f"), ("speed-up vs eager", "speedup_vs_eager", ".2f"), ("size MB", "size_mb", ".1f"),
               ("held-out mean cos", "heldout_mean_cos", ".6f"), ("min cos", "heldout_min_cos", ".6f"), ("spearman", "spearman", ".6f")]
    if any("selection_mean_cos" in row for row in rows.values()):  # search: the half it chose on, beside the quoted half
        columns.append(("selection-half mean cos", "selection_mean_cos", ".6f"))
    return _table(rows, columns)


def _table(rows: dict[str, dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    lines = ["| | " + " | ".join(c[0] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        cells = [format(row[k], f) if isinstance(row.get(k), (int, float)) else "" for _, k, f in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = [
    "BuildOptions",
    "BuildResult",
    "benchmark_inputs",
    "build",
    "build_context",
    "build_splits",
    "capture_problem",
    "eager_latency",
    "evaluate_gates",
    "export_and_check",
    "format_table",
    "gates_not_applied",
    "heldout_fidelity",
    "measure",
    "session_settings",
]

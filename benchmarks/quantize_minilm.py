"""graphopt's quantize modes on all-MiniLM-L6-v2 against PyTorch and ONNX Runtime baselines.

    python benchmarks/quantize_minilm.py [--threads 2] [--rounds 10] [--heldout 128]

Everything is measured in one process, on one machine, in one run:

* PyTorch eager fp32, and ``torch.ao.quantization.quantize_dynamic`` (int8 ``nn.Linear``);
* ORT fp32 (graphopt's plain export);
* ORT's strongest int8 path: the TorchScript export (which its transformer optimizer fuses
  best: Attention, EmbedLayerNormalization, SkipLayerNormalization, BiasGelu), then
  ``onnxruntime.quantization.quantize_dynamic`` with per-channel int8 weights;
* each graphopt mode (``quantize`` calibrated on training sentences through a PassContext,
  then the ``int8-attention`` and ``bias-gelu`` fusions a recipe orders after it), exported
  with graphopt.export.to_onnx.

Latency: batch 1 and 8, sequence 128, ``--threads`` intra-op threads. Variants are timed
in alternating rounds (every variant a few runs per round) so that load from other
processes falls on all of them alike; p50 / p90 over all runs. The PyTorch variants form
their own group, timed before any ORT session exists; ORT variants are timed with one
session alive at a time (an idle session's spinning threads slow the one being timed). Fidelity: mean-pooled
embeddings of held-out ``pydoc_data.topics`` sentences (never used for calibration) against
PyTorch fp32: mean / min cosine and the Spearman correlation of pairwise similarities.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from baselines import ort_int8_baseline, ort_variant, state_dict_bytes, torch_variant

import graphopt
from graphopt.build import benchmark_inputs
from graphopt.context import PassContext
from graphopt.data import batches, heldout_sentences, train_sentences
from graphopt.export import alternating_latency, interleaved_latency, to_onnx
from graphopt.export.session import resolve_disabled_optimizers
from graphopt.fidelity import compare_encoders
from graphopt.models import load_model
from graphopt.passes.bias_gelu import BiasGelu
from graphopt.passes.fused_attention import FusedAttention
from graphopt.passes.int8_attention import Int8Attention
from graphopt.passes.quantize import Quantize
from graphopt.passes.sdpa import AttentionToSDPA
from graphopt.quant.cpu import cpu_int8_support

ORT_INT8 = "ORT optimizer + int8 per-channel"
TORCH_VARIANTS = ["PyTorch eager fp32", "torch quantize_dynamic"]
GRAPHOPT_MODES = {
    # name: quantize options (the program went through the exact `sdpa` pass first)
    "graphopt int8 dynamic, all layers": dict(embeddings=True),
    "graphopt int8 dynamic, most sensitive fp32": dict(embeddings=True, sensitivity=True, keep=1),
    "graphopt int8 dynamic, 2 most sensitive fp32": dict(embeddings=True, sensitivity=True, keep=2),
    "graphopt int8 dynamic, 3 most sensitive fp32": dict(embeddings=True, sensitivity=True, keep=3),
    "graphopt int8 dynamic, 3 most sensitive int8 weight-only": dict(embeddings=True, sensitivity=True, keep=3, fallback="int8_weight_only"),
    "graphopt int8 static, all layers": dict(mode="static", embeddings=True),
    "graphopt int4 weight-only g32, int4 embeddings": dict(mode="weight_only", bits=4, group_size=32, embeddings=True, embedding_bits=4),
    "graphopt int4 weight-only g32 GPTQ, int4 embeddings": dict(mode="weight_only", bits=4, group_size=32, gptq=True, embeddings=True, embedding_bits=4),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    parser.add_argument("--runs-per-round", type=int, default=3)
    parser.add_argument("--heldout", type=int, default=128, help="held-out sentences for fidelity")
    parser.add_argument("--calibration", type=int, default=32, help="training sentences for calibration / sensitivity")
    parser.add_argument("--modes", nargs="*", default=list(GRAPHOPT_MODES), help="graphopt modes to include")
    parser.add_argument("--out", type=Path, default=None, help="folder for the models and results.json")
    parser.add_argument("--ort-default-fusions", action="store_true",
                        help="graphopt sessions keep every ORT fusion (default: leave out those measured slow, as a graphopt deployment does)")
    args = parser.parse_args(argv)
    disabled = None if args.ort_default_fusions else "auto"

    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="quantize_minilm_"))
    out.mkdir(parents=True, exist_ok=True)
    say(f"machine: {platform.machine()}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"int8: {cpu_int8_support().to_dict()}, load {os.getloadavg()}")

    loaded = load_model("minilm")
    model, tokenizer = loaded.model, loaded.tokenizer
    names = list(loaded.example_kwargs)
    program = graphopt.capture(model, kwargs=loaded.example_kwargs)
    fp32_program = program.clone()
    AttentionToSDPA()(program)  # exact; lets int8-attention fuse Q/K/V + attention
    ctx = calibration_context(tokenizer, train_sentences(args.calibration, source="topics"), names)
    heldout = heldout_sentences(args.heldout, source="topics")

    variants: dict[str, dict] = {}  # name -> {"fn_for": batch -> callable, "encoder": callable, "bytes": int, "info": str}
    variants["PyTorch eager fp32"] = torch_variant(model, state_dict_bytes(model))
    qmodel = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    variants["torch quantize_dynamic"] = torch_variant(qmodel, state_dict_bytes(qmodel))

    fp32 = to_onnx(fp32_program, out / "fp32" / "model.onnx")
    variants["ORT fp32"] = ort_variant(fp32.path, args.threads)
    lossless = program.clone()
    FusedAttention()(lossless)
    BiasGelu()(lossless)
    fused = to_onnx(lossless, out / "fp32_fused" / "model.onnx")
    variants["graphopt fp32 (fused attention, bias-gelu)"] = ort_variant(fused.path, args.threads, disabled_optimizers=disabled)
    ort_int8 = ort_int8_baseline(model, loaded.example_kwargs, out / "ort_int8", fp32.path, say=say)
    variants[ORT_INT8] = ort_variant(ort_int8, args.threads)

    for mode in args.modes:
        options = GRAPHOPT_MODES[mode]
        start = time.perf_counter()
        candidate = program.clone()
        result = Quantize(**options)(candidate, ctx)
        attention = Int8Attention()(candidate, ctx)  # the fusions a recipe orders after quantize
        BiasGelu()(candidate, ctx)
        seconds = time.perf_counter() - start
        exported = to_onnx(candidate, out / mode.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "") / "model.onnx")
        plan = result.info.plan
        kept = [k.module_path for k in plan.kept_at_fallback] if plan else []
        note = (f"{result.info.replaced} layers {result.info.scheme} ({attention.info.fused} attention blocks fused), "
                f"{len(kept)} kept at {options.get('fallback', 'fp32')}, passes {seconds:.0f} s")
        variants[mode] = ort_variant(exported.path, args.threads, note=note, kept=kept, disabled_optimizers=disabled)

    say("fidelity on held-out sentences ...")
    for name, variant in variants.items():
        if name == "PyTorch eager fp32":
            variant["fidelity"] = {"mean_cosine": 1.0, "min_cosine": 1.0, "spearman": 1.0}
            continue
        variant["fidelity"] = compare_encoders(model, variant["encoder"], tokenizer, heldout, input_names=names)

    for variant in variants.values():
        if "release" in variant:
            variant["release"]()  # the fidelity sessions must not be alive during timing
    rows = {name: {"size_mb": v["bytes"] / 1e6, **{k: v["fidelity"][k] for k in ("mean_cosine", "min_cosine", "spearman")}} for name, v in variants.items()}
    load_before = os.getloadavg()
    for batch in args.batches:
        inputs = benchmark_inputs(loaded, batch, args.seq)
        say(f"timing batch {batch} ...")
        # PyTorch and ORT are timed as two groups: ORT's intra-op threads spin for a while after
        # each run and starve PyTorch's thread pool if the two alternate.
        latency = interleaved_latency({name: variants[name]["fn_for"](inputs) for name in TORCH_VARIANTS}, args.rounds, args.runs_per_round)
        # ORT: one session alive at a time (idle sessions' spinning thread pools would slow
        # the one being timed); per-round session creation is not timed.
        ort_names = [n for n in variants if n not in TORCH_VARIANTS]
        stats = alternating_latency({name: (lambda n=name, inputs=inputs: variants[n]["fn_for"](inputs)) for name in ort_names}, args.rounds, args.runs_per_round)
        latency.update(stats)
        for name, stats in latency.items():
            rows[name][f"b{batch}_p50"] = stats["p50_ms"]
            rows[name][f"b{batch}_p90"] = stats["p90_ms"]
        for name in rows:
            rows[name][f"b{batch}_x_eager"] = rows["PyTorch eager fp32"][f"b{batch}_p50"] / rows[name][f"b{batch}_p50"]
            rows[name][f"b{batch}_x_ort_int8"] = rows[ORT_INT8][f"b{batch}_p50"] / rows[name][f"b{batch}_p50"]
    load_after = os.getloadavg()

    print()
    print(format_table(rows, args.batches))
    print()
    print(f"load average (1/5/15 min) before timing {tuple(round(x, 2) for x in load_before)}, after {tuple(round(x, 2) for x in load_after)}; "
          f"{args.threads} threads; fp32 file {variants['ORT fp32']['bytes'] / 1e6:.1f} MB; graphopt sessions leave out ORT fusions: "
          f"{resolve_disabled_optimizers(disabled) or 'none'}")
    for name, variant in variants.items():
        if variant.get("note"):
            print(f"- {name}: {variant['note']}" + (f"; kept: {', '.join(variant['kept'])}" if variant.get("kept") else ""))
    (out / "results.json").write_text(json.dumps({"rows": rows, "load": [load_before, load_after], "argv": sys.argv}, indent=2))
    print(f"models and results.json in {out}")
    return 0


def calibration_context(tokenizer, sentences: list[str], names: list[str]) -> PassContext:
    """Training sentences in batches of 16 (the tensors the program takes) as the passes' calibration data."""
    data = tuple(((), {k: v for k, v in batch.items() if k in names}) for batch in batches(tokenizer, sentences, batch_size=16))
    return PassContext(calibration=data, calibration_source=f"{len(sentences)} training sentences (pydoc topics)", tokenizer=tokenizer)


# ---- timing and output -----------------------------------------------------------------------
def format_table(rows: dict[str, dict], batches: list[int]) -> str:
    headers = ["variant"]
    for b in batches:
        headers += [f"b{b} p50 ms", f"b{b} p90 ms", f"b{b} × eager", f"b{b} × ORT int8"]
    headers += ["size MB", "mean cos", "min cos", "spearman"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for name, row in rows.items():
        cells = [name]
        for b in batches:
            cells += [f"{row[f'b{b}_p50']:.1f}", f"{row[f'b{b}_p90']:.1f}", f"{row[f'b{b}_x_eager']:.2f}", f"{row[f'b{b}_x_ort_int8']:.2f}"]
        cells += [f"{row['size_mb']:.1f}", f"{row['mean_cosine']:.4f}", f"{row['min_cosine']:.4f}", f"{row['spearman']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def say(message: str) -> None:
    print(f"[quantize_minilm] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())

"""Structured pruning of all-MiniLM-L6-v2: parameters, ORT fp32 latency, held-out fidelity.

    python benchmarks/prune_minilm.py [--importance l2] [--batch 1 --seq 128] [--threads 1]

Every plan is captured once (eager attention → SDPA, exact), pruned with importance
computed on training sentences only (the context's calibration batches; latency-aware
plans time blocks on ONNX Runtime through the context's block timer), exported to ONNX, checked against the PyTorch
program in ONNX Runtime, and timed in the same process as the unpruned model, in
alternating rounds with one ORT session alive at a time (per-round ratios, so load from
other processes hits both sides of a ratio alike). Fidelity is the
mean cosine between mean-pooled sentence embeddings of the original model and the pruned
program on held-out sentences, before any recovery training.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import graphopt
from graphopt.api import default_services
from graphopt.context import PassContext
from graphopt.data import batches, train_sentences
from graphopt.datasets import load_splits, text_context
from graphopt.export import alternating_latency, check_parity, make_session, to_onnx
from graphopt.export.session import resolve_disabled_optimizers
from graphopt.fidelity import compare_encoders
from graphopt.models import example_inputs, load_model
from graphopt.passes.prune import Prune
from graphopt.passes.sdpa import AttentionToSDPA

PLANS = {
    "unpruned": {},
    "heads-25% + FFN-50%": {"heads": 0.25, "ffn": 0.5},
    "heads-50% + FFN-75%": {"heads": 0.5, "ffn": 0.75},
}
LATENCY_AWARE = {f"{name}, latency-aware": {**plan, "latency_aware": True} for name, plan in list(PLANS.items())[1:]}


def build(loaded, plan: dict, importance: str, ctx: PassContext, fused: bool = False, fuse_gelu: bool = False) -> tuple[graphopt.Program, dict]:
    program = graphopt.capture(loaded.model, kwargs=example_inputs(loaded.tokenizer))
    AttentionToSDPA()(program)
    info: dict = {}
    if plan:
        start = time.perf_counter()
        result = Prune(importance=importance, **plan)(program, ctx)
        assert result.modified, result.reason
        info = dict(result.info.model_dump(), prune_seconds=time.perf_counter() - start)
    if fused:  # after pruning: the fused op hides the head axis from the dependency analysis
        from graphopt.passes.fused_attention import FusedAttention

        assert FusedAttention()(program).modified
    if fuse_gelu:
        from graphopt.passes.bias_gelu import BiasGelu

        assert BiasGelu()(program).modified
    return program, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--importance", default="taylor", choices=["l1", "l2", "taylor", "activation"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per model per round")
    parser.add_argument("--heldout", type=int, default=256, help="held-out sentences for fidelity")
    parser.add_argument("--criteria", action="store_true", help="also compare the fidelity of every importance criterion")
    parser.add_argument("--no-latency-aware", action="store_true", help="leave out the latency-aware variants")
    parser.add_argument("--fused-attention", action="store_true", help="lower SDPA to ORT MultiHeadAttention (after pruning) in every model")
    parser.add_argument("--fuse", action="store_true", help="--fused-attention (Q/K/V packed) plus the bias-gelu pass, in every model")
    parser.add_argument("--ort-default-fusions", action="store_true", help="keep every ORT fusion (default: leave out those measured slow, KNOWN_SLOW_FUSIONS)")
    parser.add_argument("--per-layer", action="store_true", help="print every group's kept width, parameters and block latency")
    args = parser.parse_args()
    args.fused_attention = args.fused_attention or args.fuse
    disabled = None if args.ort_default_fusions else "auto"
    torch.manual_seed(0)
    print(f"load before: {os.getloadavg()}  cpu: {torch.backends.cpu.get_cpu_capability()}  threads: {args.threads}")

    loaded = load_model("minilm")
    splits = load_splits(calibration=128, heldout=args.heldout)
    # Calibration batches from training sentences, never the held-out ones; ORT's block timer.
    ctx = text_context(loaded.tokenizer, splits, list(loaded.example_kwargs or {}), services=default_services())
    heldout = list(splits.heldout)
    feed = _timing_inputs(loaded.tokenizer, args.batch, args.seq)
    rows, sessions = [], {}
    with tempfile.TemporaryDirectory() as folder:
        plans = dict(PLANS) if args.no_latency_aware else {**PLANS, **LATENCY_AWARE}
        for name, plan in plans.items():
            plan = dict(plan, latency_tokens=args.batch * args.seq, latency_threads=args.threads) if plan.get("latency_aware") else plan
            program, info = build(loaded, plan, args.importance, ctx, args.fused_attention, args.fuse)
            exported = to_onnx(program, Path(folder) / f"{len(sessions)}.onnx")
            check_parity(program, exported.path, atol=1e-4, rtol=1e-3)
            sessions[name] = exported.path
            fidelity = compare_encoders(loaded.model, program, loaded.tokenizer, heldout)
            rows.append({"plan": name, "params": program.parameter_stats()["parameters"], "onnx_mb": exported.bytes / 2**20,
                         "cosine": fidelity["mean_cosine"], "spearman": fidelity["spearman"], "info": info})
        latency, speedup = _alternating(sessions, feed, args.rounds, args.runs, args.threads, disabled)
    latency_all = latency
    print(f"load after: {os.getloadavg()}")
    print(f"\nMiniLM-L6 (all-MiniLM-L6-v2), ORT CPU fp32, batch {args.batch} x seq {args.seq}, {args.threads} thread(s), "
          f"importance={args.importance}, attention={'fused (Attention / MultiHeadAttention)' if args.fused_attention else 'exporter decomposition'}, "
          f"bias-gelu={'on' if args.fuse else 'off'}, ORT fusions left out: {','.join(resolve_disabled_optimizers(disabled)) or 'none'}, "
          f"held-out n={len(heldout)}\n")
    print("| plan | parameters | ONNX MB | ORT p50 ms | speed-up (median of rounds) | held-out cosine | spearman |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        ms = latency[row["plan"]]
        print(f"| {row['plan']} | {row['params'] / 1e6:.2f} M | {row['onnx_mb']:.1f} | {ms:.2f} | {speedup[row['plan']]:.2f}x | "
              f"{row['cosine']:.4f} | {row['spearman']:.4f} |")
    for row in rows:
        latency = row["info"].get("latency")
        if latency:
            print(f"\n{row['plan']}: matmul blocks predicted {latency['predicted_full_ms']:.2f} ms unpruned -> "
                  f"{latency['predicted_planned_ms']:.2f} ms planned -> {latency['predicted_chosen_ms']:.2f} ms chosen "
                  f"(measured end to end: {latency_of(rows, latency_ms=latency_all, name=row['plan'])})")
    if args.per_layer:
        for row in rows[1:]:
            print(f"\n{row['plan']}:\n\n| group | module | kept / size | params before -> after | block ms (full -> kept) |")
            print("|---|---|---|---|---|")
            for g in row["info"]["groups"]:
                lat = g.get("latency_ms") or {}
                ms = f"{lat['full']:.3f} -> {lat['chosen']:.3f}" if lat else ""
                print(f"| {g['kind']} | {g['module_path']} | {g['kept']} / {g['size']} | {g['params_before']} -> {g['params_after']} | {ms} |")
    if args.criteria:
        print("\nheld-out cosine by importance criterion (no recovery):\n")
        print("| plan | " + " | ".join(["l1", "l2", "taylor", "activation"]) + " |")
        print("|---|---|---|---|---|")
        for name, plan in list(PLANS.items())[1:]:
            cells = []
            for criterion in ("l1", "l2", "taylor", "activation"):
                program, _ = build(loaded, plan, criterion, ctx)
                cells.append(f"{compare_encoders(loaded.model, program, loaded.tokenizer, heldout)['mean_cosine']:.4f}")
            print(f"| {name} | " + " | ".join(cells) + " |")


def latency_of(rows, *, latency_ms, name) -> str:
    base = latency_ms["unpruned"]
    return f"{base:.2f} ms -> {latency_ms[name]:.2f} ms"


def _timing_inputs(tokenizer, batch: int, seq: int) -> dict[str, np.ndarray]:
    sentences = train_sentences(batch * 4)
    encoded = next(batches(tokenizer, sentences, batch_size=batch, max_length=seq, padding="max_length"))
    return {k: v.numpy() for k, v in encoded.items()}


def _alternating(paths: dict, feed: dict, rounds: int, runs: int, threads: int, disabled) -> tuple[dict[str, float], dict[str, float]]:
    """Median latency per model, and the median over rounds of each round's speed-up against
    the first model. One ORT session is alive at a time (alternating_latency): idle sessions'
    spinning thread pools would otherwise slow whichever model is being timed."""

    def maker(path):
        session = make_session(path, threads=threads, disabled_optimizers=disabled)
        inputs = {i.name: feed[i.name] for i in session.get_inputs()}
        return lambda: session.run(None, inputs)

    stats = alternating_latency({name: (lambda p=path: maker(p)) for name, path in paths.items()}, rounds, runs)
    base = next(iter(stats))
    latency = {name: s["p50_ms"] for name, s in stats.items()}
    speedup = {name: statistics.median(b / v for b, v in zip(stats[base]["round_p50_ms"], s["round_p50_ms"])) for name, s in stats.items()}
    return latency, speedup


if __name__ == "__main__":
    main()

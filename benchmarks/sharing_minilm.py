"""Parameter sharing on all-MiniLM-L6-v2: layer sharing + distillation, weight clustering.

    # 6 -> 3 unique layers, distilled, then the embeddings clustered
    python benchmarks/sharing_minilm.py --compress "dce?,share-layers{unique=3}" --minutes 12 \
        --after "cluster{include=[embeddings.word_embeddings.weight],embedding_bits=4}"
    # everything clustered, no training
    python benchmarks/sharing_minilm.py --compress "dce?,cluster{bits=4,embedding_bits=3}"

Stages: ``--compress`` (fidelity measured), then ``distill{...}`` for ``--minutes`` (0: none),
then ``--after``. The passes' data is one PassContext: calibration and distillation on
training sentences, the (non-rejecting) budget measured on verification sentences, the
fp32 program as the distillation teacher, ``--out`` for artifacts. Both the fp32 program and the result are exported with
graphopt.export.to_onnx and measured in this one process: file bytes, ORT latency (batch 1
and 8, sequence 128, alternating rounds with one ORT session alive at a time), ORT parity
against the PyTorch program, whether ORT folded the cluster decode at session load, and
held-out fidelity of the ORT session's mean-pooled embeddings against PyTorch fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compress", default="dce?,share-layers{unique=3}")
    parser.add_argument("--minutes", type=float, default=0.0, help="distillation wall-clock limit (0: no distillation)")
    parser.add_argument("--after", default="", help="stages after distillation, e.g. cluster{...}")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--heldout", type=int, default=256)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", default="out/sharing_minilm")
    parser.add_argument("--distill-options", default="", help="more distill{...} options, e.g. 'pooled_cosine=1.0'")
    parser.add_argument("--strip-metadata", action="store_true", help="export the result without the exporter's per-node metadata")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import onnx

    import graphopt
    from graphopt.build import benchmark_inputs
    from graphopt.data import heldout_sentences
    from graphopt.datasets import load_splits, text_context
    from graphopt.export import alternating_latency, check_parity, make_session, to_onnx
    from graphopt.export import run as ort_run
    from graphopt.fidelity import compare_encoders
    from graphopt.models import load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model("minilm")
    names = list(loaded.example_kwargs)
    sentences = heldout_sentences(args.heldout)
    program = graphopt.capture(loaded.model, kwargs=loaded.example_kwargs)
    splits = load_splits(calibration=64, verification=64, heldout=0)  # held-out sentences: graphopt.data's, below
    ctx = text_context(loaded.tokenizer, splits, names, artifacts=out, teacher=program)
    budget = graphopt.Budget(min_cosine=0.0)  # measure, do not reject

    def fidelity(candidate) -> dict:
        return compare_encoders(loaded.model, candidate, loaded.tokenizer, sentences, input_names=names)

    summary: dict = {"threads": args.threads, "cpu_isa": torch.backends.cpu.get_cpu_capability(), "load_avg": os.getloadavg()}
    start = time.perf_counter()
    result = graphopt.optimize(program, args.compress, budget=budget, context=ctx)
    summary["compress"] = {"pipeline": args.compress, "seconds": round(time.perf_counter() - start, 1), "passes": _pass_info(result)}
    summary["compress"]["heldout"] = fidelity(result.program)
    say(f"after {args.compress}: held-out {_fmt(summary['compress']['heldout'])}")
    current = result.program

    if args.minutes > 0:
        distill = (f"distill{{steps={args.steps},lr={args.lr},batch_size={args.batch_size},eval_every=100,"
                   f"time_limit_s={args.minutes * 60},patience_steps=600{',' + args.distill_options if args.distill_options else ''}}}")
        start = time.perf_counter()
        recovered = graphopt.optimize(current, distill, budget=budget, context=ctx)  # the teacher: the fp32 program
        info = recovered.report.passes[0].info
        current = recovered.program
        summary["distill"] = {"pipeline": distill, "minutes": round((time.perf_counter() - start) / 60, 1),
                              "steps": info.get("steps"), "stopped": info.get("stopped"), "curve_png": info.get("curve_png")}
        summary["distill"]["heldout"] = fidelity(current)
        say(f"after distillation ({summary['distill']['minutes']} min, {info.get('steps')} steps): held-out {_fmt(summary['distill']['heldout'])}")
    if args.after:
        after = graphopt.optimize(current, args.after, budget=budget, context=ctx)
        summary["after"] = {"pipeline": args.after, "passes": _pass_info(after)}
        current = after.program

    fp32 = to_onnx(program, out / "fp32" / "model.onnx")
    final = to_onnx(current, out / "final" / "model.onnx", strip_metadata=args.strip_metadata)
    folded_path = out / "final" / "ort_optimized.onnx"
    session = make_session(final.path, threads=args.threads, optimized_model_path=folded_path)
    decode_ops = {"BitShift", "BitwiseAnd", "GatherElements"}
    left = [n.op_type for n in onnx.load(str(folded_path), load_external_data=False).graph.node if n.op_type in decode_ops]
    parity = check_parity(current, final.path, raise_on_failure=False)
    declared = {i.name for i in session.get_inputs()}

    def ort_encoder(**inputs):
        return torch.from_numpy(ort_run(session, {k: v for k, v in inputs.items() if k in declared})[0])

    summary["final"] = {
        "heldout_ort": fidelity(ort_encoder),
        "fp32_bytes": fp32.bytes,
        "bytes": final.bytes,
        "size_ratio": round(final.bytes / fp32.bytes, 4),
        "parameters": {"fp32": program.parameter_stats(), "final": current.parameter_stats()},
        "ort_parity_max_abs": max(o.max_abs for o in parity.results),
        "decode_ops_left_after_ort_load": len(left),
    }
    session = None  # timing keeps one ORT session alive at a time
    latency = {}
    for batch in (1, 8):
        inputs = {k: v.numpy() for k, v in benchmark_inputs(loaded, batch, 128).items()}

        def maker(path, i=inputs):
            s = make_session(path, threads=args.threads, disabled_optimizers="auto")
            feed = {k: v for k, v in i.items() if k in declared}
            return lambda: ort_run(s, feed)

        stats = alternating_latency({"fp32": lambda: maker(fp32.path), "final": lambda: maker(final.path)}, args.rounds, 5)
        latency[f"b{batch}"] = {k: {"p50_ms": v["p50_ms"], "p90_ms": v["p90_ms"]} for k, v in stats.items()}
        latency[f"b{batch}"]["ratio_p50"] = round(stats["final"]["p50_ms"] / stats["fp32"]["p50_ms"], 3)
    summary["final"]["ort_latency_seq128"] = latency
    summary["load_avg_end"] = os.getloadavg()
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    f = summary["final"]
    say(f"file {f['bytes'] / 1e6:.2f} MB vs fp32 {f['fp32_bytes'] / 1e6:.2f} MB (x{f['size_ratio']}); "
        f"ORT held-out {_fmt(f['heldout_ort'])}; parity max abs {f['ort_parity_max_abs']:.2e}; "
        f"decode ops left after ORT load: {f['decode_ops_left_after_ort_load']}; "
        f"latency final/fp32 p50: b1 {latency['b1']['ratio_p50']}, b8 {latency['b8']['ratio_p50']}; load {summary['load_avg']}")
    say(f"summary: {out / 'summary.json'}")


def _pass_info(result) -> list[dict]:
    keep = ("groups", "unique_layers", "bytes_saved", "clustered", "bytes_before", "bytes_after", "stack")
    return [{"pass": r.name, **{k: v for k, v in r.info.items() if k in keep}} for r in result.report.passes]


def _fmt(f: dict) -> str:
    return f"mean cos {f['mean_cosine']:.4f}, min {f['min_cosine']:.4f}, spearman {f['spearman']:.4f}"


def say(message: str) -> None:
    print(f"[sharing_minilm] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()

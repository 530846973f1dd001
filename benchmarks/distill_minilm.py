"""Recovery by distillation of a compressed MiniLM, measured on held-out sentences.

    python benchmarks/distill_minilm.py --prune "heads=0.25,ffn=0.5" --minutes 14

Pipeline: dce,sdpa,prune{...} (fidelity before recovery is measured on the held-out
sentences), then distill{...} through the same pass manager, with a wall-clock limit.
Prints fidelity before/after, steps, wall time; writes the curve PNG and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def heldout_fidelity(reference, candidate, tokenizer, sentences, names):
    from graphopt.fidelity import compare_encoders

    return compare_encoders(reference, lambda **kw: candidate(**kw), tokenizer, sentences, input_names=names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prune", default="heads=0.25,ffn=0.5", help="options of the prune stage")
    parser.add_argument("--extra", default="", help="more stages before distill, e.g. 'quantize{mode=dynamic}'")
    parser.add_argument("--minutes", type=float, default=14.0, help="wall-clock limit of the distill stage")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--heldout", type=int, default=256)
    parser.add_argument("--distill-options", default="", help="more distill{...} options, e.g. 'pooled_cosine=1.0'")
    parser.add_argument("--calibration", type=int, default=128, help="training sentences for the prune stage's importance")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--export", type=Path, default=None,
                        help="also write the recovered model as ONNX (after --after), e.g. for benchmarks/compare.py --bundle")
    parser.add_argument("--after", default="fused-attention,bias-gelu,dce", help="exact stages run before --export")
    parser.add_argument("--export-int8", type=Path, default=None,
                        help="also quantize the recovered model (int8 dynamic, embeddings too), measure it and write it as ONNX")
    parser.add_argument("--out", default="out/distill_minilm")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import graphopt
    from graphopt.build import calibration_batches
    from graphopt.data import heldout_sentences
    from graphopt.models import load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model("minilm")
    names = list(loaded.example_kwargs)
    sentences = heldout_sentences(args.heldout)
    program = graphopt.capture(loaded.model, kwargs=loaded.example_kwargs)
    program.meta["tokenizer"] = loaded.tokenizer
    program.meta["report_dir"] = str(out)
    # Importance (taylor / activation) is computed on training sentences, never held-out ones.
    program.meta["calibration"] = calibration_batches(loaded, args.calibration)

    stages = ["dce", "sdpa", f"prune{{{args.prune}}}" if args.prune else "", args.extra]
    compress = ",".join(s for s in stages if s)
    budget = graphopt.Budget(min_cosine=0.0)  # report, do not reject: recovery is the point
    compressed = graphopt.optimize(program, compress, budget=budget)
    before = heldout_fidelity(loaded.model, compressed.program, loaded.tokenizer, sentences, names)
    print(f"compressed ({compress}): held-out mean cosine {before['mean_cosine']:.4f}, min {before['min_cosine']:.4f}, spearman {before['spearman']:.4f}")

    distill = (
        f"distill{{steps={args.steps},lr={args.lr},batch_size={args.batch_size},eval_every={args.eval_every},"
        f"time_limit_s={args.minutes * 60},patience=6{',' + args.distill_options if args.distill_options else ''}}}"
    )
    compressed.program.teacher = program
    start = time.perf_counter()
    recovered = graphopt.optimize(compressed.program, distill, budget=budget)
    wall = time.perf_counter() - start
    record = recovered.report.passes[0]
    after = heldout_fidelity(loaded.model, recovered.program, loaded.tokenizer, sentences, names)
    info = record.info.get("distill", {})
    summary = {
        "compression": compress,
        "parameters": {"original": compressed.report.initial.parameters, "compressed": compressed.report.final.parameters},
        "heldout_before": before,
        "heldout_after": after,
        "steps": info.get("steps"),
        "stopped": info.get("stopped"),
        "distill_wall_s": round(wall, 1),
        "curve_png": info.get("curve_png"),
        "threads": args.threads,
        "cpu_isa": torch.backends.cpu.get_cpu_capability(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"after distillation ({info.get('steps')} steps, {wall / 60:.1f} min, {info.get('stopped')}): "
        f"held-out mean cosine {after['mean_cosine']:.4f}, min {after['min_cosine']:.4f}, spearman {after['spearman']:.4f}"
    )
    print(f"curve: {info.get('curve_png')}   summary: {out / 'summary.json'}")
    if args.export:
        deployed = graphopt.optimize(recovered.program, args.after) if args.after else recovered
        exported = deployed.export(args.export / "model.onnx")
        print(f"exported {exported.path} ({exported.bytes / 1e6:.1f} MB, ORT parity checked)")
    if args.export_int8:
        int8 = graphopt.optimize(recovered.program, f"quantize{{mode=dynamic,embeddings=true}},{args.after}", budget=budget)
        quantized = heldout_fidelity(loaded.model, int8.program, loaded.tokenizer, sentences, names)
        summary["heldout_int8"] = quantized
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        exported = int8.export(args.export_int8 / "model.onnx")
        print(f"int8 of the recovered model: held-out mean cosine {quantized['mean_cosine']:.4f}, min {quantized['min_cosine']:.4f}; "
              f"exported {exported.path} ({exported.bytes / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()

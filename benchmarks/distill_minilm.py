"""Recovery by distillation of a compressed MiniLM, measured on held-out sentences.

    python benchmarks/distill_minilm.py --prune "heads=0.25,ffn=0.5" --minutes 14

Pipeline: dce,sdpa,prune{...} (fidelity before recovery is measured on the held-out
sentences), then distill{...} through the same pass manager, with a wall-clock limit. One
text context serves both: calibration batches and training texts from the training part,
verification batches from the verification part; the distill stage's teacher is the
original program. Early stopping uses the distill stage's defaults unless
``--patience-steps`` / ``--min-steps`` / ``--eval-every`` say otherwise.
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

    return compare_encoders(reference, candidate, tokenizer, sentences, input_names=names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prune", default="heads=0.25,ffn=0.5", help="options of the prune stage")
    parser.add_argument("--extra", default="", help="more stages before distill, e.g. 'quantize{mode=dynamic}'")
    parser.add_argument("--minutes", type=float, default=14.0, help="wall-clock limit of the distill stage")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=None, help="distill's eval_every (default: the stage's)")
    parser.add_argument("--patience-steps", type=int, default=None, help="distill's patience_steps (default: the stage's)")
    parser.add_argument("--min-steps", type=int, default=None, help="distill's min_steps (default: half of --steps)")
    parser.add_argument("--heldout", type=int, default=256)
    parser.add_argument("--distill-options", default="", help="more distill{...} options, e.g. 'pooled_cosine=1.0'")
    parser.add_argument("--calibration", type=int, default=128, help="training sentences for the prune stage's importance")
    parser.add_argument("--training-texts", type=int, default=None, help="distill on this many training sentences (default: all)")
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
    from graphopt.datasets import load_splits, text_context
    from graphopt.models import load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model("minilm")
    names = list(loaded.example_kwargs)
    splits = load_splits(calibration=args.calibration, heldout=args.heldout)
    sentences = list(splits.heldout)
    program = graphopt.capture(loaded.model, kwargs=loaded.example_kwargs)
    # Importance (taylor / activation) and distillation use training sentences, never held-out ones.
    ctx = text_context(loaded.tokenizer, splits, names, artifacts=out)
    if args.training_texts is not None:
        ctx = ctx.replace(training_texts=ctx.training_texts[: args.training_texts])

    stages = ["dce", "sdpa", f"prune{{{args.prune}}}" if args.prune else "", args.extra]
    compress = ",".join(s for s in stages if s)
    budget = graphopt.Budget(min_cosine=0.0)  # report, do not reject: recovery is the point
    compressed = graphopt.optimize(program, compress, budget=budget, context=ctx)
    before = heldout_fidelity(loaded.model, compressed.program, loaded.tokenizer, sentences, names)
    print(f"compressed ({compress}): held-out mean cosine {before['mean_cosine']:.4f}, min {before['min_cosine']:.4f}, spearman {before['spearman']:.4f}")

    options = [f"steps={args.steps}", f"lr={args.lr}", f"batch_size={args.batch_size}", f"time_limit_s={args.minutes * 60}"]
    options += [f"{key}={value}" for key, value in (("eval_every", args.eval_every), ("patience_steps", args.patience_steps),
                                                    ("min_steps", args.min_steps)) if value is not None]
    distill = f"distill{{{','.join(options + ([args.distill_options] if args.distill_options else []))}}}"
    start = time.perf_counter()
    # the teacher is the original program, not this stage's input (optimize's default)
    recovered = graphopt.optimize(compressed.program, distill, budget=budget, context=ctx.replace(teacher=program))
    wall = time.perf_counter() - start
    record = recovered.report.passes[0]
    after = heldout_fidelity(loaded.model, recovered.program, loaded.tokenizer, sentences, names)
    info = record.info
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
        deployed = graphopt.optimize(recovered.program, args.after, context=ctx) if args.after else recovered
        exported = deployed.export(args.export / "model.onnx")
        print(f"exported {exported.path} ({exported.bytes / 1e6:.1f} MB, ORT parity checked)")
    if args.export_int8:
        int8 = graphopt.optimize(recovered.program, f"quantize{{mode=dynamic,embeddings=true}},{args.after}", budget=budget, context=ctx)
        quantized = heldout_fidelity(loaded.model, int8.program, loaded.tokenizer, sentences, names)
        summary["heldout_int8"] = quantized
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        exported = int8.export(args.export_int8 / "model.onnx")
        print(f"int8 of the recovered model: held-out mean cosine {quantized['mean_cosine']:.4f}, min {quantized['min_cosine']:.4f}; "
              f"exported {exported.path} ({exported.bytes / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()

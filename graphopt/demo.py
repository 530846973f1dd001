"""The demo: MiniLM → default recipe → ONNX → ONNX Runtime, before/after table.

Run with ``bash scripts/demo.sh`` (sets everything up) or ``python -m graphopt.demo``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="graphopt-demo", description=__doc__)
    parser.add_argument("--out", default="out/demo")
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--heldout", type=int, default=128, help="held-out texts the fidelity columns are measured on")
    parser.add_argument("--data", help="your own text instead of the standard library's: .txt, .jsonl, .csv or a datasets folder")
    parser.add_argument("--data-column", help="JSONL field / CSV or dataset column of --data (default: 'text')")
    parser.add_argument("--bench-repeat", type=int, default=30, help="timed runs per variant")
    parser.add_argument("--no-baseline", action="store_true", help="leave out the plain ORT export")
    args = parser.parse_args(argv)

    from graphopt.build import BuildOptions, build, format_table
    from graphopt.models import load_model
    from graphopt.recipe import Recipe

    say = lambda msg: print(msg, file=sys.stderr)
    loaded = load_model("minilm", attn_implementation="eager")
    recipe = Recipe.load(args.recipe)
    if args.data is not None:
        recipe = recipe.with_data(args.data, args.data_column)
    options = BuildOptions(out_dir=Path(args.out), threads=args.threads, heldout=args.heldout, bench_repeat=args.bench_repeat, baseline_onnx=not args.no_baseline)
    outcome = build(loaded, recipe, options, say=say)
    report = outcome.result.report
    print(f"\ngraphopt demo: {loaded.name}, recipe '{recipe.name}': {recipe.pipeline_text()}")
    data = outcome.splits.description if outcome.splits is not None else "seeded random inputs"
    print(f"latency: batch 1, sequence 128, warm, same process; fidelity: mean-pooled embeddings on the held-out texts of {data}\n")
    print(format_table(outcome.rows))
    applied = [r.text for r in report.passes if r.status == "applied"]
    print(f"\npasses applied: {', '.join(applied) or 'none'}; rolled back: {len(report.rolled_back())}")
    print(f"report: {Path(args.out) / 'report.md'}   model: {Path(args.out) / 'model.onnx'}")
    for failure in report.failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The ``graphopt`` command line: optimize, passes, inspect, repro.

Exit codes: 0 success; 1 the build failed: a gate, a pass, a requested pass that changed
nothing, a capture that fell back to symbolic_trace under passes that need ATen, or ORT
parity; 2 bad usage (unknown pass, wrong recipe key, model or data not found, a tokenizer
that does not load, data too small to split).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    from graphopt.errors import ConfigError, GraphoptError

    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"graphopt: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except GraphoptError as exc:
        print(f"graphopt: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if type(exc).__name__ in ("ModelLoadError", "MissingExtraError") else EXIT_FAILED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphopt", description="Optimize PyTorch transformers for ONNX Runtime, verified pass by pass.")
    sub = parser.add_subparsers(dest="command")

    opt = sub.add_parser("optimize", help="capture, optimize, export and measure a model (a deployment build step)")
    opt.add_argument("--model", required=True, help="Hugging Face model directory, 'minilm' (bundled), or 'module:factory'")
    opt.add_argument("--recipe", default="default", help="recipe TOML file or preset name (default: %(default)s)")
    opt.add_argument("--pipeline", help="textual pipeline overriding the recipe's, e.g. 'dce,dedup,sdpa'")
    opt.add_argument("--out", required=True, help="output folder: model.onnx, report.json, report.md")
    opt.add_argument("--attn", default="eager", choices=["eager", "sdpa"], help="attention implementation to load HF models with")
    opt.add_argument("--threads", type=int, help="threads for PyTorch and ORT (default: recipe, else all cores)")
    opt.add_argument("--bench-batch", type=int, default=1)
    opt.add_argument("--bench-seq", type=int, default=None, help="benchmark sequence length (default: the recipe's [data] passage_tokens, else 128)")
    opt.add_argument("--bench-repeat", type=int, default=30)
    opt.add_argument("--data", metavar="PATH",
                     help="the user's text to calibrate, verify and gate on, overriding the recipe's [data] source: a .txt file "
                          "(one text per line), .jsonl (field 'text' unless --data-column), .csv/.tsv (column 'text' unless "
                          "--data-column) or a folder written by datasets' save_to_disk (needs `pip install datasets`); "
                          "split by content hash into training / verification / held-out. Default: the recipe's, else the "
                          "standard-library text ('stdlib')")
    opt.add_argument("--data-column", "--data-field", dest="data_column", metavar="NAME", help="JSONL field, CSV column or dataset column of --data (default: 'text')")
    opt.add_argument("--heldout", type=int, help="held-out texts for fidelity (default: the recipe's [data] heldout, 64; 0: skip)")
    opt.add_argument("--calibration", type=int,
                     help="training texts for calibrated passes: quantize, prune importance and reconstruction (default: the recipe's [data] calibration, 64)")
    opt.add_argument("--print-after-change", nargs="?", const="", metavar="DIR",
                     help="write the program's code after every pass that changed it to DIR (default DIR: <out>/ir)")
    opt.add_argument("--no-baseline", action="store_true", help="skip exporting the unoptimized model for comparison")
    opt.add_argument("--min-fidelity", type=float, help="search the candidate recipes for the fastest with held-out mean cosine >= this")
    opt.add_argument("--max-latency-ms", type=float, help="search the candidate recipes for the most faithful with ORT p50 <= this")
    opt.add_argument("--candidates", help="comma-separated recipe files or presets to search (default: every preset)")
    opt.add_argument("--nproc", type=int, default=1, help="processes for data-parallel stages (distill), launched with torchrun")
    opt.add_argument("--quiet", action="store_true")
    opt.set_defaults(func=_cmd_optimize)

    dis = sub.add_parser("distill", parents=[opt], add_help=False, conflict_handler="resolve",
                         help="optimize with a recipe that has a distill stage (data-parallel with --nproc)")
    dis.set_defaults(func=_cmd_distill)

    lst = sub.add_parser("passes", help="list every pass: what it does, exact or lossy, its options")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_cmd_passes)

    ins = sub.add_parser("inspect", help="op histogram, parameters and attention blocks of a model")
    ins.add_argument("--model", required=True)
    ins.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=_cmd_inspect)

    rep = sub.add_parser("repro", help="re-run the pass recorded in a crash reproducer folder (the original error surfaces again)")
    rep.add_argument("folder")
    rep.set_defaults(func=_cmd_repro)

    _add_generate(sub)

    pre = sub.add_parser("recipes", help="list the shipped recipe presets")
    pre.set_defaults(func=_cmd_recipes)
    return parser


def _add_generate(sub) -> None:
    gen = sub.add_parser("generate", help="generate text with a decoder bundle (streams tokens; --json prints ids and timings)")
    gen.add_argument("--bundle", required=True, help="a bundle folder written by graphopt optimize for a causal LM")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="prompt text (repeat for a batch); needs the bundle's tokenizer")
    source.add_argument("--ids", action="append", help="prompt token ids, comma-separated (repeat for a batch)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--threads", type=int, default=None)
    gen.add_argument("--json", action="store_true", help="print the token ids and timings as JSON instead of streaming text")
    gen.set_defaults(func=_cmd_generate)


def _cmd_distill(args) -> int:
    from graphopt.errors import ConfigError
    from graphopt.recipe import Recipe

    recipe = Recipe.load(args.recipe)
    text = args.pipeline if args.pipeline is not None else recipe.pipeline_text()
    if "distill" not in text:
        raise ConfigError(f"graphopt distill needs a pipeline with a distill stage; got '{text}' (add e.g. distill{{steps=300}})")
    return _cmd_optimize(args)


def _launch_data_parallel(nproc: int) -> int:
    """Re-run this command under torchrun with ``nproc`` processes; return its exit code."""
    import subprocess

    argv = list(sys.argv[1:])
    for i, arg in enumerate(argv):
        if arg == "--nproc":
            del argv[i : i + 2]
            break
        if arg.startswith("--nproc="):
            del argv[i]
            break
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "graphopt.cli", *argv]
    return subprocess.call(command)


def _init_distributed() -> None:
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _cmd_optimize(args) -> int:
    if args.nproc > 1 and "RANK" not in os.environ:
        return _launch_data_parallel(args.nproc)
    _init_distributed()
    if int(os.environ.get("RANK", "0")) != 0:
        args.quiet = True
    from graphopt.build import build, format_table
    from graphopt.models import load_model
    from graphopt.recipe import Recipe

    say = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    recipe = _recipe(args, Recipe.load(args.recipe))
    loaded = load_model(args.model, attn_implementation=args.attn)
    if args.min_fidelity is not None or args.max_latency_ms is not None:
        return _search(args, loaded)
    outcome = build(loaded, recipe, _build_options(args), say=say)
    if int(os.environ.get("RANK", "0")) != 0:
        return EXIT_OK
    report = outcome.result.report
    print(report.to_markdown())
    if outcome.rows:
        print(format_table(outcome.rows))
    print(f"\nwrote {Path(args.out) / 'model.onnx'}, report.json, report.md")
    if not outcome.ok:
        for failure in report.failures:
            print(f"FAILED: {failure}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _recipe(args, recipe):
    """The recipe with the command line's overrides: ``--pipeline``, ``--data``/``--data-column``."""
    from graphopt.recipe import Recipe

    if args.pipeline is not None:
        recipe = Recipe.from_dict(recipe.model_dump(exclude={"passes"}) | {"pipeline": args.pipeline}, source="--pipeline")
    if args.data is not None or args.data_column is not None:
        recipe = recipe.with_data(args.data, args.data_column)
    return recipe


def _build_options(args):
    from graphopt.build import BuildOptions

    print_after_change = args.print_after_change
    if print_after_change == "":
        print_after_change = Path(args.out) / "ir"
    return BuildOptions(
        out_dir=Path(args.out),
        threads=args.threads,
        bench_batch=args.bench_batch,
        bench_seq=args.bench_seq,
        bench_repeat=args.bench_repeat,
        heldout=args.heldout,
        calibration=args.calibration,
        baseline_onnx=not args.no_baseline,
        progress=not args.quiet,
        print_after_change=print_after_change,
    )


def _search(args, loaded) -> int:
    from graphopt.errors import ConfigError
    from graphopt.recipe import Recipe, presets
    from graphopt.search import search

    if args.min_fidelity is not None and (loaded.tokenizer is None or args.heldout == 0):
        raise ConfigError("--min-fidelity is measured on held-out sentences: it needs a text model with a tokenizer and --heldout > 0")
    # By default every preset for ordinary inputs: the passage presets (long-attention) build for another input length.
    names = args.candidates.split(",") if args.candidates else [p for p in presets() if p != "default" and Recipe.load(p).data.passage_tokens is None]
    candidates = [_recipe(args, Recipe.load(name.strip())) for name in names]
    say = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    result = search(loaded, candidates, _build_options(args), min_fidelity=args.min_fidelity, max_latency_ms=args.max_latency_ms, say=say)
    print(result.to_markdown(args.min_fidelity, args.max_latency_ms))
    if result.winner is None:
        print("FAILED: no candidate recipe meets the gate", file=sys.stderr)
        return EXIT_FAILED
    print(f"wrote the '{result.winner.name}' bundle to {args.out} (all candidates: search.md)")
    return EXIT_OK


def _cmd_passes(args) -> int:
    from graphopt.pipeline import registered_passes

    described: list[dict[str, Any]] = []
    for name, cls in registered_passes().items():
        fields = {}
        for key, field in cls.Config.model_fields.items():
            fields[key] = {"type": _type_name(field.annotation), "default": field.default, "doc": field.description or ""}
        kind = exactness(cls)
        described.append({"name": name, "exact": kind == "exact", "exactness": kind, "summary": " ".join(cls.summary().split()),
                          "doc": " ".join((cls.__doc__ or "").split()), "options": fields})
    if args.json:
        print(json.dumps(described, indent=2, default=str))
        return EXIT_OK
    for item in described:
        print(f"{item['name']}  ({item['exactness']})")
        print(f"    {item['summary']}")
        for key, field in item["options"].items():
            doc = f"  {field['doc']}" if field["doc"] else ""
            print(f"    {key}: {field['type']} = {field['default']!r}{doc}")
    return EXIT_OK


def exactness(cls) -> str:
    """What ``graphopt passes`` says of a pass: ``exact`` or ``lossy`` under the default
    options, or ``lossy (exact for some options)`` when changing one option at a time (a
    bool flipped, another value of a choice) makes ``is_exact`` say so: cheap, and enough
    for the options that decide it."""
    default = cls.Config()
    if cls.is_exact(default):
        return "exact"
    for key, field in cls.Config.model_fields.items():
        if any(_exact_with(cls, default, key, value) for value in _alternatives(field.annotation, getattr(default, key))):
            return "lossy (exact for some options)"
    return "lossy"


def _exact_with(cls, config, key: str, value) -> bool:
    try:
        return bool(cls.is_exact(config.model_copy(update={key: value})))
    except Exception:  # noqa: BLE001 - an alternative the pass does not accept is not exact
        return False


def _alternatives(annotation, current) -> list:
    import enum
    import typing

    if annotation is bool:
        return [not current]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [m for m in annotation if m != current]
    if typing.get_origin(annotation) is typing.Literal:
        return [v for v in typing.get_args(annotation) if v != current]
    return []


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _cmd_inspect(args) -> int:
    from graphopt.capture import capture
    from graphopt.inspect import inspect_program
    from graphopt.models import load_model

    loaded = load_model(args.model, attn_implementation=args.attn)
    program = capture(loaded.model, kwargs=loaded.example_kwargs or {})
    summary = inspect_program(program)
    summary["model"] = loaded.name
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return EXIT_OK
    print(f"model: {loaded.name}  (captured with {program.ir})")
    print(f"parameters: {summary['parameters']:,}  ({summary['parameter_bytes'] / 1e6:.1f} MB in {summary['tensors']} tensors)")
    print(f"nodes: {summary['nodes']}")
    print("ops:")
    for op, count in summary["ops"].items():
        print(f"  {count:5d}  {op}")
    blocks = summary["attention"]
    print(f"attention blocks: {len(blocks)}")
    for block in blocks:
        print(f"  {block['module']}: {block['kind']}")
    return EXIT_OK


def _cmd_repro(args) -> int:
    import traceback

    from graphopt.repro import rerun_reproducer

    try:
        result = rerun_reproducer(args.folder)
    except Exception:  # noqa: BLE001 - the failure the reproducer was written for: show it whole
        traceback.print_exc()
        print(f"graphopt repro: the pass recorded in {args.folder} failed again (traceback above)", file=sys.stderr)
        return EXIT_FAILED
    reason = f" ({result.reason})" if result.reason else ""
    print(f"the pass ran without error this time: {result.status}{reason}; info: {result.info.model_dump(mode='json')}")
    return EXIT_OK


def _cmd_generate(args) -> int:
    import json

    from graphopt.bundle import bundle_tokenizer, open_generator
    from graphopt.errors import ConfigError
    from graphopt.export.generation import SamplingOptions

    generator = open_generator(args.bundle, threads=args.threads)
    tokenizer = bundle_tokenizer(args.bundle)
    if args.prompt:
        if tokenizer is None:
            raise ConfigError(f"bundle {args.bundle} has no tokenizer, so it cannot read --prompt: pass --ids")
        prompts = [tokenizer(text)["input_ids"] for text in args.prompt]
    else:
        try:
            prompts = [[int(t) for t in row.split(",") if t.strip()] for row in args.ids]
        except ValueError as exc:
            raise ConfigError(f"--ids takes comma-separated integers: {exc}") from exc
    sampling = SamplingOptions(do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    streamer = None
    if not args.json and len(prompts) == 1:
        pieces: list[int] = []

        def streamer(tokens) -> None:  # print the text as it grows (decoding the whole tail keeps multi-byte tokens whole)
            before = tokenizer.decode(pieces, skip_special_tokens=True) if tokenizer is not None else ""
            pieces.append(int(tokens[0]))
            after = tokenizer.decode(pieces, skip_special_tokens=True) if tokenizer is not None else " ".join(map(str, pieces))
            print(after[len(before):] if after.startswith(before) else f" {after}", end="", flush=True)

        if tokenizer is not None:
            print(tokenizer.decode(prompts[0], skip_special_tokens=True), end="", flush=True)
    result = generator.generate(prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, streamer=streamer)
    timings = result.timings()
    if args.json:
        print(json.dumps({"sequences": result.sequences.tolist(), "prompt_length": result.prompt_length, **timings, "new_token_ids": result.new_tokens.tolist()}))
        return EXIT_OK
    if streamer is None:
        for row in result.new_tokens:
            print(tokenizer.decode(row, skip_special_tokens=True) if tokenizer is not None else " ".join(map(str, row)))
    else:
        print()
    print(f"[graphopt] prefill {timings['prefill_ms']:.1f} ms, decode {timings['decode_tokens_per_s']:.1f} tokens/s "
          f"({timings['new_tokens']} new tokens)", file=sys.stderr)
    return EXIT_OK


def _cmd_recipes(args) -> int:
    from graphopt.recipe import Recipe, presets

    for name in presets():
        recipe = Recipe.load(name)
        print(f"{name}: {recipe.pipeline_text()}\n    {recipe.description}")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())

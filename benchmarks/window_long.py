"""Long generation with a bounded cache: ``window-attention`` (StreamingLLM) against full
attention, at 4,096 generated tokens.

    python benchmarks/window_long.py --out out/decoder                  # 4,096 tokens, 2 rounds
    python benchmarks/window_long.py --out out/decoder --new-tokens 1024 --rounds 1

The model is decoder.py's: random weights of Qwen2.5-0.5B's configuration (speed and memory do
not depend on weight values), batch 1, a 128-token prompt, 2 threads, graphopt's int4 recipe
with full attention and with ``window-attention`` caches of 1,024 and 256 entries
(``{sinks=4,window=1020}``, ``{sinks=4,window=252}``). Each
variant generates in its own subprocess, in alternating rounds. Per segment of decode steps the
table gives tokens/s, the cache length the graph returned, the KV bytes that length holds, and
the process's resident memory; the ratios are to the same run's first segment (the
short-sequence rate: past length 128-256, the decoder benchmark's setting).

What it shows: the windowed cache stops at sinks + window entries, so its KV memory is flat
after the window fills and its rate stays near the short-sequence rate, while full attention's
cache, memory and per-token time keep growing. Quality past the window is a different question
(StreamingLLM's perplexity holds, token-for-token agreement does not): see the README.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from decoder import _PEAK_RSS, QWEN25_05B, RECIPES, _run_json, export_recipe, random_model_dir, recipe_folder

VARIANTS = {"graphopt int4, full attention": RECIPES["graphopt int4"],
            "graphopt int4 + window-attention 1024": RECIPES["graphopt int4"] + ",window-attention{sinks=4,window=1020}",
            "graphopt int4 + window-attention 256": RECIPES["graphopt int4"] + ",window-attention{sinks=4,window=252}"}
SEGMENT = 256  # decode steps per row of the table

_TIMER = _PEAK_RSS + r"""
import json, sys, numpy as np
from graphopt.export import make_session
from graphopt.export.generation import Generator
path, prompt_len, new_tokens, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
prompt = np.random.default_rng(1).integers(0, 151936, prompt_len).tolist()
generator = Generator(make_session(path, threads=threads))
generator.generate([prompt], max_new_tokens=4, eos_token_id=[])
rss = []
result = generator.generate([prompt], max_new_tokens=new_tokens, eos_token_id=[], streamer=lambda _t: rss.append(rss_mb()))
print(json.dumps({"prefill_ms": result.prefill_ms, "decode_ms": result.decode_ms, "cache_lengths": result.cache_lengths, "rss_mb": rss,
                  "buffer_slots": result.buffer_slots, "peak_rss_mb": peak_rss_mb()}))
"""


def kv_bytes(entries: int, config: dict) -> int:
    """fp32 K and V of every layer for ``entries`` cache positions, batch 1."""
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * entries * 4


def segments(run: dict, config: dict) -> list[dict]:
    """Per ``SEGMENT`` decode steps: tokens/s, the cache length and KV bytes at its end, RSS at its end."""
    rows = []
    decode, lengths, rss = run["decode_ms"], run["cache_lengths"], run["rss_mb"]
    for start in range(0, len(decode), SEGMENT):
        steps = decode[start : start + SEGMENT]
        end = start + len(steps)  # decode step ``end`` is generation step ``end`` (step 0 is the prefill)
        rows.append({"steps": f"{start + 1}-{end}", "tokens_per_s": len(steps) / (sum(steps) / 1e3), "cache_entries": lengths[end],
                     "kv_mb": kv_bytes(lengths[end], config) / 2**20, "rss_mb": rss[end]})
    return rows


def markdown(table: dict[str, list[dict]]) -> str:
    names = list(table)
    head = "| decode steps | " + " | ".join(f"{n}: tok/s (× first) · cache · KV MiB · RSS MiB" for n in names) + " |"
    lines = [head, "|---|" + "---|" * len(names)]
    for index in range(len(table[names[0]])):
        cells = []
        for name in names:
            row, first = table[name][index], table[name][0]
            cells.append(f"{row['tokens_per_s']:.1f} ({row['tokens_per_s'] / first['tokens_per_s']:.2f}) · {row['cache_entries']} · {row['kv_mb']:.0f} · {row['rss_mb']:.0f}")
        lines.append(f"| {table[names[0]][index]['steps']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def median_segments(runs: list[list[dict]]) -> list[dict]:
    """Each segment's median over rounds (tokens/s and RSS; the cache length is the same every round)."""
    return [{**rows[0], "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows), "rss_mb": statistics.median(r["rss_mb"] for r in rows)}
            for rows in zip(*runs)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/decoder"))
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (0: build and cache the exports only)")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--build", choices=list(VARIANTS), help=argparse.SUPPRESS)  # build one variant (the subprocess of a build)
    args = parser.parse_args(argv)
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = random_model_dir(out / "qwen2.5-0.5b-random")
    paths = {name: recipe_folder(out, name, pipeline) / "model.onnx" for name, pipeline in VARIANTS.items()}
    if args.build is not None:
        build = export_recipe(model_dir, VARIANTS[args.build], paths[args.build].parent)
        print(f"[build] {args.build}: {json.dumps(build, default=str)[:300]}", flush=True)
        return 0
    for name, path in paths.items():  # one process per build: a second 0.5B build in the same process ran out of 24 GB
        if not path.is_file():
            subprocess.run([sys.executable, __file__, "--out", str(out), "--build", name], check=True)
    if args.rounds == 0:  # build (and cache) only
        return 0
    runs: dict[str, list[list[dict]]] = {name: [] for name in VARIANTS}
    buffers: dict[str, int] = {}  # entries of the KV buffer the runtime allocated once (0: the cache grows in ORT's presents)
    for round_index in range(args.rounds):
        for name, path in paths.items():
            run = _run_json([sys.executable, "-c", _TIMER, str(path), str(args.prompt), str(args.new_tokens), str(args.threads)])
            runs[name].append(segments(run, QWEN25_05B))
            buffers[name] = run.get("buffer_slots", 0)
            last = runs[name][-1]
            print(f"[round {round_index + 1}/{args.rounds}] {name}: first {last[0]['tokens_per_s']:.1f} tok/s, last {last[-1]['tokens_per_s']:.1f} tok/s, "
                  f"cache {last[-1]['cache_entries']}, buffer {buffers[name]} entries, peak RSS {run['peak_rss_mb']:.0f} MiB", flush=True)
    table = {name: median_segments(r) for name, r in runs.items()}
    text = markdown(table) + "\n\nKV buffers allocated once: " + ", ".join(
        f"{name} {slots} entries ({kv_bytes(slots, QWEN25_05B) / 2**20:.0f} MiB)" for name, slots in buffers.items() if slots)
    print(text)
    (out / "window_long.md").write_text(text + "\n")
    (out / "window_long.json").write_text(json.dumps({"table": table, "runs": runs, "args": vars(args)}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    raise SystemExit(main())

"""Decoder benchmark: prefill latency, decode tokens/s, peak RSS and file size of graphopt's
decoder exports against PyTorch eager fp32 (``generate`` with its cache) and, where it is
installed, the onnxruntime-genai model builder's CPU int4 output.

    python benchmarks/decoder.py --out out/decoder                 # speed (Qwen2.5-0.5B shape)
    python benchmarks/decoder.py --out out/decoder --rounds 3 --new-tokens 128 --prompt 128

Speed does not depend on weight values, so it is measured on random weights of
Qwen2.5-0.5B's configuration (hidden 896, 24 layers, 14 heads, 2 kv heads, FFN 4864, vocab
151,936), batch 1, 2 threads. Every runtime is timed in its own subprocess, one at a time, in
alternating rounds (so no idle session's threads steal cores, and each reports its own peak
RSS); the figures are medians over rounds, and ratios are taken within the run.

Quality needs a trained decoder, and none is loadable offline: ``--quality`` measures each lossy
recipe on the small decoder that ``benchmarks/decoder_instrument.py`` trains here (a
measuring instrument, not a product): held-out next-token agreement and perplexity ratio to
its fp32 self.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QWEN25_05B = {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864,
              "vocab_size": 151936, "tie_word_embeddings": True, "rope_theta": 1000000.0, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
              "bos_token_id": 151643, "eos_token_id": 151643}
RECIPES = {
    "graphopt fp32": "dce,dedup,sdpa,gqa-attention,rotary,rms-norm,pack-linears",
    "graphopt int8": "dce,dedup,sdpa,gqa-attention,rotary,rms-norm,pack-linears,quantize{mode=dynamic}",
    # as the builder's int4: 4-bit weights in groups of 32 with int8 compute, LM head and embeddings too
    "graphopt int4": "dce,dedup,sdpa,gqa-attention,rotary,rms-norm,pack-linears,quantize{mode=weight_only,bits=4,group_size=32,accuracy_level=4,embeddings=true,embedding_bits=4}",
    # the same in blocks of 128: a quarter of the scales and zero points to read and apply per weight
    "graphopt int4 g128": "dce,dedup,sdpa,gqa-attention,rotary,rms-norm,pack-linears,quantize{mode=weight_only,bits=4,group_size=128,accuracy_level=4,embeddings=true,embedding_bits=4}",
    "graphopt int4 GPTQ g128": "dce,dedup,sdpa,gqa-attention,rotary,rms-norm,pack-linears,quantize{mode=weight_only,bits=4,group_size=128,accuracy_level=4,gptq=true,embeddings=true,embedding_bits=4}",
    # the same two with gqa-rotary: GroupQueryAttention reads the packed Q/K/V and applies rotary itself
    "graphopt int4 + gqa-rotary": "dce,dedup,sdpa,gqa-attention,rotary,rms-norm,pack-linears,gqa-rotary,quantize{mode=weight_only,bits=4,group_size=32,accuracy_level=4,embeddings=true,embedding_bits=4}",
    "graphopt int4 g128 + gqa-rotary": "dce,dedup,sdpa,gqa-attention,rotary,rms-norm,pack-linears,gqa-rotary,quantize{mode=weight_only,bits=4,group_size=128,accuracy_level=4,embeddings=true,embedding_bits=4}",
    # blocks of 128 in the layers, GPTQ rounding, the LM head (the most sensitive layer) in blocks of 32
    "graphopt int4 GPTQ g128, head g32": "dce,dedup,sdpa,gqa-attention,rotary,rms-norm,pack-linears,"
                                         "quantize{mode=weight_only,bits=4,group_size=128,accuracy_level=4,gptq=true,exclude=[\"*lm_head\"]},"
                                         "quantize{mode=weight_only,bits=4,group_size=32,accuracy_level=4,gptq=true,include=[\"*lm_head\"],embeddings=true,embedding_bits=4}",
    # its speed twin (round to nearest: the same graph and bytes, no calibration on a 0.5B random model)
    "graphopt int4 g128, head g32": "dce,dedup,sdpa,gqa-attention,rotary,rms-norm,pack-linears,"
                                    "quantize{mode=weight_only,bits=4,group_size=128,accuracy_level=4,exclude=[\"*lm_head\"]},"
                                    "quantize{mode=weight_only,bits=4,group_size=32,accuracy_level=4,include=[\"*lm_head\"],embeddings=true,embedding_bits=4}",
    # int4 blocks, but the LM head and the embedding table at 8 bits (the layers next-token agreement is most sensitive to)
    "graphopt int4, int8 head": "dce,dedup,sdpa,gqa-attention,rotary,rms-norm,pack-linears,quantize{mode=weight_only,bits=4,group_size=32,accuracy_level=4,exclude=[\"*lm_head\"]},"
                                "quantize{mode=weight_only,bits=8,group_size=32,accuracy_level=4,include=[\"*lm_head\"],embeddings=true,embedding_bits=8}",
    "graphopt int4 GPTQ, int8 head": "dce,dedup,sdpa,gqa-attention,rotary,rms-norm,pack-linears,quantize{mode=weight_only,bits=4,group_size=32,accuracy_level=4,gptq=true,exclude=[\"*lm_head\"]},"
                                     "quantize{mode=weight_only,bits=8,group_size=32,accuracy_level=4,include=[\"*lm_head\"],embeddings=true,embedding_bits=8}",
    # AWQ's activation-aware scales first (smooth{scheme=weight_only}: folded into the norms' gains and
    # the up projections, so the graph has the same kernels as plain int4; insert_mul=false leaves
    # the output projections, whose input no weight can absorb the scales)
    "graphopt int4 AWQ": "dce,dedup,sdpa,gqa-attention,rotary,rms-norm,smooth{scheme=weight_only,bits=4,group_size=32,insert_mul=false},pack-linears,"
                         "quantize{mode=weight_only,bits=4,group_size=32,accuracy_level=4,embeddings=true,embedding_bits=4}",
    "graphopt int4 AWQ GPTQ": "dce,dedup,sdpa,gqa-attention,rotary,rms-norm,smooth{scheme=weight_only,bits=4,group_size=32,insert_mul=false},pack-linears,"
                              "quantize{mode=weight_only,bits=4,group_size=32,accuracy_level=4,gptq=true,embeddings=true,embedding_bits=4}",
    "graphopt int4 AWQ GPTQ, int8 head": "dce,dedup,sdpa,gqa-attention,rotary,rms-norm,smooth{scheme=weight_only,bits=4,group_size=32,insert_mul=false,exclude=[\"*lm_head\"]},pack-linears,"
                                         "quantize{mode=weight_only,bits=4,group_size=32,accuracy_level=4,gptq=true,exclude=[\"*lm_head\"]},"
                                         "quantize{mode=weight_only,bits=8,group_size=32,accuracy_level=4,include=[\"*lm_head\"],embeddings=true,embedding_bits=8}",
    "graphopt int4 GPTQ": "dce,dedup,sdpa,gqa-attention,rotary,rms-norm,pack-linears,quantize{mode=weight_only,bits=4,group_size=32,accuracy_level=4,gptq=true,embeddings=true,embedding_bits=4}",
    # the first layer and the LM head (with the embeddings) at 8 bits, the rest at 4: the layers the
    # sensitivity plan keeps first on the trained instrument (keep=4 picked all of layer 0's linears)
    "graphopt int4 GPTQ, layer 0 and head int8": "dce,dedup,sdpa,gqa-attention,rotary,rms-norm,pack-linears,"
        "quantize{mode=weight_only,bits=4,group_size=32,accuracy_level=4,gptq=true,exclude=[\"*lm_head\",\"*layers.0.*\"]},"
        "quantize{mode=weight_only,bits=8,group_size=32,accuracy_level=4,include=[\"*lm_head\",\"*layers.0.*\"],embeddings=true,embedding_bits=8}",
    "graphopt int4 GPTQ g128, layer 0 and head int8": "dce,dedup,sdpa,gqa-attention,rotary,rms-norm,pack-linears,"
        "quantize{mode=weight_only,bits=4,group_size=128,accuracy_level=4,gptq=true,exclude=[\"*lm_head\",\"*layers.0.*\"]},"
        "quantize{mode=weight_only,bits=8,group_size=128,accuracy_level=4,include=[\"*lm_head\",\"*layers.0.*\"],embeddings=true,embedding_bits=8}",
    # their speed twins (round to nearest: the same graph and bytes, no calibration on a 0.5B random model)
    "graphopt int4, layer 0 and head int8": "dce,dedup,sdpa,gqa-attention,rotary,rms-norm,pack-linears,"
        "quantize{mode=weight_only,bits=4,group_size=32,accuracy_level=4,exclude=[\"*lm_head\",\"*layers.0.*\"]},"
        "quantize{mode=weight_only,bits=8,group_size=32,accuracy_level=4,include=[\"*lm_head\",\"*layers.0.*\"],embeddings=true,embedding_bits=8}",
    "graphopt int4 g128, layer 0 and head int8": "dce,dedup,sdpa,gqa-attention,rotary,rms-norm,pack-linears,"
        "quantize{mode=weight_only,bits=4,group_size=128,accuracy_level=4,exclude=[\"*lm_head\",\"*layers.0.*\"]},"
        "quantize{mode=weight_only,bits=8,group_size=128,accuracy_level=4,include=[\"*lm_head\",\"*layers.0.*\"],embeddings=true,embedding_bits=8}",
    # mixed precision: the k layers whose 4-bit rounding moves the logits most (measured one at a time
    # on the calibration text) at 8 bits, the rest at 4
    "graphopt int4 GPTQ, keep 4": "dce,dedup,sdpa,gqa-attention,rotary,rms-norm,pack-linears,"
                                  "quantize{mode=weight_only,bits=4,group_size=32,accuracy_level=4,gptq=true,keep=4,fallback=int8_weight_only,embeddings=true,embedding_bits=4}",
    "graphopt int4 GPTQ, keep 6": "dce,dedup,sdpa,gqa-attention,rotary,rms-norm,pack-linears,"
                                  "quantize{mode=weight_only,bits=4,group_size=32,accuracy_level=4,gptq=true,keep=6,fallback=int8_weight_only,embeddings=true,embedding_bits=4}",
    "graphopt int4 GPTQ, int8 head, keep 2": "dce,dedup,sdpa,gqa-attention,rotary,rms-norm,pack-linears,"
                                             "quantize{mode=weight_only,bits=4,group_size=32,accuracy_level=4,gptq=true,exclude=[\"*lm_head\"],keep=2,fallback=int8_weight_only},"
                                             "quantize{mode=weight_only,bits=8,group_size=32,accuracy_level=4,include=[\"*lm_head\"],embeddings=true,embedding_bits=8}",
    "graphopt int4 GPTQ, int8 head, keep 4": "dce,dedup,sdpa,gqa-attention,rotary,rms-norm,pack-linears,"
                                             "quantize{mode=weight_only,bits=4,group_size=32,accuracy_level=4,gptq=true,exclude=[\"*lm_head\"],keep=4,fallback=int8_weight_only},"
                                             "quantize{mode=weight_only,bits=8,group_size=32,accuracy_level=4,include=[\"*lm_head\"],embeddings=true,embedding_bits=8}",
    # the LM head at 4 bits picks each position's 64 best logits, recomputed from int8 rows (refine-head); the
    # embedding at 8 bits is the same int8 table, stored once after the final dedup when the head is tied
    "graphopt int4 GPTQ, refined head": "dce,dedup,sdpa,gqa-attention,rotary,rms-norm,pack-linears,refine-head{k=64},"
        "quantize{mode=weight_only,bits=4,group_size=32,accuracy_level=4,gptq=true,embeddings=true,embedding_bits=8},dedup",
    "graphopt int4 GPTQ, layer 0 int8, refined head": "dce,dedup,sdpa,gqa-attention,rotary,rms-norm,pack-linears,refine-head{k=64},"
        "quantize{mode=weight_only,bits=4,group_size=32,accuracy_level=4,gptq=true,exclude=[\"*layers.0.*\"],embeddings=true,embedding_bits=8},"
        "quantize{mode=weight_only,bits=8,group_size=32,accuracy_level=4,include=[\"*layers.0.*\"]},dedup",
    "graphopt int4 GPTQ g128, layer 0 int8, refined head": "dce,dedup,sdpa,gqa-attention,rotary,rms-norm,pack-linears,refine-head{k=64},"
        "quantize{mode=weight_only,bits=4,group_size=128,accuracy_level=4,gptq=true,exclude=[\"*layers.0.*\"],embeddings=true,embedding_bits=8},"
        "quantize{mode=weight_only,bits=8,group_size=128,accuracy_level=4,include=[\"*layers.0.*\"]},dedup",
    # the head's coarse stage at 2 bits (it only picks the candidates): half the bytes of the 4-bit head. The head
    # goes first: a tied embedding is quantized only once nothing else reads its table
    "graphopt int4 GPTQ g128, layer 0 int8, 2-bit refined head": "dce,dedup,sdpa,gqa-attention,rotary,rms-norm,pack-linears,refine-head{k=64},"
        "quantize{mode=weight_only,bits=2,group_size=64,accuracy_level=4,gptq=true,include=[\"*lm_head\"]},"
        "quantize{mode=weight_only,bits=4,group_size=128,accuracy_level=4,gptq=true,exclude=[\"*layers.0.*\"],embeddings=true,embedding_bits=8},"
        "quantize{mode=weight_only,bits=8,group_size=128,accuracy_level=4,include=[\"*layers.0.*\"]},dedup",
    # their speed twins
    "graphopt int4 g128, layer 0 int8, refined head": "dce,dedup,sdpa,gqa-attention,rotary,rms-norm,pack-linears,refine-head{k=64},"
        "quantize{mode=weight_only,bits=4,group_size=128,accuracy_level=4,exclude=[\"*layers.0.*\"],embeddings=true,embedding_bits=8},"
        "quantize{mode=weight_only,bits=8,group_size=128,accuracy_level=4,include=[\"*layers.0.*\"]},dedup",
    "graphopt int4 g128, layer 0 int8, 2-bit refined head": "dce,dedup,sdpa,gqa-attention,rotary,rms-norm,pack-linears,refine-head{k=64},"
        "quantize{mode=weight_only,bits=2,group_size=64,accuracy_level=4,include=[\"*lm_head\"]},"
        "quantize{mode=weight_only,bits=4,group_size=128,accuracy_level=4,exclude=[\"*layers.0.*\"],embeddings=true,embedding_bits=8},"
        "quantize{mode=weight_only,bits=8,group_size=128,accuracy_level=4,include=[\"*layers.0.*\"]},dedup",
    # the same with packed Q/K/V and rotary read by GroupQueryAttention itself (48 Splits and 48 RotaryEmbedding fewer)
    "graphopt int4 g128, layer 0 int8, 2-bit refined head + gqa-rotary": "dce,dedup,sdpa,gqa-attention,rotary,rms-norm,pack-linears,gqa-rotary,refine-head{k=64},"
        "quantize{mode=weight_only,bits=2,group_size=64,accuracy_level=4,include=[\"*lm_head\"]},"
        "quantize{mode=weight_only,bits=4,group_size=128,accuracy_level=4,exclude=[\"*layers.0.*\"],embeddings=true,embedding_bits=8},"
        "quantize{mode=weight_only,bits=8,group_size=128,accuracy_level=4,include=[\"*layers.0.*\"]},dedup",
    "graphopt int8 weight-only": "dce,dedup,sdpa,gqa-attention,rotary,rms-norm,pack-linears,quantize{mode=weight_only,bits=8,group_size=32,accuracy_level=4,embeddings=true,embedding_bits=8}",
    # the same int4 without the decoder kernels (GroupQueryAttention, RotaryEmbedding, packed GEMMs): what they are worth
    "graphopt int4 unfused": "dce,dedup,rms-norm,quantize{mode=weight_only,bits=4,group_size=32,accuracy_level=4,embeddings=true,embedding_bits=4}",
}


# What a run measures when --recipes is not given: speed rows round to nearest (GPTQ would only
# spend build time on random weights), quality rows are the candidates compared on the instrument.
SPEED_RECIPES = ("graphopt fp32", "graphopt int8", "graphopt int4", "graphopt int4 g128", "graphopt int4 g128, layer 0 int8, 2-bit refined head")
QUALITY_RECIPES = ("graphopt int8", "graphopt int8 weight-only", "graphopt int4", "graphopt int4 GPTQ", "graphopt int4 AWQ GPTQ",
                   "graphopt int4 GPTQ, int8 head", "graphopt int4 GPTQ, layer 0 and head int8", "graphopt int4 GPTQ g128, layer 0 and head int8",
                   "graphopt int4 GPTQ, refined head", "graphopt int4 GPTQ g128, layer 0 int8, refined head", "graphopt int4 GPTQ g128, layer 0 int8, 2-bit refined head")


def random_model_dir(folder: Path, config: dict | None = None, seed: int = 0) -> Path:
    """A Hugging Face folder of a random-weight Qwen2 causal LM (cached: written once)."""
    import torch
    import transformers

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**(config or QWEN25_05B))).eval()
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def recipe_folder(out: Path, name: str, pipeline: str | None = None) -> Path:
    """Where a recipe's export is cached: its name and a digest of its pipeline (default:
    ``RECIPES[name]``) and of graphopt's source, so a changed pass or exporter is never timed
    from an old build."""
    import hashlib

    digest = hashlib.sha256((pipeline or RECIPES[name]).encode() + _source_digest())
    return out / f"{name.replace(' ', '-')}-{digest.hexdigest()[:8]}"


@functools.cache
def _source_digest() -> bytes:  # once per process: every recipe_folder call would hash the package again
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((ROOT / "graphopt").rglob("*")):
        if path.is_file() and path.suffix in (".py", ".toml"):
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.digest()


def export_recipe(model_dir: Path, pipeline: str, out: Path, *, texts: bool = False) -> dict:
    """Capture, optimize and export one recipe (cached by folder); returns what it measured.
    ``texts``: calibrate and verify on the tokenizer's training and verification text (the
    trained instrument) instead of one random prompt (random weights, where only speed counts)."""
    import torch

    import graphopt
    from graphopt.export import to_onnx
    from graphopt.models import load_model

    path = out / "model.onnx"
    summary = out / "build.json"
    if summary.is_file() and path.is_file():
        return json.loads(summary.read_text())
    torch.set_num_threads(2)
    loaded = load_model(model_dir)
    start = time.perf_counter()
    program = graphopt.capture_decoder(loaded.model)
    captured = time.perf_counter() - start
    # Random weights: fidelity means nothing here (it is measured on the trained instrument),
    # so the budget is open and one short generation run keeps the eager verification cheap.
    from graphopt.decoder import decoder_context, prompt_batches

    spec = graphopt.decoder.decoder_spec(program)
    if texts:
        from graphopt.data import train_sentences, verification_sentences
        from graphopt.decoder import text_prompt_batches

        context = decoder_context(program, calibration=text_prompt_batches(loaded.tokenizer, train_sentences(64), 128),
                                  verification=text_prompt_batches(loaded.tokenizer, verification_sentences(32), 128))
    else:
        context = decoder_context(program, calibration=prompt_batches(spec, 1, seed=7), verification=prompt_batches(spec, 1, seed=11))
    result = graphopt.optimize(program, pipeline, context=context, budget={"min_cosine": -1.0})
    optimized = time.perf_counter() - start - captured
    exported = to_onnx(result.program, path, strip_metadata=True)
    figures = {"pipeline": pipeline, "capture_s": round(captured, 1), "optimize_s": round(optimized, 1), "export_s": round(exported.export_seconds, 1),
               "bytes": exported.bytes, "external_data": bool(exported.external_data_path),
               "passes": [(r.name, r.status) for r in result.report.passes], "final_drift": result.report.final_drift,
               "kept_at_fallback": [k["module_path"] or k["node"] for r in result.report.passes for k in ((r.info.get("plan") or {}).get("kept_at_fallback") or [])]}
    summary.write_text(json.dumps(figures, indent=2, default=str))
    return figures


# ---- timing, one runtime per subprocess ----------------------------------------------------------
# Peak RSS from /proc/self/status (VmHWM): getrusage's ru_maxrss of a child started by
# subprocess starts at the parent's high-water mark, which here holds a 0.5B model.
_PEAK_RSS = r"""
def peak_rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")
"""

_ORT_TIMER = _PEAK_RSS + r"""
import json, sys, numpy as np
from graphopt.export import make_session
from graphopt.export.generation import Generator
path, prompt_len, new_tokens, threads, cache = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
prompt = np.random.default_rng(1).integers(0, 151936, prompt_len).tolist()
generator = Generator(make_session(path, threads=threads))
if cache == "copied":  # what the shared buffer is worth: the same graph, its present a new tensor each step
    generator.shared_buffer = False
generator.generate([prompt], max_new_tokens=4, eos_token_id=[])
timings = generator.generate([prompt], max_new_tokens=new_tokens, eos_token_id=[]).timings()
print(json.dumps({**timings, "peak_rss_mb": peak_rss_mb()}))
"""

_EAGER_TIMER = _PEAK_RSS + r"""
import json, sys, time, numpy as np, torch
from graphopt.models import load_model
folder, prompt_len, new_tokens, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
model = load_model(folder).model
ids = torch.tensor([np.random.default_rng(1).integers(0, 151936, prompt_len).tolist()])
mask = torch.ones_like(ids)
with torch.inference_mode():
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    start = time.perf_counter(); model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    prefill = time.perf_counter() - start
    start = time.perf_counter(); model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    whole = time.perf_counter() - start
print(json.dumps({"prefill_ms": prefill * 1e3, "decode_tokens_per_s": (new_tokens - 1) / (whole - prefill),
                  "peak_rss_mb": peak_rss_mb()}))
"""


def _run_json(command: list[str], env: dict | None = None) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_all(variants: dict[str, tuple[str, Path]], model_dir: Path, *, rounds: int, prompt: int, new_tokens: int, threads: int) -> dict[str, dict]:
    """Alternating rounds over every variant (kind "ort", "ort-copied", "eager" or "genai"), one subprocess each."""
    samples: dict[str, list[dict]] = {name: [] for name in variants}
    for round_index in range(rounds):
        for name, (kind, path) in variants.items():
            if kind == "eager":
                figures = _run_json([sys.executable, "-c", _EAGER_TIMER, str(model_dir), str(prompt), str(new_tokens), str(threads)])
            elif kind == "genai":
                from genai_peer import time_genai

                figures = time_genai(path, prompt_len=prompt, new_tokens=new_tokens, rounds=1, threads=threads)
            else:
                cache = "copied" if kind == "ort-copied" else "shared"
                figures = _run_json([sys.executable, "-c", _ORT_TIMER, str(path), str(prompt), str(new_tokens), str(threads), cache])
            samples[name].append(figures)
            print(f"[round {round_index + 1}/{rounds}] {name}: {json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()})}", flush=True)
    table = {}
    for name, runs in samples.items():
        row = {key: statistics.median(r[key] for r in runs) for key in ("prefill_ms", "decode_tokens_per_s", "peak_rss_mb") if all(key in r for r in runs)}
        row["rounds"] = [{k: r.get(k) for k in ("prefill_ms", "decode_tokens_per_s")} for r in runs]
        table[name] = row
    return table


def folder_bytes(path: Path) -> int:
    folder = path if path.is_dir() else path.parent
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and (p.suffix in (".onnx", ".data", ".bin", ".safetensors") or p.name.endswith(".onnx.data")))


def markdown(table: dict[str, dict], sizes: dict[str, int]) -> str:
    eager = table.get("PyTorch eager fp32 (generate, cache)", {})
    peer = table.get("onnxruntime-genai builder int4", {})
    lines = ["| variant | prefill ms (128 tokens) | decode tokens/s | × eager decode | × builder decode | peak RSS MB | size MB |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in table.items():
        decode = row.get("decode_tokens_per_s")
        vs_eager = f"{decode / eager['decode_tokens_per_s']:.2f}" if decode and eager.get("decode_tokens_per_s") else ""
        vs_peer = f"{decode / peer['decode_tokens_per_s']:.2f}" if decode and peer.get("decode_tokens_per_s") else ""
        lines.append(f"| {name} | {row.get('prefill_ms', float('nan')):.1f} | {decode or float('nan'):.2f} | {vs_eager} | {vs_peer} | "
                     f"{row.get('peak_rss_mb', float('nan')):.0f} | {sizes.get(name, 0) / 1e6:.1f} |")
    return "\n".join(lines)


# ---- quality on the trained instrument ------------------------------------------------------------
QUALITY_BLOCKS = 48  # held-out blocks of 128 tokens: 6,096 scored next tokens


def quality(out: Path, recipes: list[str], *, genai: bool, blocks: int = QUALITY_BLOCKS, genai_block_sizes: Sequence[int] = (),
            split: str = "heldout") -> dict[str, dict]:
    """Held-out perplexity ratio and next-token agreement of each lossy recipe (and of the
    builder's int4) against the fp32 instrument, on held-out blocks no step was fitted on.
    ``split="verification"``: on the verification part instead, the text to choose recipes on
    (a recipe chosen by its held-out figure would be reported on text it was chosen on)."""
    import numpy as np
    import torch
    from decoder_instrument import fidelity, heldout_blocks, torch_logits_fn, trained_decoder, verification_blocks
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from graphopt.export import make_session
    from graphopt.export.generation import Generator

    folder = trained_decoder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    held = heldout_blocks(tokenizer, blocks) if split == "heldout" else verification_blocks(tokenizer, blocks)
    reference = torch_logits_fn(model)
    rows: dict[str, dict] = {}
    for name in recipes:
        build = export_recipe(folder, RECIPES[name], recipe_folder(out / "quality", name), texts=True)
        generator = Generator(make_session(recipe_folder(out / "quality", name) / "model.onnx", threads=2))
        rows[name] = {**fidelity(reference, generator, held), "bytes": build["bytes"]}
        print(f"[quality] {name}: {rows[name]}", flush=True)
    if genai:
        from genai_peer import build_genai, genai_logits, model_bytes

        builds = {"onnxruntime-genai builder int4": build_genai(folder, out / "quality" / "genai-int4", precision="int4")}
        for block in genai_block_sizes:
            builds[f"onnxruntime-genai builder int4, block {block}"] = build_genai(
                folder, out / "quality" / f"genai-int4-b{block}", precision="int4", extra_options={"block_size": block})
        for name, built in builds.items():

            def builder_logits(ids: torch.Tensor, mask: torch.Tensor, built: Path = built) -> torch.Tensor:
                return torch.from_numpy(np.stack([genai_logits(built, row.tolist()) for row in ids]))

            rows[name] = {**fidelity(reference, builder_logits, held), "bytes": model_bytes(built)}
            print(f"[quality] {name}: {rows[name]}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/decoder"))
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (0: build and cache the exports only)")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--recipes", nargs="*", choices=list(RECIPES), default=None,
                        help="which graphopt rows (default: SPEED_RECIPES, or QUALITY_RECIPES with --quality)")
    parser.add_argument("--no-eager", action="store_true")
    parser.add_argument("--copied-cache", action="store_true",
                        help="also each graphopt row with its cache copied every step (no shared KV buffer): what sharing is worth")
    parser.add_argument("--no-genai", action="store_true", help="leave out the onnxruntime-genai builder row")
    parser.add_argument("--genai-block-sizes", type=int, nargs="*", default=[], help="also the builder at these block_size values (its default: 32)")
    parser.add_argument("--quality", action="store_true", help="measure the lossy recipes on the trained instrument instead of speed")
    parser.add_argument("--quality-split", choices=("heldout", "verification"), default="heldout",
                        help="--quality on held-out text (report) or on the verification part (to choose recipes on)")
    args = parser.parse_args(argv)
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).parent))
    if args.quality:
        rows = quality(out, [r for r in (args.recipes or QUALITY_RECIPES) if r != "graphopt fp32"], genai=not args.no_genai, genai_block_sizes=args.genai_block_sizes,
                       split=args.quality_split)
        (out / "quality.json").write_text(json.dumps(rows, indent=2, default=str))
        return 0
    model_dir = random_model_dir(out / "qwen2.5-0.5b-random")
    variants: dict[str, tuple[str, Path]] = {}
    sizes: dict[str, int] = {}
    if not args.no_eager:
        variants["PyTorch eager fp32 (generate, cache)"] = ("eager", model_dir)
        sizes["PyTorch eager fp32 (generate, cache)"] = folder_bytes(model_dir)
    builds = {}
    for name in args.recipes or SPEED_RECIPES:
        folder = recipe_folder(out, name)
        builds[name] = export_recipe(model_dir, RECIPES[name], folder)
        print(f"[build] {name}: {json.dumps(builds[name], default=str)[:400]}", flush=True)
        variants[name] = ("ort", folder / "model.onnx")
        sizes[name] = folder_bytes(folder / "model.onnx")
        if args.copied_cache:
            variants[f"{name}, cache copied"] = ("ort-copied", folder / "model.onnx")
            sizes[f"{name}, cache copied"] = sizes[name]
    if not args.no_genai:
        try:
            from genai_peer import build_genai
        except ImportError as exc:
            print(f"[genai] skipped: {exc}", flush=True)
        else:
            genai_dir = build_genai(model_dir, out / "genai-int4", precision="int4")
            variants["onnxruntime-genai builder int4"] = ("genai", genai_dir)
            sizes["onnxruntime-genai builder int4"] = folder_bytes(genai_dir / "model.onnx")
            for block in args.genai_block_sizes:  # the same choice of block size, open to the builder's users too
                name = f"onnxruntime-genai builder int4, block {block}"
                genai_dir = build_genai(model_dir, out / f"genai-int4-b{block}", precision="int4", extra_options={"block_size": block})
                variants[name] = ("genai", genai_dir)
                sizes[name] = folder_bytes(genai_dir / "model.onnx")
    if args.rounds == 0:  # build (and cache) only
        return 0
    table = time_all(variants, model_dir, rounds=args.rounds, prompt=args.prompt, new_tokens=args.new_tokens, threads=args.threads)
    text = markdown(table, sizes)
    print(text)
    (out / "decoder.md").write_text(text + "\n")
    (out / "decoder.json").write_text(json.dumps({"table": table, "sizes": sizes, "builds": builds, "args": vars(args)}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

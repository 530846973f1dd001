"""Long-sequence attention in ONNX Runtime: exact forms vs Nyström and LSH (issue 8).

Three parts, one run:

1. ``block``: a MiniLM attention block (layer-0 weights: q/k/v projections, attention,
   output projection; batch 1, 384 wide, 12 heads) exported once per variant with a dynamic
   sequence axis and run in ORT at 512 … 16384 tokens. Variants: the exporter's
   decomposition (opset 18), opset-23 ``Attention``, graphopt's fused MultiHeadAttention,
   Nyström, LSH. Latency (median), peak memory (max RSS growth of a fresh process that
   only loads ORT and runs the model) and the relative error of the block output against
   the exact block, on real MiniLM hidden states of held-out text (see
   :mod:`graphopt.attention.activations`: beyond 512 tokens, consecutive 512-token windows).
2. ``layers``: per-layer relative error of the attention output (all six MiniLM layers)
   at 4096 tokens, PyTorch reference ops.
3. ``minilm``: MiniLM at 512 tokens (held-out sentences packed into 512-token inputs),
   loaded with transformers' SDPA attention (boolean masks): one
   ``approx-attention{layers=[i]}`` pass per layer under a budget, then the held-out mean
   cosine of per-sentence embeddings against the original model.
4. ``trained``: MiniLM on 512-token passages (the long-attention preset's data: each part's
   sentences joined, held-out passages never trained on) in ORT, batch 1 and 8, fresh
   process per measurement, alternating rounds: exact fused attention; each trainable
   approximation (hedgehog, linformer, nystrom-learned) on every layer untrained, then after
   ``attention-transfer`` (with the preset's placement); and the whole ``long-attention``
   preset (``--bundle`` reuses a build's model.onnx instead of
   building it here). Held-out mean / min cosine of mean-pooled embeddings, per-layer
   attention-output error on held-out passages, attention FLOPs at 512 relative to exact,
   latency, peak memory.
5. ``bounds``: what limits the per-layer error at 512 tokens, on MiniLM's own q, k, v for the
   same held-out passages, with nothing fitted: attention restricted to Hedgehog's exact part
   (the 64-token block, the one before it, [CLS]), plus [SEP] and punctuation keys, plus the far
   keys mean-pooled in groups, and an oracle that adds each query's top-k far keys by their true
   score (not realisable below O(n²): it needs every score). Attention-output error
   ‖approx − exact‖ / ‖exact‖ over the real query positions, per layer, and the keys each
   query attends to as a fraction of 512 (the FLOPs of the score and value products).

    python benchmarks/attention_long.py --out benchmarks/results/attention_long
    python benchmarks/attention_long.py --parts trained --bundle out/long --out benchmarks/results/attention_trained
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import graphopt.attention  # noqa: F401  (registers the ops, declares their lowerings)
from graphopt.attention import reference
from graphopt.attention.activations import long_hidden_states, minilm_qkv
from graphopt.lowerings import lowering_table
from graphopt.models import load_model
from graphopt.passes.approx_attention import hedgehog_init

SEQS = (512, 1024, 2048, 4096, 8192, 16384)
VARIANTS = ("decomposed", "attention23", "fused", "nystrom", "lsh", "hedgehog")
# The exact forms that hold the 12 × n × n float32 score matrix are not run where it
# would take more than this (16384 tokens: 12.9 GB; the machine has 24 GiB, shared).
SCORE_MATRIX_LIMIT_BYTES = 8 * 2**30


class Block(torch.nn.Module):
    """x → q, k, v → attention variant → output projection (MiniLM layer weights)."""

    def __init__(self, attention, variant: str, options: dict):
        super().__init__()
        self.query, self.key, self.value = attention.self.query, attention.self.key, attention.self.value
        self.out = attention.output.dense
        self.heads = attention.self.num_attention_heads
        self.variant, self.options = variant, options
        head_dim = self.query.out_features // self.heads
        self.scale = head_dim**-0.5
        self.register_buffer("zero_bias", torch.zeros(1, 1, 1, 1))
        self.register_buffer("rotations", reference.lsh_rotations(head_dim, options.get("buckets", 8), options.get("rounds", 2), seed=0))
        for name, tensor in zip(("wq", "bq", "wk", "bk", "mix"), hedgehog_init(self.heads, head_dim, head_dim)):
            self.register_buffer(name, tensor)
        self.eval()

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, -1).transpose(1, 2) for proj in (self.query, self.key, self.value))
        o, ops = self.options, torch.ops.graphopt
        if self.variant in ("decomposed", "attention23"):
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scale)
        elif self.variant == "fused":
            a = ops.fused_attention(q, k, v, self.scale, False, self.heads)
        elif self.variant == "nystrom":
            a = ops.nystrom_attention(q, k, v, self.zero_bias, self.scale, o["landmarks"], o["iterations"], 0)
        elif self.variant == "hedgehog":
            a = ops.hedgehog_attention(q, k, v, self.zero_bias, self.wq, self.bq, self.wk, self.bk, self.mix, self.scale, o["block"], 1, False, 0)
        else:
            a = ops.lsh_attention(q, k, v, self.zero_bias, self.rotations, self.scale, o["chunk"], False, 0)
        return self.out(a.transpose(1, 2).reshape(b, n, -1))


_RUNNER = r"""
import json, sys, time
import numpy as np, onnxruntime as ort
path, data, repeat, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
arrays = np.load(data)
options = ort.SessionOptions(); options.intra_op_num_threads = threads
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
feed = {i.name: arrays[f"arr_{n}"] for n, i in enumerate(session.get_inputs())}
def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
# Reset the peak-RSS mark (Linux >= 4.0) so session creation's transient does not count.
try:
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
base = status_kib("VmRSS")
out = session.run(None, feed)[0]
times = []
for _ in range(repeat):
    start = time.perf_counter(); session.run(None, feed); times.append(time.perf_counter() - start)
peak = status_kib("VmHWM")
np.save(data + ".out.npy", out)
print(json.dumps({"ms": 1e3 * float(np.median(times)), "peak_mib": max(0, peak - base) / 1024.0}))
"""


def run_in_fresh_process(model: Path, inputs: list[np.ndarray], repeat: int, threads: int, workdir: Path) -> tuple[dict, np.ndarray | None]:
    data = workdir / "inputs.npz"
    np.savez(data, *inputs)
    done = subprocess.run([sys.executable, "-c", _RUNNER, str(model), str(data), str(repeat), str(threads)],
                          check=False, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}, None
    return json.loads(done.stdout.strip().splitlines()[-1]), np.load(str(data) + ".out.npy")


class AttentionOnly(torch.nn.Module):
    """(q, k, v) → one attention variant; what "exact vs approximate attention" compares."""

    def __init__(self, variant: str, heads: int, head_dim: int, options: dict):
        super().__init__()
        self.variant, self.heads, self.options, self.scale = variant, heads, options, head_dim**-0.5
        self.register_buffer("zero_bias", torch.zeros(1, 1, 1, 1))
        self.register_buffer("rotations", reference.lsh_rotations(head_dim, options["buckets"], options["rounds"], seed=0))
        for name, tensor in zip(("wq", "bq", "wk", "bk", "mix"), hedgehog_init(heads, head_dim, head_dim)):
            self.register_buffer(name, tensor)
        self.eval()

    def forward(self, q, k, v):
        o, ops = self.options, torch.ops.graphopt
        if self.variant in ("decomposed", "attention23"):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scale)
        if self.variant == "fused":
            return ops.fused_attention(q, k, v, self.scale, False, self.heads)
        if self.variant == "nystrom":
            return ops.nystrom_attention(q, k, v, self.zero_bias, self.scale, o["landmarks"], o["iterations"], 0)
        if self.variant == "hedgehog":
            return ops.hedgehog_attention(q, k, v, self.zero_bias, self.wq, self.bq, self.wk, self.bk, self.mix, self.scale, o["block"], 1, False, 0)
        return ops.lsh_attention(q, k, v, self.zero_bias, self.rotations, self.scale, o["chunk"], False, 0)


def export_module(module: torch.nn.Module, example: tuple, dynamic_axis: int, path: Path, opset: int) -> None:
    seq = torch.export.Dim("seq", min=2, max=1 << 16)
    program = torch.onnx.export(module, example, dynamo=True, verbose=False, opset_version=opset,
                                dynamic_shapes=tuple({dynamic_axis: seq} for _ in example), custom_translation_table=lowering_table())
    program.save(str(path))


def measure(kind: str, models: dict, seq: int, inputs: list[np.ndarray], heads: int, repeat: int, threads: int, workdir: Path) -> list[dict]:
    """One row per variant at ``seq``; errors against the fused exact output of the same run."""
    score_bytes = 4 * heads * seq * seq
    outputs, rows = {}, []
    for variant in VARIANTS:
        row = {"part": kind, "seq": seq, "variant": variant, "load": os.getloadavg()[0]}
        if variant in ("decomposed", "attention23") and score_bytes > SCORE_MATRIX_LIMIT_BYTES:
            row["skipped"] = f"score matrix needs {score_bytes / 2**30:.1f} GiB"
        else:
            result, outputs[variant] = run_in_fresh_process(models[variant], inputs, repeat if seq <= 4096 else max(2, repeat // 2), threads, workdir)
            row.update(result)
        rows.append(row)
        print(json.dumps(row), flush=True)
    exact = outputs.get("fused")
    for row in rows:
        out = outputs.get(row["variant"])
        if exact is not None and out is not None:
            row["rel_error"] = reference.relative_error(torch.from_numpy(out), torch.from_numpy(exact))
    fused_ms = next((r["ms"] for r in rows if r["variant"] == "fused" and "ms" in r), None)
    for row in rows:
        if fused_ms and "ms" in row:
            row["speedup_vs_fused"] = fused_ms / row["ms"]
    return rows


def attention_benchmark(lm, seqs, options, repeat, threads, workdir: Path) -> list[dict]:
    heads = lm.model.config.num_attention_heads
    head_dim = lm.model.config.hidden_size // heads
    example = tuple(torch.randn(1, heads, 64, head_dim) + i for i in range(3))
    models = {}
    for variant in VARIANTS:
        models[variant] = workdir / f"attention_{variant}.onnx"
        export_module(AttentionOnly(variant, heads, head_dim, options), example, 2, models[variant], 23 if variant == "attention23" else 18)
    rows = []
    for seq in seqs:
        q, k, v, _scale = minilm_qkv(lm.model, lm.tokenizer, seq, layer=0)
        rows += measure("attention", models, seq, [t.numpy() for t in (q, k, v)], heads, repeat, threads, workdir)
    return rows


def block_benchmark(lm, seqs, options, repeat, threads, workdir: Path) -> list[dict]:
    attention = lm.model.encoder.layer[0].attention
    example = (torch.randn(1, 64, attention.self.query.in_features),)
    models = {}
    for variant in VARIANTS:
        models[variant] = workdir / f"block_{variant}.onnx"
        export_module(Block(attention, variant, options), example, 1, models[variant], 23 if variant == "attention23" else 18)
    rows = []
    for seq in seqs:
        x = long_hidden_states(lm.model, lm.tokenizer, seq, 0).numpy()
        rows += measure("block", models, seq, [x], attention.self.num_attention_heads, repeat, threads, workdir)
    return rows


def layer_errors(lm, seq: int, options: dict) -> list[dict]:
    rows = []
    for layer in range(lm.model.config.num_hidden_layers):
        q, k, v, scale = minilm_qkv(lm.model, lm.tokenizer, seq, layer)
        exact = reference.exact_attention(q, k, v, None, scale)
        nys = reference.nystrom_attention(q, k, v, None, scale, options["landmarks"], options["iterations"], 0)
        rot = reference.lsh_rotations(q.shape[-1], options["buckets"], options["rounds"], seed=0)
        lsh = reference.lsh_attention(q, k, v, None, rot, scale, options["chunk"], False, 0)
        mean_v = v.mean(-2, keepdim=True).expand_as(exact)  # the trivial "uniform attention" baseline
        row = {"layer": layer, "seq": seq, "nystrom": reference.relative_error(nys, exact), "lsh": reference.relative_error(lsh, exact),
               "uniform_baseline": reference.relative_error(mean_v, exact)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def packed_sentences(tokenizer, sentences: list[str], seq: int, count: int) -> tuple[dict, list[list[tuple[int, int]]]]:
    """``count`` inputs of ``seq`` tokens packed with whole sentences, and each sentence's span."""
    rows, spans, sentences = [], [], iter(sentences)
    for _ in range(count):
        ids, row_spans = [tokenizer.cls_token_id], []
        for sentence in sentences:
            piece = tokenizer(sentence, add_special_tokens=False)["input_ids"]
            if len(ids) + len(piece) > seq - 1:
                break
            row_spans.append((len(ids), len(ids) + len(piece)))
            ids += piece
        ids += [tokenizer.sep_token_id] + [tokenizer.pad_token_id] * (seq - len(ids) - 1)
        rows.append(ids)
        spans.append(row_spans)
    input_ids = torch.tensor(rows)
    mask = (input_ids != tokenizer.pad_token_id).long()
    return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(input_ids)}, spans


@torch.no_grad()
def sentence_embeddings(run, inputs: dict, spans) -> torch.Tensor:
    hidden = run(**inputs)
    hidden = hidden[0] if isinstance(hidden, (tuple, list)) else getattr(hidden, "last_hidden_state", hidden)
    return torch.stack([hidden[row, a:b].mean(0) for row, row_spans in enumerate(spans) for a, b in row_spans])


def minilm_budget(lm, options: dict, method: str, min_cosine: float, threshold: int, batches: int) -> dict:
    import graphopt
    from graphopt.context import PassContext
    from graphopt.data import heldout_sentences, train_sentences
    from graphopt.manager import PassManager
    from graphopt.passes.approx_attention import ApproxAttention
    from graphopt.verify import Budget

    calibration, _ = packed_sentences(lm.tokenizer, train_sentences(), 512, 2)
    # transformers' own SDPA attention: no sdpa pass needed (on eager attention at 512 tokens
    # that pass moves padding positions by 3e-5 through kernel rounding, over the 1e-5 that
    # exact passes are held to at every position).
    sdpa_model = load_model("minilm", attn_implementation="sdpa").model
    program = graphopt.capture(sdpa_model, kwargs=calibration)
    layers = lm.model.config.num_hidden_layers
    approx = {k: options[k] for k in (("landmarks", "iterations") if method == "nystrom" else ("buckets", "rounds", "chunk"))}
    # One optional pass per layer: the budget may reject any of them without failing the run.
    passes = [ApproxAttention(method=method, layers=(i,), threshold=threshold, optional=True, **approx) for i in reversed(range(layers))]
    manager = PassManager(passes, budget=Budget(min_cosine=min_cosine))
    # The budget is measured on real 512-token inputs: random short batches would stay
    # under the threshold, where the approximation is exact attention.
    ctx = PassContext(verification=(((), calibration),), verification_source="2 packed 512-token training inputs")
    start = time.perf_counter()
    result = manager(program, ctx)
    records = [{"pass": r.text, "status": r.status, "reason": r.reason,
                "layer_error": (r.info.get("layers") or [{}])[0].get("rel_error"), "cosine_total": (r.drift_total or {}).get("cosine")}
               for r in manager.report.passes]
    heldout, spans = packed_sentences(lm.tokenizer, heldout_sentences(), 512, batches)
    reference_emb = sentence_embeddings(lm.model, heldout, spans)
    candidate_emb = sentence_embeddings(result.program, heldout, spans)
    cosine = torch.nn.functional.cosine_similarity(reference_emb, candidate_emb, dim=-1)
    return {"method": method, "threshold": threshold, "budget_min_cosine": min_cosine, "passes": records,
            "approximated_layers": sorted(r.info["layers"][0]["layer"] for r in manager.report.passes if r.name == "approx-attention" and r.status == "applied"),
            "heldout_sentences": int(cosine.numel()), "heldout_mean_cosine": float(cosine.mean()), "heldout_min_cosine": float(cosine.min()),
            "seconds": time.perf_counter() - start}


# ---- part 4: trained approximations on MiniLM at 512 tokens -----------------------------------
TRAINED = {  # the approximations with trainable weights, as the long-attention preset configures hedgehog
    "hedgehog": "approx-attention{method=hedgehog,block=64,sinks=1}",
    "linformer": "approx-attention{method=linformer,landmarks=128,max_tokens=512}",
    "nystrom-learned": "approx-attention{method=nystrom-learned,landmarks=64,max_tokens=512}",
}
EXPORT_TAIL = "fused-attention?,bias-gelu?,dce?"  # what every variant is deployed with (exact layers fused)


def attention_flops(seq: int, head_dim: int, method: str | None, block: int = 64, landmarks: int = 64, features: int = 32) -> float:
    """Matmul FLOPs of one head's attention at ``seq`` tokens (feature maps included)."""
    n, d = seq, head_dim
    if method is None:
        return 4.0 * n * n * d
    if method == "hedgehog":
        f2 = 2 * features
        return 4.0 * n * (2 * block + 1) * (d + 1) + 2 * 2.0 * n * d * features + 2 * 2.0 * n * f2 * (d + 1)
    if method == "linformer":
        return 2 * 2.0 * landmarks * n * d + 4.0 * n * landmarks * d
    return 2 * 2.0 * landmarks * n * d + 4.0 * n * landmarks * d * 2 + 2.0 * landmarks**3 * 6 * 3  # nystrom-learned


def long_attention_splits(lm):
    """The long-attention preset's text: its [data] split sizes, sentences joined into 512-token passages."""
    from graphopt.datasets import load_splits, passage_joiner
    from graphopt.recipe import Recipe

    settings = Recipe.load("long-attention").data
    return load_splits(calibration=settings.calibration, verification=settings.verification, heldout=settings.heldout,
                       join=passage_joiner(lm.tokenizer, settings.passage_tokens or 512))


def trained_benchmark(args, out: Path) -> dict:
    import graphopt
    from graphopt.attention.transfer import capture, sample_error, trainable_sites
    from graphopt.data import tokenize
    from graphopt.datasets import text_context
    from graphopt.export import to_onnx
    from graphopt.fidelity import compare_encoders
    from graphopt.recipe import Recipe

    lm = load_model("minilm")
    recipe = Recipe.load("long-attention")
    settings = recipe.data
    splits = long_attention_splits(lm)
    names = list(lm.example_kwargs)
    ctx = text_context(lm.tokenizer, splits, names, max_length=settings.max_length)
    program = graphopt.capture(lm.model, kwargs=lm.example_kwargs)
    transfer = next(p.text() for p in recipe.manager().leaves() if p.name == "attention-transfer")
    heldout = list(splits.heldout)
    held_batches = [((), {k: v for k, v in tokenize(lm.tokenizer, heldout[i : i + 8], max_length=512).items() if k in names})
                    for i in range(0, len(heldout), 8)]
    heads, head_dim = lm.model.config.num_attention_heads, lm.model.config.hidden_size // lm.model.config.num_attention_heads
    variants: dict[str, dict] = {}

    def add(name: str, built, method: str | None, seconds: float) -> None:
        sites = trainable_sites(built)
        errors = {}
        if sites:
            samples = capture(built, sites, held_batches)
            errors = {s.layer: sample_error(s, samples[s.node.name]) for s in sites}
        fidelity = compare_encoders(lm.model, built, lm.tokenizer, heldout, max_length=512, input_names=names)
        exported = to_onnx(built, out / "models" / f"{name.replace(' ', '_').replace('+', '')}.onnx")
        flops = (len(sites) * attention_flops(512, head_dim, method) + (6 - len(sites)) * attention_flops(512, head_dim, None)) / (6 * attention_flops(512, head_dim, None))
        variants[name] = {"path": str(exported.path), "mb": exported.bytes / 1e6, "approximate_layers": sorted(errors), "heldout_layer_error": errors,
                          "heldout_mean_cosine": fidelity["mean_cosine"], "heldout_min_cosine": fidelity["min_cosine"], "n": fidelity["n"],
                          "attention_flops_vs_exact": flops, "build_s": round(seconds, 1)}
        print(json.dumps({"variant": name, **{k: v for k, v in variants[name].items() if k != "path"}}), flush=True)

    def build(pipeline: str):
        start = time.perf_counter()
        result = graphopt.optimize(program, pipeline, context=ctx, budget={"min_cosine": 0.3})
        if not result.report.ok:
            raise SystemExit(f"{pipeline}: {result.report.failures}")
        return result, time.perf_counter() - start

    exact, seconds = build(f"dce?,sdpa,{EXPORT_TAIL}")
    add("exact (fused attention)", exact.program, None, seconds)
    for method in args.trained_methods.split(","):
        untrained, seconds = build(f"dce?,sdpa,{TRAINED[method]},{EXPORT_TAIL}")
        add(f"{method}, untrained", untrained.program, method, seconds)
        trained, seconds = build(f"dce?,sdpa,{TRAINED[method]},{transfer},{EXPORT_TAIL}")
        record = next(r for r in trained.report.passes if r.name == "attention-transfer")
        add(f"{method} + transfer", trained.program, method, seconds)
        variants[f"{method} + transfer"]["transfer"] = record.info
    if args.bundle:
        variants["long-attention preset (bundle)"] = _bundle_variant(Path(args.bundle), lm, heldout, names, heads, head_dim)
    else:
        preset, seconds = build(recipe)  # type: ignore[arg-type]
        add("long-attention preset (bundle)", preset.program, "hedgehog", seconds)
    timings = _time_variants(variants, lm, heldout, args)
    return {"variants": variants, "timings": timings}


# ---- part 5: error bounds of sub-quadratic forms at 512 tokens ------------------------------------
BOUND_FORMS = ("window + [CLS]", "+ [SEP], punctuation", "+ far keys pooled by 16", "+ far keys pooled by 4",
               "+ oracle top-64 far keys", "+ oracle top-128 far keys")
PUNCTUATION = (".", ",", ":", ";", "(", ")", "'", '"', "-")


@torch.no_grad()
def _bound_outputs(q, k, v, key_bias, global_keys, block: int = 64):
    """Every form of :data:`BOUND_FORMS` on one layer's (b, h, n, d) q, k, v: name -> (output, keys per query / n)."""
    n, d = q.shape[-2], q.shape[-1]
    scores = q @ k.transpose(-1, -2) * d**-0.5 + key_bias
    qi, ki = torch.arange(n)[:, None] // block, torch.arange(n)[None, :] // block
    local = (ki == qi) | (ki == qi - 1) | (torch.arange(n)[None, :] == 0)  # own block, previous block, [CLS]
    outputs = {}

    def restricted(name, keep, extra=None):
        masked = scores.masked_fill(~keep, float("-inf"))
        if extra is None:
            outputs[name] = (torch.softmax(masked, -1) @ v, float(keep.float().sum(-1).mean()) / n)
            return
        pooled_scores, pooled_v, count = extra
        weights = torch.softmax(torch.cat([masked, pooled_scores], -1), -1)
        outputs[name] = (weights[..., :n] @ v + weights[..., n:] @ pooled_v, (float(keep.float().sum(-1).mean()) + count) / n)

    restricted(BOUND_FORMS[0], local.expand_as(scores))
    restricted(BOUND_FORMS[1], local | global_keys[:, None, None, :])
    valid = (key_bias > -1e4).float().reshape(key_bias.shape[0], 1, 1, n)
    for name, group in ((BOUND_FORMS[2], 16), (BOUND_FORMS[3], 4)):
        # a far group of g keys as one key: the mean key and value of its valid keys, weight (valid count) · exp(q · mean key)
        g = n // group
        w = valid.reshape(valid.shape[0], 1, g, group, 1)
        count = w.sum(3).clamp(min=1e-30)
        k_mean, v_mean = (k.reshape(*k.shape[:2], g, group, d) * w).sum(3) / count, (v.reshape(*v.shape[:2], g, group, d) * w).sum(3) / count
        group_block = (torch.arange(g) * group // block)[None, :]
        far_group = ~((group_block == qi) | (group_block == qi - 1))  # (n, g): groups outside the query's window
        pooled = (q @ k_mean.transpose(-1, -2) * d**-0.5 + count.reshape(count.shape[0], 1, 1, g).log()).masked_fill(~far_group, float("-inf"))
        restricted(name, local.expand_as(scores), (pooled, v_mean, float(far_group.float().sum(-1).mean())))
    far_scores = scores.masked_fill(local, float("-inf"))
    for name, top in ((BOUND_FORMS[4], 64), (BOUND_FORMS[5], 128)):
        restricted(name, local | (far_scores >= far_scores.topk(top, -1).values[..., -1:]))
    return outputs


def bounds_benchmark(lm, batches: int = 8) -> dict:
    """Per-layer attention-output error of :data:`BOUND_FORMS` on MiniLM's held-out 512-token passages."""
    from graphopt.data import tokenize

    heldout = list(long_attention_splits(lm).heldout)
    config = lm.model.config
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    punctuation = torch.tensor([lm.tokenizer.sep_token_id, *lm.tokenizer.convert_tokens_to_ids(list(PUNCTUATION))])
    captured: dict = {}
    hooks = [getattr(layer.attention.self, part).register_forward_hook(lambda _m, _i, out, key=(i, part): captured.__setitem__(key, out))
             for i, layer in enumerate(lm.model.encoder.layer) for part in ("query", "key", "value")]
    sums = {(layer, form): [0.0, 0.0] for layer in range(config.num_hidden_layers) for form in BOUND_FORMS}
    keys = dict.fromkeys(BOUND_FORMS, 0.0)
    try:
        for start in range(0, len(heldout), batches):
            batch = tokenize(lm.tokenizer, heldout[start : start + batches], max_length=512, padding="max_length")
            with torch.no_grad():
                lm.model(**{k: v for k, v in batch.items() if k in lm.example_kwargs})
            mask = batch["attention_mask"].bool()
            key_bias = torch.where(mask, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
            real = mask[:, None, :, None].float()
            for layer in range(config.num_hidden_layers):
                q, k, v = (captured[(layer, p)].reshape(mask.shape[0], -1, heads, head_dim).transpose(1, 2) for p in ("query", "key", "value"))
                exact = reference.exact_attention(q, k, v, key_bias, head_dim**-0.5)
                for form, (out, fraction) in _bound_outputs(q, k, v, key_bias, torch.isin(batch["input_ids"], punctuation)).items():
                    sums[(layer, form)][0] += float((((out - exact) ** 2) * real).sum())
                    sums[(layer, form)][1] += float(((exact**2) * real).sum())
                    keys[form] += fraction / (config.num_hidden_layers * -(-len(heldout) // batches))
    finally:
        for hook in hooks:
            hook.remove()
    errors = {form: {layer: (sums[(layer, form)][0] / sums[(layer, form)][1]) ** 0.5 for layer in range(config.num_hidden_layers)} for form in BOUND_FORMS}
    result = {"passages": len(heldout), "errors": errors, "keys_fraction": keys}
    print(json.dumps(result), flush=True)
    return result


def bounds_markdown(result: dict) -> str:
    layers = sorted(next(iter(result["errors"].values())))
    lines = ["| form (nothing fitted) | keys per query / 512 | " + " | ".join(f"layer {i}" for i in layers) + " |",
             "|---|---:|" + "---:|" * len(layers)]
    for form, errors in result["errors"].items():
        lines.append(f"| {form} | {result['keys_fraction'][form]:.2f} | " + " | ".join(f"{errors[i]:.3f}" for i in layers) + " |")
    return "\n".join(lines)


def _bundle_variant(bundle: Path, lm, heldout: list[str], names: list[str], heads: int, head_dim: int) -> dict:
    """A built bundle's model.onnx: its fidelity on the same held-out passages, through ORT."""
    import onnx

    from graphopt.export import make_session
    from graphopt.fidelity import compare_encoders

    path = bundle / "model.onnx"
    session = make_session(path, threads=2)

    def encoder(**inputs):
        feed = {k: v.numpy() for k, v in inputs.items() if k in {i.name for i in session.get_inputs()}}
        return torch.from_numpy(session.run(None, feed)[0])

    fidelity = compare_encoders(lm.model, encoder, lm.tokenizer, heldout, max_length=512, input_names=names)
    ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    approx = sum(1 for op in ops if op == "If")  # one If (threshold) per approximate layer
    flops = (approx * attention_flops(512, head_dim, "hedgehog") + (6 - approx) * attention_flops(512, head_dim, None)) / (6 * attention_flops(512, head_dim, None))
    report = json.loads((bundle / "report.json").read_text())
    transfer = next((p["info"] for p in report["passes"] if p["name"] == "attention-transfer"), {})
    distill = next((p["info"] for p in report["passes"] if p["name"] == "distill"), {})
    row = {"path": str(path), "mb": path.stat().st_size / 1e6, "approximate_layers": [r["layer"] for r in transfer.get("layers", []) if r["kept"]],
           "heldout_mean_cosine": fidelity["mean_cosine"], "heldout_min_cosine": fidelity["min_cosine"], "n": fidelity["n"],
           "attention_flops_vs_exact": flops, "transfer_s": transfer.get("wall_s"), "distill_s": distill.get("wall_s"), "distill_steps": distill.get("steps"),
           "transfer": transfer}
    print(json.dumps({"variant": "long-attention preset", **{k: v for k, v in row.items() if k not in ("path", "transfer")}}), flush=True)
    return row


def _time_variants(variants: dict, lm, heldout: list[str], args) -> list[dict]:
    """Latency and peak memory at 512 tokens, batch 1 and 8: one fresh process per
    measurement (one runtime alive at a time), variants alternating over ``args.timing_rounds``."""
    import onnx

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch in (1, 8):
            tensors = graphopt_tokenize(lm.tokenizer, (heldout * 8)[:batch])
            for round_index in range(args.timing_rounds):
                for name, variant in variants.items():
                    inputs = [tensors[i.name] for i in onnx.load(variant["path"], load_external_data=False).graph.input]
                    result, _ = run_in_fresh_process(Path(variant["path"]), inputs, args.repeat, args.threads, Path(tmp))
                    row = {"variant": name, "batch": batch, "round": round_index, "load": os.getloadavg()[0], **result}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def graphopt_tokenize(tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
    from graphopt.data import tokenize

    return {k: v.numpy() for k, v in tokenize(tokenizer, texts, max_length=512, padding="max_length").items()}


def trained_markdown(results: dict) -> str:
    variants, timings = results["variants"], results["timings"]
    exact = "exact (fused attention)"

    def median(name, batch, key):
        values = [r[key] for r in timings if r["variant"] == name and r["batch"] == batch and key in r]
        return float(np.median(values)) if values else float("nan")

    def ratio(name, batch):  # per-round ratios to exact, then their median
        per = [r["ms"] / e["ms"] for r in timings for e in timings
               if r["variant"] == name and e["variant"] == exact and r["batch"] == e["batch"] == batch and r["round"] == e["round"] and "ms" in r and "ms" in e]
        return float(np.median(per)) if per else float("nan")

    lines = ["| variant | approx. layers | held-out cos mean / min | per-layer error (held-out) | attn FLOPs vs exact | b1 ms | b1 × exact | b8 ms | b8 × exact | b8 peak MiB | MB |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, v in variants.items():
        errors = ", ".join(f"{layer}: {e:.3f}" for layer, e in sorted(v.get("heldout_layer_error", {}).items(), key=lambda x: int(x[0])))
        lines.append(f"| {name} | {v['approximate_layers']} | {v['heldout_mean_cosine']:.4f} / {v['heldout_min_cosine']:.4f} | {errors} | {v['attention_flops_vs_exact']:.2f} "
                     f"| {median(name, 1, 'ms'):.1f} | {ratio(name, 1):.2f} | {median(name, 8, 'ms'):.1f} | {ratio(name, 8):.2f} | {median(name, 8, 'peak_mib'):.0f} | {v['mb']:.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in ("attention", "block") if any(r["part"] == p for r in rows)]
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4.5), squeeze=False)
    for ax, part in zip(axes[0], parts):
        for variant in VARIANTS:
            points = [(r["seq"], r["ms"]) for r in rows if r["part"] == part and r["variant"] == variant and "ms" in r]
            if points:
                ax.plot(*zip(*points), marker="o", label=variant)
        seqs = sorted({r["seq"] for r in rows if r["part"] == part})
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(seqs, [str(s) for s in seqs])
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("latency (ms, median)")
        ax.set_title(f"MiniLM {'attention (q, k, v in)' if part == 'attention' else 'attention block'} - ORT CPU, batch 1")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(rows: list[dict]) -> str:
    lines = ["| part | seq | variant | latency ms | speed-up vs fused | extra peak MiB | rel. error vs exact | load (1 min) |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        head = f"| {r['part']} | {r['seq']} | {r['variant']} |"
        if "skipped" in r:
            lines.append(f"{head} skipped: {r['skipped']} | | | | {r['load']:.1f} |")
        elif "error" in r:
            lines.append(f"{head} failed: {r['error']} | | | | {r['load']:.1f} |")
        else:
            err = r.get("rel_error")
            lines.append(f"{head} {r['ms']:.1f} | {r.get('speedup_vs_fused', float('nan')):.2f}x | {r['peak_mib']:.0f} | {'' if err is None else f'{err:.3f}'} | {r['load']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/attention_long")
    parser.add_argument("--seqs", default=",".join(map(str, SEQS)))
    parser.add_argument("--parts", default="attention,block,layers,minilm,trained,bounds")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--landmarks", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--buckets", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--layer-seq", type=int, default=4096)
    parser.add_argument("--min-cosine", type=float, default=0.98)
    parser.add_argument("--minilm-threshold", type=int, default=256)
    parser.add_argument("--minilm-batches", type=int, default=8)
    parser.add_argument("--block", type=int, default=64, help="hedgehog's block (exact window) in the attention and block parts")
    parser.add_argument("--trained-methods", default=",".join(TRAINED))
    parser.add_argument("--bundle", default=None, help="trained part: a long-attention build folder to measure instead of building the preset here")
    parser.add_argument("--timing-rounds", type=int, default=3, help="trained part: alternating timing rounds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    options = {k: getattr(args, k) for k in ("landmarks", "iterations", "buckets", "rounds", "chunk", "block")}
    lm = load_model("minilm")
    results = {"environment": {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version(),
                               "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__, "threads": args.threads,
                               "load_at_start": os.getloadavg()},
               "options": options, "command": " ".join(sys.argv)}
    parts = args.parts.split(",")
    seqs = [int(x) for x in args.seqs.split(",")]
    timed = []
    with tempfile.TemporaryDirectory() as tmp:
        if "attention" in parts:
            timed += attention_benchmark(lm, seqs, options, args.repeat, args.threads, Path(tmp))
        if "block" in parts:
            timed += block_benchmark(lm, seqs, options, args.repeat, args.threads, Path(tmp))
    if timed:
        results["timings"] = timed
        (out / "timings.md").write_text(markdown(timed) + "\n")
        plot(timed, out / "latency_loglog.png")
        print(markdown(timed))
    if "layers" in parts:
        results["layers"] = layer_errors(lm, args.layer_seq, options)
    if "minilm" in parts:
        results["minilm"] = [minilm_budget(lm, options, method, args.min_cosine, args.minilm_threshold, args.minilm_batches) for method in ("nystrom", "lsh")]
        for r in results["minilm"]:
            print(json.dumps({k: v for k, v in r.items() if k != "passes"}))
    if "trained" in parts:
        results["trained"] = trained_benchmark(args, out)
        (out / "trained.md").write_text(trained_markdown(results["trained"]) + "\n")
        print(trained_markdown(results["trained"]))
    if "bounds" in parts:
        results["bounds"] = bounds_benchmark(lm)
        (out / "bounds.md").write_text(bounds_markdown(results["bounds"]) + "\n")
        print(bounds_markdown(results["bounds"]))
    results["environment"]["load_at_end"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""onnxruntime-genai peer for the decoder benchmark (benchmarks/decoder.py): the model builder's
CPU int4 export of a Hugging Face folder, timed and read through ``onnxruntime_genai``.
Benchmark-only; graphopt never imports it, and it imports nothing of graphopt.

onnxruntime-genai 0.18 runs on the same onnxruntime wheel as graphopt (>= 1.31; 1.32 here), and
graphopt's test extra installs it. Every step that touches it still runs in a subprocess (one
runtime alive at a time, and its own peak RSS): this python when it has onnxruntime_genai, else
``GRAPHOPT_GENAI_PYTHON`` or ``/work/genai/venv/bin/python``. A separate venv is set up with::

    python3.11 -m venv /work/genai/venv
    /work/genai/venv/bin/pip install torch==2.13.0          # first: the CPU build, as the repo pins it
    /work/genai/venv/bin/pip install onnxruntime-genai==0.18.0 transformers==5.24.0 onnx onnx-ir safetensors

(the builder imports ``onnx_ir`` but its wheel does not declare it). This module's own process
never imports ``onnxruntime`` or ``onnxruntime_genai``; the same file is the subprocesses' worker
(``--worker``), so it must stay importable without graphopt.

Functions:

- ``make_random_model(folder, config=QWEN25_05B, seed=0)``: a random-weight Qwen2 causal LM
  folder (``save_pretrained``: config.json + model.safetensors, fp32), the same weights as
  ``decoder.random_model_dir`` for the same config and seed, plus a small byte-level BPE
  tokenizer (the builder loads one with ``AutoTokenizer`` and copies it beside the model).
- ``build_genai(folder, out, precision="int4")``: ``python -m onnxruntime_genai.models.builder
  -i <folder> -o <out> -p int4 -e cpu``, cached (a finished build carries
  ``genai_peer_build.json``; builds go to ``<out>.tmp`` and are renamed when done). A folder
  without a tokenizer (``decoder.random_model_dir``'s) is built through a staging folder of
  symlinks plus the stand-in tokenizer, so the caller's folder is left as it is.
- ``time_genai(out, prompt_len=128, new_tokens=128, rounds=3, threads=2)``: one subprocess loads
  the model once (``intra_op_num_threads`` set through ``og.Config.overlay``), warms up, then per
  round a fresh ``og.Generator``: prefill = ``append_tokens(prompt)`` + the first greedy
  ``generate_next_token`` (time to first token, batch 1, random ids), decode = the next
  ``new_tokens - 1`` tokens (``decode_tokens_per_s`` = steps / their time), as
  ``graphopt.export.generation.Generator.timings`` counts them. ``min_length`` keeps an EOS from
  ending a round early. Returns the medians at top level (``prefill_ms``,
  ``decode_tokens_per_s``, ``peak_rss_mb``) plus every round, and the model files' bytes.
- ``genai_logits(out, input_ids, method="ort")``: teacher-forced logits ``[len, vocab]`` (float32)
  of the builder's model over one sequence. ``method="ort"`` (default) runs ``model.onnx``
  directly in the genai venv's onnxruntime with empty past (``past_key_values.*`` of length 0) and
  an all-ones attention mask: one prefill over the whole sequence, logits for every position.
  ``method="genai"`` does the same through ``og.Generator.append_tokens`` +
  ``get_output("logits")`` (the runtime's own input preparation); both agree.
- ``inspect_genai(out)``: the exported graph's op census, MatMulNBits / GroupQueryAttention
  attributes, inputs and outputs, and the genai_config.json.

    /work/genai/venv/bin/python benchmarks/genai_peer.py --small            # smoke: tiny model, end to end
    python benchmarks/genai_peer.py --root /work/genai --rounds 1 --new-tokens 32   # Qwen2.5-0.5B shape
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

GENAI_PYTHON_DEFAULT = "/work/genai/venv/bin/python"
BUILD_MARKER = "genai_peer_build.json"
MODEL_MARKER = "genai_peer_model.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# Qwen2.5-0.5B's shape (the same dict as benchmarks/decoder.py's, so one folder serves both).
QWEN25_05B: dict[str, Any] = {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864,
                              "vocab_size": 151936, "tie_word_embeddings": True, "rope_theta": 1000000.0, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                              "bos_token_id": 151643, "eos_token_id": 151643}
# A tiny decoder of the same family, for smoke tests (seconds to build).
QWEN_SMALL: dict[str, Any] = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256,
                              "vocab_size": 2048, "tie_word_embeddings": True, "rope_theta": 1000000.0, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
                              "bos_token_id": 2047, "eos_token_id": 2047}


def genai_python() -> str:
    """The python that runs onnxruntime-genai: ``GRAPHOPT_GENAI_PYTHON``, else this one when it
    has onnxruntime_genai (the test extra installs it: it runs on the same onnxruntime 1.32),
    else the separate venv's."""
    import importlib.util
    import sys

    if "GRAPHOPT_GENAI_PYTHON" in os.environ:
        return os.environ["GRAPHOPT_GENAI_PYTHON"]
    return sys.executable if importlib.util.find_spec("onnxruntime_genai") is not None else GENAI_PYTHON_DEFAULT


def genai_versions() -> dict[str, str] | None:
    """Versions in the genai venv (onnxruntime-genai, onnxruntime, transformers, torch), or None
    when that python is missing or cannot import onnxruntime_genai."""
    if not Path(genai_python()).exists():
        return None
    try:
        return _worker_call("versions", {})
    except RuntimeError:
        return None


# ---- the random model ------------------------------------------------------------------------------
def make_random_model(folder: str | Path, config: dict | None = None, seed: int = 0, bias_std: float = 0.0) -> Path:
    """A Hugging Face folder of a random-weight ``Qwen2ForCausalLM`` (fp32 safetensors) with a
    stand-in tokenizer; cached: written once per (config, seed, bias_std). Needs torch and
    transformers (either venv has them); runs in this process, which imports no onnxruntime.

    transformers' init leaves the q/k/v biases at zero, and the builder drops all-zero biases (no
    qkv Add, unlike a real Qwen2 checkpoint's export); ``bias_std > 0`` draws them from
    N(0, bias_std) instead (the weights then differ from ``decoder.random_model_dir``'s)."""
    import torch
    import transformers

    folder = Path(folder)
    config = dict(config or QWEN25_05B)
    key = {"config": config, "seed": seed, "tokenizer": 2, **({"bias_std": bias_std} if bias_std else {})}
    marker = folder / MODEL_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == key:
        return folder
    if folder.exists():
        raise FileExistsError(f"{folder} exists but was not written by make_random_model with this config/seed; remove it or pick another folder")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config)).eval()
    if bias_std:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                    param.normal_(0.0, bias_std)
    model.save_pretrained(tmp)
    write_tokenizer(tmp, config["vocab_size"], config.get("eos_token_id"))
    (tmp / MODEL_MARKER).write_text(json.dumps(key, indent=2))
    tmp.rename(folder)
    return folder


def _training_text() -> list[str]:
    """Deterministic text to train the stand-in tokenizer on: some of the standard library's source."""
    import argparse as a
    import json.decoder as j
    import textwrap as t
    import unittest.case as u

    return [Path(str(m.__file__)).read_text() for m in (a, j, t, u)]


def write_tokenizer(folder: str | Path, model_vocab: int, eos_id: int | list[int] | None = None, size: int = 1024) -> None:
    """A small byte-level BPE ``PreTrainedTokenizerFast`` saved into ``folder`` (tokenizer.json,
    tokenizer_config.json): ``size - 1`` learned tokens (ids 0..) plus ``<|endoftext|>`` as its eos at
    ``eos_id`` (config.json's, default ``model_vocab - 1``), as Qwen's tokenizer has it. That id
    matters: transformers 5 loads any tokenizer of a qwen2 folder as ``Qwen2Tokenizer``, whose eos
    is ``<|endoftext|>``, and the builder appends the tokenizer's eos id to genai_config's
    ``eos_token_id`` when it differs from config.json's. Timing and logits feed ids directly and
    never tokenize."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if isinstance(eos_id, (list, tuple)):
        eos_id = eos_id[0]
    eos_id = model_vocab - 1 if eos_id is None else int(eos_id)
    size = min(size, model_vocab)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_training_text(), trainer=trainer)
    spec = json.loads(tok.to_str())
    if not tok.get_vocab_size() <= eos_id < model_vocab:
        raise ValueError(f"eos id {eos_id} must lie in [{tok.get_vocab_size()}, {model_vocab})")
    spec["model"]["vocab"]["<|endoftext|>"] = eos_id
    spec["added_tokens"] = [{"id": eos_id, "content": "<|endoftext|>", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}]
    tok = Tokenizer.from_str(json.dumps(spec))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", model_max_length=1 << 20).save_pretrained(str(folder))


def _has_tokenizer(folder: Path) -> bool:
    return all((folder / name).is_file() for name in TOKENIZER_FILES) or (folder / "tokenizer.model").is_file() or (folder / "vocab.json").is_file()


# ---- build -------------------------------------------------------------------------------------------
def build_complete(out: str | Path) -> dict | None:
    """The build record of a finished builder output folder, or None."""
    marker = Path(out) / BUILD_MARKER
    if not marker.is_file():
        return None
    record = json.loads(marker.read_text())
    if not all((Path(out) / name).is_file() for name in record.get("files", ["genai_config.json", "model.onnx"])):
        return None
    return record


def build_genai(folder: str | Path, out: str | Path, precision: str = "int4", execution_provider: str = "cpu",
                extra_options: dict[str, Any] | None = None, threads: int | None = None) -> Path:
    """Run onnxruntime-genai's model builder on the Hugging Face folder ``folder`` into ``out``
    (cached: skipped when ``out`` holds a finished build with the same options). Returns ``out``.
    The builder's log goes to ``<out>.build.log``."""
    folder, out = Path(folder).absolute(), Path(out).absolute()
    options = {"precision": precision, "execution_provider": execution_provider, "extra_options": dict(extra_options or {})}
    record = build_complete(out)
    if record is not None:
        if {k: record.get(k) for k in options} == options:
            return out
        raise FileExistsError(f"{out} holds a builder output with other options ({ {k: record.get(k) for k in options} }); remove it first")
    if out.exists():
        raise FileExistsError(f"{out} exists but is no finished build of build_genai; remove it first")
    tmp = out.with_name(out.name + ".tmp")
    stage = out.with_name(out.name + ".src")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(stage, ignore_errors=True)
    source = folder
    if not _has_tokenizer(folder):
        # The builder needs a tokenizer; leave the caller's folder untouched and stage one beside it.
        stage.mkdir(parents=True)
        for item in folder.iterdir():
            (stage / item.name).symlink_to(item)
        config = json.loads((folder / "config.json").read_text())
        _worker_call("tokenizer", {"folder": str(stage), "vocab": int(config["vocab_size"]), "eos": config.get("eos_token_id")})
        source = stage
    command = [genai_python(), "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(tmp), "-p", precision,
               "-e", execution_provider, "-c", str(tmp.with_name(out.name + ".cache"))]
    if extra_options:
        command += ["--extra_options", *(f"{k}={v}" for k, v in extra_options.items())]
    env = _env(threads)
    log = out.with_name(out.name + ".build.log")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as stream:
        done = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env=env, cwd=str(out.parent), check=False)
    seconds = time.perf_counter() - start
    shutil.rmtree(tmp.with_name(out.name + ".cache"), ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(f"model builder failed (exit {done.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    files = sorted(p.name for p in tmp.iterdir() if p.is_file())
    if "model.onnx" not in files or "genai_config.json" not in files:
        raise RuntimeError(f"model builder wrote no model.onnx/genai_config.json into {tmp}: {files}")
    record = {**options, "source": str(folder), "command": command, "build_s": round(seconds, 1), "files": files, "versions": _worker_call("versions", {})}
    (tmp / BUILD_MARKER).write_text(json.dumps(record, indent=2))
    tmp.rename(out)
    shutil.rmtree(stage, ignore_errors=True)
    return out


def model_bytes(out: str | Path) -> int:
    """Bytes on disk of the exported model (``*.onnx`` and their external data)."""
    return sum(p.stat().st_size for p in Path(out).iterdir() if p.is_file() and (p.suffix == ".onnx" or p.name.endswith((".onnx.data", ".onnx_data"))))


# ---- timing, logits, inspection (in the genai venv) --------------------------------------------------
def time_genai(out: str | Path, prompt_len: int = 128, new_tokens: int = 128, rounds: int = 3, threads: int = 2, seed: int = 1, warmup_tokens: int = 4) -> dict:
    """Prefill latency and decode speed of the builder's model through onnxruntime-genai, batch
    1, greedy, ``threads`` intra-op threads, in one fresh subprocess (model loaded once, one
    warm-up generation, then ``rounds`` rounds). ``new_tokens`` counts every generated token, the
    prefill's included (decode steps = new_tokens - 1). Returns medians (``prefill_ms``,
    ``decode_tokens_per_s``, ``decode_ms_median``), ``rounds`` (each round's figures),
    ``peak_rss_mb`` (the subprocess's max RSS), ``load_s``, ``rss_after_load_mb`` and ``bytes``."""
    if new_tokens < 2:
        raise ValueError("new_tokens must be >= 2 (one from the prefill, at least one decode step)")
    figures = _worker_call("time", {"out": str(Path(out).absolute()), "prompt_len": prompt_len, "new_tokens": new_tokens, "rounds": rounds,
                                     "threads": threads, "seed": seed, "warmup_tokens": warmup_tokens}, threads=threads)
    runs = figures["rounds"]
    summary = {key: statistics.median(r[key] for r in runs) for key in ("prefill_ms", "decode_tokens_per_s", "decode_ms_median")}
    return {**summary, "peak_rss_mb": figures["peak_rss_mb"], "rss_after_load_mb": figures["rss_after_load_mb"], "load_s": figures["load_s"],
            "bytes": model_bytes(out), "prompt_len": prompt_len, "new_tokens": new_tokens, "decode_steps": new_tokens - 1, "threads": threads,
            "rounds": runs, "versions": figures["versions"]}


def genai_logits(out: str | Path, input_ids, method: str = "ort", threads: int = 2):
    """Teacher-forced next-token logits of the builder's model over one sequence: a float32 array
    ``[len(input_ids), vocab]`` (row i: the logits after token i). ``method="ort"`` runs
    ``model.onnx`` in plain onnxruntime with empty past; ``method="genai"`` uses
    ``og.Generator.append_tokens`` and reads the ``logits`` output. Both in a subprocess."""
    import numpy as np

    ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
    with tempfile.TemporaryDirectory(prefix="genai_logits_") as scratch:
        src, dst = Path(scratch) / "ids.npy", Path(scratch) / "logits.npy"
        np.save(src, ids)
        _worker_call("logits", {"out": str(Path(out).absolute()), "ids": str(src), "dest": str(dst), "method": method, "threads": threads}, threads=threads)
        return np.load(dst)


def inspect_genai(out: str | Path) -> dict:
    """The builder output's op census, quantization and attention attributes, I/O and genai_config.json."""
    return _worker_call("inspect", {"out": str(Path(out).absolute())})


def _env(threads: int | None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)  # keep the main venv's packages out of the genai venv
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _worker_call(task: str, args: dict, threads: int | None = None) -> Any:
    """Run ``task`` of this file's worker under the genai venv's python; returns its JSON result."""
    python = genai_python()
    if not Path(python).exists():
        raise RuntimeError(f"no onnxruntime-genai python at {python} (set GRAPHOPT_GENAI_PYTHON)")
    with tempfile.TemporaryDirectory(prefix="genai_peer_") as scratch:
        result = Path(scratch) / "result.json"
        command = [python, str(Path(__file__).resolve()), "--worker", task, "--args", json.dumps(args), "--result", str(result)]
        done = subprocess.run(command, capture_output=True, text=True, env=_env(threads), check=False)
        if done.returncode != 0 or not result.is_file():
            raise RuntimeError(f"genai worker {task!r} failed (exit {done.returncode}):\n{done.stderr[-3000:]}\n{done.stdout[-1000:]}")
        return json.loads(result.read_text())


def _status_mb(field: str) -> float | None:
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None


def _peak_rss_mb() -> float:
    """This process's peak RSS: /proc's VmHWM, not getrusage's ru_maxrss, which a child started by
    fork/exec inherits from its parent (a parent holding torch makes every child read >= its size)."""
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    rss = _status_mb("VmRSS")
    return float("nan") if rss is None else rss


def _w_versions(_: dict) -> dict:
    import importlib.metadata as md

    return {name: md.version(name) for name in ("onnxruntime-genai", "onnxruntime", "transformers", "torch", "onnx")}


def _w_tokenizer(args: dict) -> dict:
    write_tokenizer(args["folder"], args["vocab"], args.get("eos"))
    return {"ok": True}


def _og_model(out: str, threads: int):
    import onnxruntime_genai as og

    config = og.Config(out)
    config.clear_providers()  # CPU
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    return og, og.Model(config)


def _w_time(args: dict) -> dict:
    import numpy as np

    start = time.perf_counter()
    og, model = _og_model(args["out"], args["threads"])
    load_s = time.perf_counter() - start
    rss_after_load = _rss_mb()
    vocab = json.loads((Path(args["out"]) / "genai_config.json").read_text())["model"]["vocab_size"]
    prompt_len, new_tokens = args["prompt_len"], args["new_tokens"]
    prompt = np.random.default_rng(args["seed"]).integers(0, vocab, prompt_len).astype(np.int32)

    def one(tokens: int) -> dict:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, batch_size=1, max_length=prompt_len + tokens, min_length=prompt_len + tokens)
        generator = og.Generator(model, params)
        t0 = time.perf_counter()
        generator.append_tokens(prompt)  # runs the prefill
        generator.generate_next_token()  # greedy pick from its logits: first token
        prefill = time.perf_counter() - t0
        steps: list[float] = []
        while len(steps) < tokens - 1 and not generator.is_done():
            t1 = time.perf_counter()
            generator.generate_next_token()  # one single-token forward + greedy pick
            steps.append(time.perf_counter() - t1)
        generated = len(generator.get_sequence(0)) - prompt_len
        del generator
        decode = sum(steps)
        return {"prefill_ms": prefill * 1e3, "decode_tokens_per_s": len(steps) / decode if decode > 0 else 0.0,
                "decode_ms_median": float(np.median(steps)) * 1e3 if steps else 0.0, "decode_steps": len(steps), "generated": generated}

    one(args["warmup_tokens"])
    rounds = [one(new_tokens) for _ in range(args["rounds"])]
    return {"rounds": rounds, "load_s": load_s, "rss_after_load_mb": rss_after_load, "peak_rss_mb": _peak_rss_mb(), "versions": _w_versions({})}


def _w_logits(args: dict) -> dict:
    import numpy as np

    ids = np.load(args["ids"]).astype(np.int64)
    out = Path(args["out"])
    if args["method"] == "genai":
        og, model = _og_model(str(out), args["threads"])
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, batch_size=1, max_length=len(ids) + 1)
        generator = og.Generator(model, params)
        generator.append_tokens(ids.astype(np.int32))
        logits = np.asarray(generator.get_output("logits"))
    elif args["method"] == "ort":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = args["threads"]
        config = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
        session = ort.InferenceSession(str(out / config["filename"]), options, providers=["CPUExecutionProvider"])
        types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32}
        n = len(ids)
        feeds = {}
        for inp in session.get_inputs():
            dtype = types[inp.type]
            if inp.name == "input_ids":
                feeds[inp.name] = ids[None].astype(dtype)
            elif inp.name == "attention_mask":
                feeds[inp.name] = np.ones((1, n), dtype)
            elif inp.name == "position_ids":
                feeds[inp.name] = np.arange(n, dtype=dtype)[None]
            elif inp.name.startswith("past_key_values."):
                feeds[inp.name] = np.zeros((1, config["num_key_value_heads"], 0, config["head_size"]), dtype)
            else:
                raise ValueError(f"unexpected model input {inp.name} {inp.shape}")
        logits = session.run(["logits"], feeds)[0]
    else:
        raise ValueError(f"method must be 'ort' or 'genai', not {args['method']!r}")
    logits = logits.reshape(-1, logits.shape[-1]).astype(np.float32)
    np.save(args["dest"], logits)
    return {"shape": list(logits.shape)}


def _w_inspect(args: dict) -> dict:
    from collections import Counter

    import onnx

    out = Path(args["out"])
    config = json.loads((out / "genai_config.json").read_text())
    model = onnx.load(str(out / config["model"]["decoder"]["filename"]), load_external_data=False)
    graph = model.graph
    ops = Counter(f"{n.domain + '.' if n.domain not in ('', 'ai.onnx') else ''}{n.op_type}" for n in graph.node)

    def attrs(node) -> dict:
        return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    def shape(value) -> list:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    def dtype(value) -> str:
        return onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type)

    by_op: dict[str, list] = {}
    for node in graph.node:
        if node.op_type in ("MatMulNBits", "GroupQueryAttention", "GatherBlockQuantized", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding", "MatMul", "Gather"):
            a = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs(node).items() if not hasattr(v, "dims")}
            by_op.setdefault(node.op_type, []).append({"name": node.name, "inputs": list(node.input), "attrs": a})
    initializers = Counter(onnx.TensorProto.DataType.Name(t.data_type) for t in graph.initializer)
    first_layer = [{"op": n.op_type, "name": n.name} for n in graph.node if "/layers.0/" in n.name]
    # Keep the report short: the distinct attribute sets per op, the first node of each and layer 0's op sequence.
    summary = {}
    for op, nodes in by_op.items():
        distinct = sorted({json.dumps(n["attrs"], sort_keys=True, default=str) for n in nodes})
        summary[op] = {"count": len(nodes), "distinct_attrs": [json.loads(d) for d in distinct], "first": nodes[0],
                       "names": [n["name"] for n in nodes][:6] + (["..."] if len(nodes) > 6 else [])}
    return {"opset": {o.domain or "ai.onnx": o.version for o in model.opset_import}, "ops": dict(ops.most_common()), "nodes": len(graph.node),
            "inputs": [{"name": v.name, "dtype": dtype(v), "shape": shape(v)} for v in graph.input],
            "outputs": [{"name": v.name, "dtype": dtype(v), "shape": shape(v)} for v in graph.output],
            "initializer_dtypes": dict(initializers), "ops_detail": summary, "layer0": first_layer, "genai_config": config,
            "files": {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}}


_WORKERS = {"versions": _w_versions, "tokenizer": _w_tokenizer, "time": _w_time, "logits": _w_logits, "inspect": _w_inspect}


# ---- script --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=sorted(_WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--args", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, default=Path("/work/genai"), help="where the random model and the builder output are cached")
    parser.add_argument("--small", action="store_true", help="the tiny smoke-test config instead of Qwen2.5-0.5B's")
    parser.add_argument("--precision", default="int4")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--logits", type=int, default=0, help="also check genai_logits (both methods) on a sequence of this length")
    parser.add_argument("--inspect", action="store_true", help="also print the builder output's op census and I/O")
    args = parser.parse_args(argv)
    if args.worker:
        result = _WORKERS[args.worker](json.loads(args.args))
        Path(args.result).write_text(json.dumps(result, default=str))
        return 0
    name = "qwen-small" if args.small else "qwen2.5-0.5b"
    folder = make_random_model(args.root / "models" / f"{name}-random", QWEN_SMALL if args.small else QWEN25_05B)
    start = time.perf_counter()
    out = build_genai(folder, args.root / "builds" / f"{name}-{args.precision}-cpu", precision=args.precision)
    report: dict[str, Any] = {"model": str(folder), "build": str(out), "build_record": build_complete(out), "build_or_cache_s": round(time.perf_counter() - start, 1)}
    report["timing"] = time_genai(out, prompt_len=args.prompt, new_tokens=args.new_tokens, rounds=args.rounds, threads=args.threads)
    if args.logits:
        import numpy as np

        vocab = (QWEN_SMALL if args.small else QWEN25_05B)["vocab_size"]
        ids = np.random.default_rng(2).integers(0, vocab, args.logits)
        by_ort, by_genai = genai_logits(out, ids, "ort", args.threads), genai_logits(out, ids, "genai", args.threads)
        report["logits"] = {"shape": list(by_ort.shape), "ort_vs_genai_max_abs": float(np.abs(by_ort - by_genai).max()), "argmax_agree": float((by_ort.argmax(-1) == by_genai.argmax(-1)).mean())}
    if args.inspect:
        report["inspect"] = inspect_genai(out)
    print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

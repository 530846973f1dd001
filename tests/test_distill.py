"""Distillation: it recovers, it resumes, it runs data-parallel, it fails clearly."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import graphopt
from graphopt import zoo
from graphopt.context import PassContext
from graphopt.distill import DistillConfig, DistillError, distill
from graphopt.distill.stopping import EarlyStopping, stopping_point
from graphopt.passes.distill import Distill, DistillInfo

sys.path.insert(0, str(Path(__file__).parent))
from distill_worker import perturbed_pair, tensor_data

HERE = Path(__file__).parent


def cosine0(a, b):
    return torch.nn.functional.cosine_similarity(a.run()[0].flatten(), b.run()[0].flatten(), dim=0).item()


def test_distillation_recovers_a_damaged_student():
    teacher, student = perturbed_pair()
    before = cosine0(teacher, student)
    data = tensor_data(teacher)
    callers_random_state = torch.get_rng_state()
    result = distill(student, teacher, data, DistillConfig(steps=40, lr=3e-3, progress=False))
    assert torch.equal(torch.get_rng_state(), callers_random_state)  # seeded inside, the caller's state left as it was
    after = cosine0(teacher, student)
    assert result.steps == 40 and result.history[-1]["loss"] < 0.25 * result.history[0]["loss"]
    # measured on the example inputs, which training never saw
    assert before < 0.5 and after > before + 0.3
    assert not any(p.requires_grad for p in student.module.parameters())  # left frozen for export


class Interrupt(dict):
    """A batch whose use stops the run, as a killed job would."""

    def items(self):
        raise KeyboardInterrupt("job killed")


def test_resume_continues_exactly(tmp_path):
    teacher, straight = perturbed_pair()
    data = tensor_data(teacher, batches=8)
    config = dict(steps=8, lr=1e-3, progress=False, checkpoint_every=2)
    distill(straight, teacher, data, DistillConfig(**config))
    ckpt = str(tmp_path / "ckpt")
    _, killed = perturbed_pair()
    with pytest.raises(KeyboardInterrupt):
        distill(killed, teacher, [*data[:5], Interrupt(), *data[6:]], DistillConfig(checkpoint_dir=ckpt, **config))
    _, fresh = perturbed_pair()  # a new process starts from the original weights
    result = distill(fresh, teacher, data, DistillConfig(checkpoint_dir=ckpt, **config))
    assert [h["step"] for h in result.history] == list(range(1, 9))  # 4 from the checkpoint, 4 new
    for (name, a), b in zip(straight.module.named_parameters(), fresh.module.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_two_processes_match_one(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    single, double = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    subprocess.run([sys.executable, str(HERE / "distill_worker.py"), str(single)], check=True, env=env, timeout=300)
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(HERE / "distill_worker.py"), str(double)],
        check=True, env=env, timeout=300, capture_output=True,
    )
    with safe_open(str(double), "pt") as f:
        assert f.metadata()["world_size"] == "2"
    one, two = load_file(str(single)), load_file(str(double))
    _, start = perturbed_pair()
    moved = max((one[k] - v).abs().max().item() for k, v in start.module.named_parameters())
    assert moved > 1e-3  # training really changed the weights
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-5, rtol=1e-4), key


def text_teacher_and_damaged_student():
    """A tiny random BERT with MiniLM's tokenizer (teacher) and a copy with its matrices
    scaled by 0.9 (student), for training on text."""
    import transformers

    from graphopt.models import load_model

    tokenizer = load_model("minilm").tokenizer
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    model = transformers.BertModel(config).eval()
    inputs = dict(tokenizer(["a short example", "another example sentence here"], padding=True, return_tensors="pt"))
    teacher = graphopt.capture(model, kwargs=inputs)
    student = teacher.clone()
    with torch.no_grad():
        for p in student.module.parameters():
            if p.dim() == 2:
                p.mul_(0.9)
    return tokenizer, teacher, student


def test_text_data_with_validation_and_curve(tmp_path):
    from graphopt.data import train_sentences

    tokenizer, teacher, student = text_teacher_and_damaged_student()
    result = distill(student, teacher, train_sentences(120), DistillConfig(steps=12, eval_every=6, batch_size=8, max_length=32, progress=False), tokenizer=tokenizer, report_dir=tmp_path)
    scores = [h["val_mean_cosine"] for h in result.history if "val_mean_cosine" in h]
    assert len(scores) == 2 and all(0 < s <= 1 for s in scores)
    assert Path(result.curve_png).is_file() and Path(result.curve_png).stat().st_size > 1000


def test_distill_stage_in_a_pipeline():
    from test_manager import ScaleWeights  # a lossy pass that damages the first weight

    graphopt.register_pass(ScaleWeights)
    try:
        program = graphopt.capture(zoo.tiny_model("bert"), kwargs=zoo.example_inputs("bert"))
        result = graphopt.optimize(program, "test-scale{factor=1.3},distill{steps=30,lr=0.001,progress=false}", budget=graphopt.Budget(min_cosine=0.0))
    finally:
        graphopt.passbase.unregister_pass("test-scale")
    damage, recovery = result.report.passes
    assert damage.status == "applied" and recovery.status == "applied"
    assert recovery.drift_total["cosine"] > damage.drift_total["cosine"]
    assert recovery.info["steps"] == 30
    # no tokenizer: it trained on the context's calibration batches (seeded random inputs over the dynamic shapes)
    assert "calibration batches" in recovery.info["data"] and "seeded random" in recovery.info["data"]


def test_distill_on_an_undamaged_program_does_nothing():
    program = graphopt.capture(zoo.tiny_model("bert"), kwargs=zoo.example_inputs("bert"))
    result = graphopt.optimize(program, "distill{steps=5}?")
    record = result.report.passes[0]
    assert record.status == "unchanged" and "nothing to recover" in record.reason and not result.report.failures


def test_the_pass_needs_the_teacher_from_the_context():
    _, student = perturbed_pair()
    with pytest.raises(DistillError, match=r"needs the original program as teacher \(ctx.teacher\); graphopt.optimize sets it"):
        Distill(steps=1, progress=False)(student)


def test_the_pass_trains_on_the_context_calibration_batches_without_a_tokenizer():
    teacher, student = perturbed_pair()
    before = cosine0(teacher, student)
    ctx = PassContext(teacher=teacher, calibration=tuple(((), kw) for kw in tensor_data(teacher)), calibration_source="test batches")
    result = Distill(steps=40, lr=3e-3, progress=False)(student, ctx)
    assert result.modified and isinstance(result.info, DistillInfo)
    assert result.info.data == "4 calibration batches (test batches)" and result.info.steps == 40
    assert result.info.best_val_mean_cosine is None  # tensor data: no validation, so no early stop
    assert cosine0(teacher, student) > before + 0.3


def test_clear_errors():
    teacher, student = perturbed_pair()
    with pytest.raises(DistillError, match="data list is empty"):
        distill(student, teacher, [], DistillConfig(steps=1, progress=False))
    with pytest.raises(DistillError, match="needs a tokenizer"):
        distill(student, teacher, ["some text"], DistillConfig(steps=1, progress=False))
    gpt = graphopt.capture(zoo.tiny_model("gpt2"), kwargs=zoo.example_inputs("gpt2", seq=10))
    with pytest.raises(DistillError, match="do not correspond"):
        distill(student, gpt, tensor_data(teacher), DistillConfig(steps=1, progress=False))

    class Doubler(torch.nn.Module):
        def forward(self, x):
            return x * 2

    empty = graphopt.capture(Doubler(), (torch.randn(2, 3),))
    with pytest.raises(DistillError, match="no trainable"):
        distill(empty, empty.clone(), [{"x": torch.randn(2, 3)}], DistillConfig(steps=1, progress=False))


def test_cli_runs_distillation_on_two_processes(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        'plugins = ["plugin_passes"]\npipeline = "dce,test-damage,distill{steps=4,batch_size=4,progress=false}"\n'
        "[budget]\nmin_cosine = 0.0\n"
    )
    env = dict(os.environ, PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "graphopt.cli", "distill", "--model", "factories:tiny_bert", "--recipe", str(recipe), "--out", str(out),
         "--nproc", "2", "--no-baseline", "--heldout", "0", "--bench-repeat", "3", "--quiet"],
        env=env, cwd=tmp_path, check=False, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["dce", "test-damage", "distill"]
    distilled = report["passes"][2]
    assert distilled["status"] == "applied" and distilled["info"]["world_size"] == 2
    assert report["sections"]["parity"]["passed"]


def test_gradients_pass_through_quantized_ops_straight_through():
    import graphopt.quant.training  # noqa: F401
    from graphopt.quant import ops
    from graphopt.quant.packing import (
        dequantize_nbits,
        quantize_nbits,
        quantize_per_channel_int8,
    )

    torch.manual_seed(0)
    weight = torch.randn(6, 16)  # [N, K]
    bias = torch.randn(6, requires_grad=True)
    x = torch.randn(3, 16, requires_grad=True)
    grad = torch.randn(3, 6)

    w_kn, scale = quantize_per_channel_int8(weight)  # codes [K, N], scales [N]
    dequant = (w_kn.float() * scale.float()).T  # [N, K]
    ops.linear_dynamic_int8(x, w_kn, scale, bias).backward(grad)
    assert torch.allclose(x.grad, grad @ dequant, atol=1e-5)
    assert torch.allclose(bias.grad, grad.sum(0), atol=1e-6)

    x.grad = None
    q = quantize_nbits(weight, 4, 16)
    ops.linear_nbits(x, q.packed, q.scales, q.zero_points, bias.detach(), 16, 6, 4, 16, 0).backward(grad)
    assert torch.allclose(x.grad, grad @ dequantize_nbits(q), atol=1e-5)


def test_pooled_cosine_loss_sees_only_valid_tokens_and_sentence_direction():
    from graphopt.distill import pooled_cosine_loss

    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    student = teacher.clone()
    student[0, 3:] = 100.0  # padding: ignored
    assert pooled_cosine_loss(student, teacher, mask).item() < 1e-6
    assert abs(pooled_cosine_loss(3.0 * teacher, teacher, mask).item()) < 1e-6  # scale-free
    assert pooled_cosine_loss(-teacher, teacher, mask).item() > 1.99
    assert "pooled_cosine" in DistillConfig.model_fields and DistillConfig().pooled_cosine == 0.0


def test_half_precision_codebooks_train_through_float32_masters():
    # float16 cluster codebooks train through float32 master copies (Adam's state would
    # underflow in float16), stay float16, and follow the run with float32 codebooks.
    from graphopt.passes.cluster import Cluster

    runs = {}
    for dtype in ("float32", "float16"):
        teacher, student = perturbed_pair()
        assert Cluster(bits=3, codebook_dtype=dtype)(student).modified
        books = {n: p.detach().float().clone() for n, p in student.module.named_parameters() if "codebook" in n or p.dtype == torch.float16}
        result = distill(student, teacher, tensor_data(teacher), DistillConfig(steps=12, lr=3e-3, warmup=0.0, progress=False))
        after = dict(student.module.named_parameters())
        assert all(torch.isfinite(after[n]).all() for n in books)
        runs[dtype] = (books, after, [h["loss"] for h in result.history])
    books, after, _losses = runs["float16"]
    assert books and all(after[n].dtype == torch.float16 for n in books)
    assert any(not torch.equal(after[n].detach().float(), b) for n, b in books.items())
    # the same trajectory as float32 codebooks, to float16 rounding (a gradient that
    # accumulated across steps would diverge here)
    _, after32, _losses32 = runs["float32"]
    moved = sum((after32[n].detach().float() - b).norm() for n, b in books.items())
    apart = sum((after[n].detach().float() - after32[n].detach().float()).norm() for n in books)
    assert apart < 0.1 * moved, (apart, moved)


def test_cached_teacher_outputs_train_like_a_teacher_run_every_step(monkeypatch):
    # After the first epoch the teacher's outputs come from the per-sentence cache; the
    # student must train as it would with the teacher run on every batch.
    from graphopt.data import train_sentences
    from graphopt.distill.cache import TeacherCache

    tokenizer, teacher, damaged = text_teacher_and_damaged_student()
    assembled = []
    original = TeacherCache._assemble
    monkeypatch.setattr(TeacherCache, "_assemble", lambda self, *a: assembled.append(1) or original(self, *a))

    def train(cache_mb: int):
        student = damaged.clone()
        # max_length 24 < hidden 32: a [batch, hidden] pooler output is never mistaken for a per-token one
        cfg = DistillConfig(steps=30, eval_every=100, batch_size=8, max_length=24, progress=False, teacher_cache_mb=cache_mb)
        distill(student, teacher, train_sentences(120), cfg, tokenizer=tokenizer)  # 96 training sentences: 12 steps an epoch
        return student.tensors()

    cached = train(64)
    assert len(assembled) >= 12  # the second and third epochs reassemble every batch
    hits = len(assembled)
    plain = train(0)
    assert len(assembled) == hits  # a 0 MB cache is off
    for name, tensor in plain.items():
        torch.testing.assert_close(cached[name], tensor, atol=1e-5, rtol=1e-4, msg=name)


# ---- early stopping ----------------------------------------------------------------------------
def _curve(scores, every=50):
    return [(every * (i + 1), score) for i, score in enumerate(scores)]


def test_early_stopping_counts_patience_in_steps_not_evaluations():
    flat = [0.5] + [0.5] * 40  # no improvement after the first evaluation, at step 50
    assert stopping_point(_curve(flat, every=50), EarlyStopping(patience_steps=600)) == (650, "no validation improvement of more than 0 in 600 steps (best 0.5000 at step 50)")
    # the same rule at another evaluation interval waits the same number of steps
    assert stopping_point(_curve(flat, every=100), EarlyStopping(patience_steps=600))[0] == 700
    assert stopping_point(_curve(flat, every=25), EarlyStopping(patience_steps=600))[0] == 625


def test_early_stopping_never_stops_before_min_steps():
    flat = [0.5] * 80
    step, reason = stopping_point(_curve(flat), EarlyStopping(patience_steps=100, min_steps=2100))
    assert step == 2100 and "in 2050 steps" in reason
    assert stopping_point(_curve(flat[:41]), EarlyStopping(patience_steps=100, min_steps=2100)) is None


def test_early_stopping_keeps_a_slowly_improving_run_and_ignores_noise():
    # +2e-4 every 50 steps: each step is improvement beyond min_delta=1e-4, however small
    rising = [0.8 + 2e-4 * i for i in range(200)]
    assert stopping_point(_curve(rising), EarlyStopping(patience_steps=200, min_delta=1e-4)) is None
    # +3e-5 per evaluation: below min_delta each time, but it adds up and counts every 4th evaluation
    creeping = [0.8 + 3e-5 * i for i in range(200)]
    assert stopping_point(_curve(creeping), EarlyStopping(patience_steps=250, min_delta=1e-4)) is None
    # a plateau with +-5e-5 noise stops once patience is spent after the last real rise
    noisy = [0.9] * 5 + [0.9 + (5e-5 if i % 2 else -5e-5) for i in range(100)]
    step, reason = stopping_point(_curve(noisy), EarlyStopping(patience_steps=600, min_delta=1e-4))
    assert step == 650 and "best 0.9000 at step 50" in reason
    # a target stops the run as soon as it is reached
    assert stopping_point(_curve(rising), EarlyStopping(patience_steps=10**6, target=0.81)) == (50 * 51, "target cosine 0.81 reached")


def test_config_defaults_wait_half_the_run_on_256_training_side_sentences():
    cfg = DistillConfig(steps=4200)
    assert cfg.first_stop_step() == 2100 and cfg.patience_steps == 600 and cfg.eval_sentences == 256
    assert DistillConfig(steps=4200, min_steps=0).first_stop_step() == 0
    assert "patience" not in DistillConfig.model_fields  # counted in steps now: patience_steps


def test_a_text_run_through_the_pass_validates_on_its_training_texts_and_stops_after_min_steps(tmp_path, monkeypatch):
    from graphopt.data import heldout_sentences, train_sentences
    from graphopt.distill import loop

    tokenizer, teacher, student = text_teacher_and_damaged_student()
    texts = tuple(train_sentences(120))
    validated = []
    original = loop.Validation.__init__
    monkeypatch.setattr(loop.Validation, "__init__", lambda self, t, tok, sentences, names: validated.extend(sentences) or original(self, t, tok, sentences, names))
    ctx = PassContext(tokenizer=tokenizer, training_texts=texts, teacher=teacher, artifacts=tmp_path)
    # min_delta=1 makes every evaluation after the first "no improvement": the rule alone decides the stop
    options = dict(steps=30, eval_every=6, batch_size=8, max_length=32, eval_sentences=16, patience_steps=1, min_steps=18, min_delta=1.0, progress=False)
    result = Distill(**options)(student, ctx)
    info = result.info
    assert result.modified and info.steps == 18 and "in 12 steps (best" in info.stopped
    assert info.data == "120 training texts of the context"
    assert len(validated) == 16 and set(validated) <= set(texts) and not set(validated) & set(heldout_sentences())
    scores = [h["val_mean_cosine"] for h in info.history if "val_mean_cosine" in h]
    assert len(scores) == 3 and info.best_val_mean_cosine == max(scores)
    assert info.curve_png == str(tmp_path / "distill_curve.png") and Path(info.curve_png).is_file()

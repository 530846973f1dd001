"""Decoder kernels: gqa-attention (cache update, kv-head repeat and attention as one
GroupQueryAttention, exact on everything a later step can read), rotary (one
RotaryEmbedding per query and key) and pack-linears (Q/K/V and gate/up as one GEMM)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import graphopt
from graphopt import zoo
from graphopt.data import left_pad
from graphopt.decoder import capture_decoder
from graphopt.export import check_parity, make_session, to_onnx
from graphopt.export.generation import Generator
from graphopt.recipe import Recipe
from graphopt.verify import decoder_unread, drift_many

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22]]  # the second is left-padded


FUSED = "gqa-attention, rotary, pack-linears"


@pytest.fixture(scope="module", params=[("llama", "sdpa", FUSED), ("qwen2", "eager", f"sdpa, {FUSED}")], ids=["llama-sdpa", "qwen2-eager"])
def fused(request, tmp_path_factory):
    arch, attn, recipe = request.param
    model = zoo.tiny_causal_lm(arch, attn)
    program = capture_decoder(model)
    result = graphopt.optimize(program, recipe)
    path = tmp_path_factory.mktemp(f"gqa-{arch}") / "model.onnx"
    to_onnx(result.program, path)
    return model, program, result, path


def test_every_layer_fuses_and_exports_one_kernel(fused):
    _, program, result, path = fused
    assert result.report.ok, result.report.passes
    records = {r.name: r for r in result.report.passes}
    assert records["gqa-attention"].status == "applied" and records["gqa-attention"].info["fused"] == 2
    assert records["rotary"].info["fused"] == 4  # queries and keys of both layers
    assert records["pack-linears"].info["packed"] == 4 and records["pack-linears"].info["linears"] == 10  # q/k/v and gate/up per layer
    ops = result.program.op_histogram()
    assert ops.get("graphopt::gqa_attention") == 2 and ops.get("graphopt::rotary") == 4
    assert ops.get("aten::expand", 0) == 1 and "aten::neg" not in ops  # the mask's expand only: no repeated keys, no rotate_half
    assert ops["aten::linear"] == 2 * 4 + 1  # qkv, o, gate_up, down per layer, and the LM head
    nodes = [n.op_type for n in onnx.load(path, load_external_data=False).graph.node]
    assert nodes.count("GroupQueryAttention") == 2 and nodes.count("RotaryEmbedding") == 4 and "Softmax" not in nodes
    assert "graphopt::gqa_attention" not in program.op_histogram()  # the input program is left alone


def test_parity_on_prefill_and_decode_steps(fused):
    _, program, result, path = fused
    # against the original too, as the build checks an exact recipe: the kernel's padding rows
    # (0 where SDPA averages) are read by nothing and are settled against the original's own
    report = check_parity(result.program, path, raise_on_failure=False, original=program, original_max_rel=1e-5)
    assert report.passed, report.failure_message()
    assert any("decode" in label for label in report.input_sets) and report.original


def _assert_generates_like_transformers(model, path) -> None:
    """32 greedy tokens for a left-padded batch: the same ids as transformers, logits within 1e-4
    (every GroupQueryAttention graph runs on one shared buffer per key and value)."""
    generator = Generator(make_session(path, threads=1))
    assert generator.shared_buffer
    ours = generator.generate(PROMPTS, max_new_tokens=32, return_logits=True, eos_token_id=[], pad_token_id=0)
    ids, mask = left_pad(PROMPTS, 0)
    with torch.no_grad():
        theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False, output_logits=True,
                                return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(ours.sequences, theirs.sequences.numpy())
    assert max(float(np.abs(a - b.numpy()).max()) for a, b in zip(ours.logits, theirs.logits)) <= 1e-4


def test_generates_what_transformers_generates(fused):
    model, _, _, path = fused
    _assert_generates_like_transformers(model, path)


def test_unread_values_do_not_count_but_nan_there_does():
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    logits, present = torch.randn(2, 4, 5), torch.randn(2, 2, 4, 3)
    unread = decoder_unread({"attention_mask": mask}, [logits, present])
    assert unread[0] is not None and unread[0][1, :2].all() and not unread[0][0].any() and not unread[0][1, 2:].any()
    assert unread[1] is not None and unread[1][1, :, :2].all() and not unread[1][1, :, 2:].any()
    moved_pad = (logits.clone(), present.clone())
    moved_pad[0][1, 0] += 5.0
    moved_pad[1][1, :, 1] = 0.0
    assert drift_many([(logits, present)], [moved_pad], unread=[unread]).max_rel == 0.0
    assert drift_many([(logits, present)], [moved_pad]).max_rel > 0.1  # without the decoder's rule it is a difference
    moved_real = (logits.clone(), present.clone())
    moved_real[0][1, 3] += 5.0
    assert drift_many([(logits, present)], [moved_real], unread=[unread]).max_rel > 0.1
    nan_pad = (logits.clone(), present.clone())
    nan_pad[1][1, :, 0] = float("nan")
    assert drift_many([(logits, present)], [nan_pad], unread=[unread]).problem  # a later step's 0 x NaN is NaN


def test_an_encoder_or_uncached_graph_is_a_reported_failure():
    program = graphopt.capture(zoo.tiny_model("bert"), kwargs=zoo.example_inputs("bert"))
    result = graphopt.optimize(program, "sdpa, gqa-attention")
    record = result.report.passes[-1]
    assert not result.report.ok and record.status == "unchanged"
    assert "concatenated KV cache" in record.reason


def test_packed_int4_quantizes_to_the_same_codes():
    """MatMulNBits blocks run along each output column's inputs: the packed weight's codes are the parts' codes."""
    program = capture_decoder(zoo.tiny_causal_lm("llama", "sdpa"))
    recipe = "quantize{mode=weight_only,bits=4,group_size=16}"
    packed = graphopt.optimize(program, f"pack-linears, {recipe}")
    plain = graphopt.optimize(program, recipe)
    assert packed.report.ok and plain.report.ok
    assert packed.program.op_histogram()["graphopt::linear_nbits"] == 2 * 4 + 1
    inputs = dict(program.kwargs)
    for ours, theirs in zip(packed.program.run((), inputs), plain.program.run((), inputs)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_partial_or_interleaved_rotary_is_left_alone():
    program = graphopt.capture(zoo.tiny_model("bert"), kwargs=zoo.example_inputs("bert"))
    result = graphopt.optimize(program, "rotary")
    assert not result.report.ok and result.report.passes[0].status == "unchanged"
    assert "rotate_half" in result.report.passes[0].reason


def test_the_exporter_skips_reshape_chains_that_change_nothing(fused, monkeypatch, tmp_path):
    """(batch, seq, heads * dim) -> (batch, seq, heads, dim) -> back around each kernel: gone;
    what is left reshapes the position and rotary tables."""
    from graphopt.export import onnx_export

    def activation_reshapes(path) -> int:
        model = onnx.load(path)
        ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in model.graph.value_info}
        return sum(1 for n in model.graph.node if n.op_type == "Reshape" and ranks.get(n.output[0], 3) >= 3)

    _, _, result, path = fused
    assert activation_reshapes(path) == 0
    monkeypatch.setattr(onnx_export, "drop_identity_reshapes", lambda model: {})
    assert activation_reshapes(to_onnx(result.program, tmp_path / "kept.onnx").path) >= 2 * 12  # q, k, v and out: 12 a layer


# ---- one KV buffer as past and present (GroupQueryAttention's shared-buffer mode) ---------------
def test_one_buffer_is_past_and_present_and_only_its_written_entries_are_read(fused, monkeypatch):
    path = fused[3]
    generator = Generator(make_session(path, threads=1))
    assert generator.shared_buffer and generator.binds_once  # buffers bound once, not every step
    buffers: list = []

    def poisoned(self, batch, capacity):  # NaN wherever the kernel has not written
        made = [np.full((batch, self.spec.kv_heads, capacity, self.spec.head_dim), np.nan, np.float32) for _ in range(2 * self.spec.layers)]
        buffers.extend(made)
        return made

    new = 6
    monkeypatch.setattr(Generator, "_new_buffers", poisoned)
    shared = generator.generate(PROMPTS, max_new_tokens=new, return_logits=True, eos_token_id=[], pad_token_id=0)
    monkeypatch.undo()
    generator.shared_buffer = False
    copied = generator.generate(PROMPTS, max_new_tokens=new, return_logits=True, eos_token_id=[], pad_token_id=0)
    np.testing.assert_array_equal(shared.sequences, copied.sequences)
    assert all(np.array_equal(a, b) for a, b in zip(shared.logits, copied.logits))  # no NaN read, no entry lost
    prompt = shared.prompt_length
    assert shared.cache_lengths == copied.cache_lengths == list(range(prompt, prompt + new))
    # the kernel wrote every step's keys into the buffers bound as its past: prompt + new - 1 entries
    # (the last token's are never needed), and nothing past them
    key = buffers[0]
    written = prompt + new - 1
    assert not np.isnan(key[:, :, :written]).any() and np.isnan(key[:, :, written:]).all()


def test_a_cache_written_by_anything_but_group_query_attention_is_not_shared(tmp_path):
    program = capture_decoder(zoo.tiny_causal_lm("llama", "sdpa"))
    exported = to_onnx(graphopt.optimize(program, "rms-norm").program, tmp_path / "model.onnx", skip_norm=True)
    assert exported.kv_buffer.startswith("not shared: present.0.key is written by Concat")
    assert exported.skip_norms == 0  # a graph of standard ONNX ops stays one
    assert "graphopt.kv_buffer" not in {p.key for p in onnx.load(tmp_path / "model.onnx", load_external_data=False).metadata_props}
    generator = Generator(make_session(tmp_path / "model.onnx", threads=1))
    assert not generator.shared_buffer
    assert generator.generate(PROMPTS, max_new_tokens=3, eos_token_id=[], pad_token_id=0).cache_lengths == [7, 8, 9]


# ---- residual Add + RMSNorm as SkipSimplifiedLayerNormalization -------------------------------
def test_each_residual_add_and_the_norm_after_it_are_one_kernel(tmp_path):
    # one architecture: the fusion is opt-in, and the rewrite reads only the ONNX norm the rms-norm pass writes
    model = zoo.tiny_causal_lm("qwen2", "eager")
    pipeline = f"sdpa, rms-norm, {FUSED}"
    result = graphopt.optimize(capture_decoder(model), Recipe.model_validate({"pipeline": pipeline, "export": {"skip_norm": True}}))
    path = tmp_path / "model.onnx"
    assert to_onnx(result.program, path).skip_norms == 0  # off unless asked: measured slower on an AVX2 CPU
    exported = result.export(path, parity=False)  # the recipe's [export] skip_norm = true
    assert result.report.sections["export"]["skip_norms"] == 4
    # per layer: the attention's residual with the post-attention norm, the MLP's with the next
    # layer's norm (the final norm after the last): 2 layers, 4 kernels; the first norm reads
    # the embedding, no Add, and stays for ORT's own fusion
    assert exported.skip_norms == 4
    nodes = [n.op_type for n in onnx.load(path, load_external_data=False).graph.node]
    assert nodes.count("SkipSimplifiedLayerNormalization") == 4 and nodes.count("Div") == 1 and nodes.count("ReduceMean") == 1
    report = check_parity(result.program, path, raise_on_failure=False)
    assert report.passed, report.failure_message()
    _assert_generates_like_transformers(model, path)


# ---- gqa-rotary: packed Q/K/V and rotary inside GroupQueryAttention ----------------------------
def _head_dim_16_lm(arch: str, attention: str = "sdpa") -> torch.nn.Module:
    """ORT applies rotary inside GroupQueryAttention only to head dims that are multiples of 16."""
    import transformers as tf

    config_cls, model_cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[arch]
    torch.manual_seed(0)
    config = config_cls(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                        max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation=attention)
    return model_cls(config).eval()


@pytest.mark.parametrize(("arch", "attention"), [("llama", "sdpa"), ("qwen2", "sdpa"), ("qwen2", "eager")])
def test_gqa_rotary_is_one_kernel_and_generates_what_transformers_generates(arch, attention, tmp_path):
    # eager attention (after the sdpa pass) flattens its heads through a contiguous copy
    model = _head_dim_16_lm(arch, attention)
    program = capture_decoder(model)
    result = graphopt.optimize(program, f"{'sdpa, ' if attention == 'eager' else ''}{FUSED}, gqa-rotary")
    assert result.report.ok, result.report.passes
    assert result.report.passes[-1].info["fused"] == 2
    ops = result.program.op_histogram()
    assert ops.get("graphopt::gqa_rotary_attention") == 2 and "graphopt::rotary" not in ops and "graphopt::gqa_attention" not in ops
    path = tmp_path / "model.onnx"
    to_onnx(result.program, path)
    nodes = [n.op_type for n in onnx.load(path, load_external_data=False).graph.node]
    assert nodes.count("GroupQueryAttention") == 2 and "RotaryEmbedding" not in nodes
    assert nodes.count("Split") == 2  # gate / up per layer: the q / k / v split is gone
    assert "Transpose" not in nodes  # the attention comes out as the output projection reads it
    report = check_parity(result.program, path, raise_on_failure=False)
    assert report.passed, report.failure_message()
    # a left-padded batch: each row keeps its own positions through the kernel's rotary
    _assert_generates_like_transformers(model, path)


def test_gqa_rotary_names_what_it_needs():
    # head dim 8: ORT's kernel cannot turn it, so the pass leaves the layers and says why
    unfused = graphopt.optimize(capture_decoder(zoo.tiny_causal_lm("llama", "sdpa")), f"{FUSED}, gqa-rotary")
    record = unfused.report.passes[-1]
    assert record.status == "unchanged" and "multiples of 16" in record.reason
    # without pack-linears the projections are separate: nothing to feed packed
    separate = graphopt.optimize(capture_decoder(_head_dim_16_lm("llama")), "gqa-attention, rotary, gqa-rotary")
    assert separate.report.passes[-1].status == "unchanged" and "pack-linears" in separate.report.passes[-1].reason

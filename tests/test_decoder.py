"""Decoders captured for generation: one KV-cache graph, exported with Optimum's names, and
the ORT generation runtime against transformers' own ``generate``."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import graphopt
from graphopt import zoo
from graphopt.data import left_pad
from graphopt.decoder import capture_decoder, decoder_spec
from graphopt.errors import CaptureError, ConfigError
from graphopt.export import make_session, to_onnx
from graphopt.export.generation import Generator, SamplingOptions

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22]]  # different lengths: the second is left-padded
NEW_TOKENS = 32


def _hf_generate(model, generator: Generator, prompts, new_tokens):
    ids, mask = left_pad(prompts, 0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    return out.sequences.numpy(), [step.numpy() for step in out.logits]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, program, session) per (arch, attention), exported once per module."""
    made = {}

    def get(arch: str, attn: str = "eager"):
        if (arch, attn) not in made:
            model = zoo.tiny_causal_lm(arch, attn)
            program = capture_decoder(model)
            path = tmp_path_factory.mktemp(f"{arch}-{attn}") / "model.onnx"
            to_onnx(program, path)
            made[arch, attn] = (model, program, make_session(path, threads=1), path)
        return made[arch, attn]

    return get


CASES = [(arch, "eager") for arch in zoo.CAUSAL_ARCHS] + [("llama", "sdpa"), ("qwen2", "sdpa"), ("gpt2", "sdpa")]


@pytest.mark.parametrize(("arch", "attn"), CASES)
def test_greedy_generation_matches_transformers(exported, arch, attn):
    model, _, session, _ = exported(arch, attn)
    generator = Generator(session)
    assert generator.keeps_last  # every step, prefill included, computes the last position's logits only
    result = generator.generate(PROMPTS, max_new_tokens=NEW_TOKENS, return_logits=True, eos_token_id=[], pad_token_id=0)
    sequences, logits = _hf_generate(model, generator, PROMPTS, NEW_TOKENS)
    assert result.sequences.shape == (2, 7 + NEW_TOKENS)
    np.testing.assert_array_equal(result.sequences, sequences)
    assert len(result.logits) == NEW_TOKENS
    for step, (ours, theirs) in enumerate(zip(result.logits, logits)):
        assert np.abs(ours - theirs).max() <= 1e-4, f"step {step}"


def test_export_uses_optimum_names_and_dynamic_axes(exported):
    _, program, _session, path = exported("llama")
    spec = decoder_spec(program)
    model = onnx.load(path, load_external_data=False)
    inputs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    outputs = [v.name for v in model.graph.output]
    assert list(inputs) == ["input_ids", "attention_mask", "position_ids", *[f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")],
                            "logits_to_keep"]
    # optional: its default (an initializer of the same name) keeps every position, as Optimum's graphs do
    assert [onnx.numpy_helper.to_array(t).tolist() for t in model.graph.initializer if t.name == "logits_to_keep"] == [0]
    assert outputs == ["logits", *[f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]]
    assert inputs["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert inputs["past_key_values.0.key"] == ["batch_size", spec.kv_heads, "past_sequence_length", spec.head_dim]
    assert spec.kv_heads == zoo.KV_HEADS and spec.layers == 2
    stored = {p.key: p.value for p in model.metadata_props}
    assert json.loads(stored["graphopt.decoder"])["layers"] == 2


def test_one_graph_serves_prefill_and_decode(exported):
    """Past length 0 (prefill), one new token and several new tokens on a cache all run the
    same graph in ORT, within 1e-5 of the program."""
    _, program, session, _ = exported("qwen2")
    from graphopt.decoder import decoder_steps
    from graphopt.inputs import named_inputs, onnx_feed_names

    for label, kwargs in decoder_steps(decoder_spec(program), program, seed=3):
        feed = {k: v.numpy() for k, v in onnx_feed_names(program, named_inputs(program, (), kwargs)).items()}
        got = session.run(None, feed)
        expected = program.run((), kwargs)
        for name, g, e in zip(program.output_names, got, expected):
            np.testing.assert_allclose(g, e.numpy(), rtol=1e-4, atol=1e-5, err_msg=f"{label}: {name}")


def test_sampling_is_seeded_and_top_k_1_is_greedy(exported):
    _, _, session, _ = exported("llama")
    generator = Generator(session)
    greedy = generator.generate(PROMPTS, max_new_tokens=12, eos_token_id=[]).sequences
    top1 = generator.generate(PROMPTS, max_new_tokens=12, eos_token_id=[], sampling=SamplingOptions(do_sample=True, top_k=1, seed=5)).sequences
    np.testing.assert_array_equal(top1, greedy)
    hot = SamplingOptions(do_sample=True, temperature=5.0, top_p=0.95, seed=11)
    first = generator.generate(PROMPTS, max_new_tokens=12, eos_token_id=[], sampling=hot).sequences
    again = generator.generate(PROMPTS, max_new_tokens=12, eos_token_id=[], sampling=hot).sequences
    other = generator.generate(PROMPTS, max_new_tokens=12, eos_token_id=[], sampling=SamplingOptions(do_sample=True, temperature=5.0, top_p=0.95, seed=12)).sequences
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert not np.array_equal(first, greedy)


def test_stop_tokens_streaming_and_padding_of_finished_rows(exported):
    _, _, session, _ = exported("llama")
    generator = Generator(session)
    greedy = generator.generate(PROMPTS, max_new_tokens=8, eos_token_id=[]).new_tokens
    stop = int(greedy[0, 2])  # row 0 emits it at step 2 (or earlier)
    streamed: list[np.ndarray] = []
    result = generator.generate(PROMPTS, max_new_tokens=8, eos_token_id=stop, pad_token_id=0, streamer=streamed.append)
    row0 = list(result.new_tokens[0])
    first = row0.index(stop)
    assert all(t == 0 for t in row0[first + 1:])  # padded after its stop token
    assert len(streamed) == result.new_tokens.shape[1]
    np.testing.assert_array_equal(np.stack(streamed, axis=1), result.new_tokens)
    timings = result.timings()
    assert timings["prefill_ms"] > 0 and timings["new_tokens"] == result.new_tokens.shape[1]


def test_bad_inputs_get_clear_errors(exported):
    _, _, session, _ = exported("llama")
    generator = Generator(session)
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        generator.generate([[1] * 250], max_new_tokens=10)
    with pytest.raises(ConfigError, match="padded on the left"):
        generator.generate(np.array([[1, 2, 0]]), np.array([[1, 1, 0]]), max_new_tokens=2)
    with pytest.raises(ConfigError, match="temperature"):
        SamplingOptions(do_sample=True, temperature=0)
    with pytest.raises(CaptureError, match="cannot generate"):
        capture_decoder(zoo.tiny_model("bert"))


def test_capture_does_not_touch_the_model_and_passes_run_on_the_cache_graph():
    model = zoo.tiny_causal_lm("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    program = capture_decoder(model)
    result = graphopt.optimize(program, "quantize{mode=weight_only,bits=4}")
    record = result.report.passes[0]
    assert record.status == "applied"
    assert result.program.op_histogram().get("graphopt::linear_nbits") == 15  # 7 per layer and the LM head
    assert "generation runs" in result.report.verification["source"]  # verified on prefill and decode steps
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_external_data_export_loads_and_generates(exported, tmp_path):
    """The layout a model past 2 GB gets (weights in model.onnx.data) generates as the inline file does."""
    _, program, session, _ = exported("llama")
    written = to_onnx(program, tmp_path / "model.onnx", external_data=True)
    assert written.external_data_path is not None and written.external_data_path.stat().st_size > 0
    ours = Generator(make_session(tmp_path / "model.onnx", threads=1)).generate(PROMPTS, max_new_tokens=8, eos_token_id=[]).sequences
    np.testing.assert_array_equal(ours, Generator(session).generate(PROMPTS, max_new_tokens=8, eos_token_id=[]).sequences)

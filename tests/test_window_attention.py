"""window-attention: a KV cache capped at sinks + window entries, exact while the sequence fits."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import graphopt
from graphopt import zoo
from graphopt.decoder import capture_decoder, decoder_inputs, decoder_spec
from graphopt.errors import ConfigError
from graphopt.export import make_session, to_onnx
from graphopt.export.generation import Generator

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22]]


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    program = capture_decoder(zoo.tiny_causal_lm("llama"))
    result = graphopt.optimize(program, "window-attention{sinks=2,window=30}")
    folder = tmp_path_factory.mktemp("window")
    to_onnx(result.program, folder / "window.onnx")
    to_onnx(program, folder / "full.onnx")
    return program, result, Generator(make_session(folder / "window.onnx", threads=1)), Generator(make_session(folder / "full.onnx", threads=1))


def test_exact_while_the_sequence_fits(windowed):
    _, result, window, full = windowed
    record = result.report.passes[0]
    assert record.status == "applied" and record.info["cache_limit"] == 32 and record.info["presents_trimmed"] == 4
    assert decoder_spec(result.program).cache_window == (2, 30)
    ours = window.generate(PROMPTS, max_new_tokens=25, eos_token_id=[], return_logits=True)  # 7 + 25 = 32 entries
    theirs = full.generate(PROMPTS, max_new_tokens=25, eos_token_id=[], return_logits=True)
    np.testing.assert_array_equal(ours.sequences, theirs.sequences)
    assert max(float(np.abs(a - b).max()) for a, b in zip(ours.logits, theirs.logits)) <= 1e-5


def test_the_cache_stops_growing_at_sinks_plus_window(windowed):
    _, result, _, _ = windowed
    spec = decoder_spec(result.program)
    past = [torch.randn(1, spec.kv_heads, 32, spec.head_dim) for _ in range(2 * spec.layers)]
    inputs = decoder_inputs(spec, torch.tensor([[3]]), torch.ones(1, 33, dtype=torch.long), past)
    outputs = result.program.run((), inputs)
    assert all(present.shape[2] == 32 for present in outputs[1:])
    # the kept entries: the 2 sinks and the 30 most recent (29 of the past, then the new one)
    torch.testing.assert_close(outputs[1][:, :, :2], past[0][:, :, :2])
    torch.testing.assert_close(outputs[1][:, :, 2:31], past[0][:, :, 3:32])


def test_generates_past_the_window_and_the_trained_context(windowed):
    _, _, window, full = windowed
    long = window.generate(PROMPTS, max_new_tokens=300, eos_token_id=[])  # 307 > the 256 positions of the tiny llama
    assert long.new_tokens.shape == (2, 300)
    assert long.cache_lengths[0] == 7 and max(long.cache_lengths) == 32 and long.cache_lengths[-1] == 32  # capped, as the generator reports it
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        full.generate(PROMPTS, max_new_tokens=300, eos_token_id=[])
    assert full.generate(PROMPTS, max_new_tokens=40, eos_token_id=[]).cache_lengths[-1] == 7 + 39  # the full cache grows each step
    differs = window.generate(PROMPTS, max_new_tokens=80, eos_token_id=[]).sequences != full.generate(PROMPTS, max_new_tokens=80, eos_token_id=[]).sequences
    assert not differs[:, : 7 + 25].any()  # identical while the cache fits


def test_a_prompt_shorter_than_the_sinks(tmp_path):
    program = capture_decoder(zoo.tiny_causal_lm("llama"))
    result = graphopt.optimize(program, "window-attention{sinks=6,window=26}")
    to_onnx(result.program, tmp_path / "window.onnx")
    to_onnx(program, tmp_path / "full.onnx")
    short = [[5, 6, 7]]  # 3 tokens: the first cache holds fewer entries than the 6 sinks
    ours = Generator(make_session(tmp_path / "window.onnx", threads=1)).generate(short, max_new_tokens=40, eos_token_id=[])
    theirs = Generator(make_session(tmp_path / "full.onnx", threads=1)).generate(short, max_new_tokens=40, eos_token_id=[])
    assert ours.cache_lengths[:4] == [3, 4, 5, 6] and ours.cache_lengths[-1] == 32
    np.testing.assert_array_equal(ours.sequences[:, : 3 + 29], theirs.sequences[:, : 3 + 29])  # identical while the 32 entries hold it all


def test_a_shared_buffer_applies_the_window_as_the_graph_would(windowed, tmp_path):
    """On a GroupQueryAttention graph the export hands the window to the runtime (no Gather
    copying the cache each step): dropped slots are masked and the buffer is compacted when
    full. The tokens and logits must be those of the graph that trims its own cache."""
    program, _, trimmed, _ = windowed
    handed = to_onnx(graphopt.optimize(program, "sdpa, gqa-attention, window-attention{sinks=2,window=30}").program, tmp_path / "runtime.onnx")
    assert not trimmed.shared_buffer and handed.kv_buffer == "shared; the runtime applies the cache window (2, 30)"
    graph = onnx.load(tmp_path / "runtime.onnx", load_external_data=False).graph
    writers = {out: n.op_type for n in graph.node for out in n.output}
    assert {writers[o.name] for o in graph.output if o.name.startswith("present.")} == {"GroupQueryAttention"}  # not the window's Gather
    reference = trimmed.generate(PROMPTS, max_new_tokens=60, eos_token_id=[], return_logits=True)
    generator = Generator(make_session(tmp_path / "runtime.onnx", threads=1))
    assert generator.shared_buffer and generator.runtime_window
    for slack, shared in ((3, True), (64, True), (5, False)):  # compacted every 3 steps, never (67 entries fit), the copied path
        generator.window_slack, generator.shared_buffer = slack, shared
        ours = generator.generate(PROMPTS, max_new_tokens=60, eos_token_id=[], return_logits=True)
        np.testing.assert_array_equal(ours.sequences, reference.sequences)
        assert ours.cache_lengths == reference.cache_lengths and max(ours.cache_lengths) == 32
        assert max(float(np.abs(a - b).max()) for a, b in zip(ours.logits, reference.logits)) <= 1e-4
    generator.shared_buffer, generator.window_slack = True, 8
    assert generator.generate(PROMPTS, max_new_tokens=60, eos_token_id=[]).buffer_slots == 2 + 30 + 8  # sinks + window + slack, not 7 + 60


def test_a_window_shorter_than_the_verification_runs_is_refused(tmp_path):
    program = capture_decoder(zoo.tiny_causal_lm("llama"))
    result = graphopt.optimize(program, "window-attention{sinks=2,window=6}", reproducer_dir=tmp_path)
    assert not result.report.ok and result.report.passes[0].status == "rolled-back"
    assert "shorter than the verification runs (17 tokens)" in result.report.passes[0].reason


def test_an_encoder_is_skipped_with_a_reason():
    program = graphopt.capture(zoo.tiny_model("bert"), kwargs=zoo.example_inputs("bert"))
    result = graphopt.optimize(program, "window-attention?")
    assert result.report.passes[0].status == "skipped"
    assert "not a decoder" in result.report.passes[0].reason


def test_window_gathers_the_runtime_cannot_take_over_keep_the_graph_as_it_is(windowed, tmp_path, monkeypatch):
    """The runtime applies a window only when every present is one Gather, on the cache axis,
    of what its layer's GroupQueryAttention wrote, all by the same kept slots. Anything else
    keeps the graph's own Gathers, and the refusal says which rule failed."""
    import onnx_ir as ir

    from graphopt.decoder import ATTENTION_MASK, INPUT_IDS, DecoderSpec
    from graphopt.export import onnx_export
    from graphopt.export.kv_buffer import share_kv_buffer

    before_sharing = {}

    def keep_a_copy(model, spec):
        before_sharing["model"], before_sharing["spec"] = ir.serde.serialize_model(model), DecoderSpec.from_dict(dict(spec))
        return "not shared: kept for the test"

    monkeypatch.setattr(onnx_export, "_share_kv_buffer", keep_a_copy)
    program, *_ = windowed
    to_onnx(graphopt.optimize(program, "sdpa, gqa-attention, window-attention{sinks=2,window=30}").program, tmp_path / "windowed.onnx")
    spec = before_sharing["spec"]

    def share(edit):
        model = ir.serde.deserialize_model(before_sharing["model"])
        presents = {v.name: v for v in model.graph.outputs}
        gathers = [presents[name].producer() for name in spec.present_names()]
        assert {g.op_type for g in gathers} == {"Gather"}
        edit(model, gathers)
        return share_kv_buffer(model, spec.past_names(), spec.present_names(), mask_name=ATTENTION_MASK, ids_name=INPUT_IDS, window=True)

    assert share(lambda model, gathers: None).window_to_runtime  # as exported: the runtime takes the window over

    def other_slots(model, gathers):
        slots = ir.Value(name="other_slots", const_value=ir.tensor(np.arange(4, dtype=np.int64)))
        model.graph.initializers["other_slots"] = slots
        gathers[-1].replace_input_with(1, slots)

    refused = share(other_slots)
    assert not refused.shared and refused.reason == "the windowed presents are gathered by different slot indices"

    def other_axis(model, gathers):
        gathers[0].attributes["axis"] = ir.AttrInt64("axis", 1)

    refused = share(other_axis)
    assert not refused.shared and refused.reason.startswith(f"the windowed {spec.present_names()[0]} is written by Gather")

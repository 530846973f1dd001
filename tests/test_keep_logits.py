"""logits_to_keep: a decoder graph computes the last positions' logits alone when asked, and
every position's by default (graphopt.export.keep_logits)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt import zoo
from graphopt.decoder import capture_decoder, decoder_spec
from graphopt.export import make_session, to_onnx
from graphopt.export.generation import Generator
from graphopt.export.keep_logits import LOGITS_TO_KEEP, keep_last_logits

# the decoder benchmark's speed recipe: GroupQueryAttention, packed int4 GEMMs, a 2-bit head refined from int8 rows
RECIPE = ('dce,dedup,sdpa,gqa-attention,rotary,rms-norm,pack-linears,refine-head{k=8},'
          'quantize{mode=weight_only,bits=2,group_size=32,accuracy_level=4,include=["*lm_head"]},'
          'quantize{mode=weight_only,bits=4,group_size=32,accuracy_level=4,embeddings=true,embedding_bits=8},dedup')


@pytest.fixture(scope="module")
def refined(tmp_path_factory):
    program = graphopt.optimize(capture_decoder(zoo.tiny_causal_lm("llama")), RECIPE).program
    path = tmp_path_factory.mktemp("refined") / "model.onnx"
    exported = to_onnx(program, path)
    return program, path, exported, make_session(path, threads=1)


def _prefill_feed(program, batch: int = 2, seq: int = 9) -> dict[str, np.ndarray]:
    spec = decoder_spec(program)
    ids = np.random.default_rng(0).integers(0, spec.vocab_size, (batch, seq))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row: its last position is still a real token
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": np.clip(mask.cumsum(1) - 1, 0, None)}
    feed.update(dict.fromkeys(spec.past_names(), np.zeros((batch, spec.kv_heads, 0, spec.head_dim), np.float32)))
    return feed


def _downstream(model: onnx.ModelProto, name: str) -> list[onnx.NodeProto]:
    reached, nodes = {name}, []
    for node in model.graph.node:  # topological order
        if reached & set(node.input):
            nodes.append(node)
            reached.update(node.output)
    return nodes


def test_the_kept_logits_are_the_last_positions_of_all_and_the_cache_is_untouched(refined):
    program, path, exported, session = refined
    assert exported.logits_to_keep.startswith(f"{LOGITS_TO_KEEP} slices")
    feed = _prefill_feed(program)
    every = session.run(None, feed)
    for keep in (1, 3):
        kept = session.run(None, {**feed, LOGITS_TO_KEEP: np.array(keep)})
        assert kept[0].shape == (2, keep, every[0].shape[-1])
        np.testing.assert_allclose(kept[0], every[0][:, -keep:], rtol=1e-5, atol=1e-6)
        for ours, theirs in zip(kept[1:], every[1:]):
            np.testing.assert_array_equal(ours, theirs)
    # 0 is every position, as with no feed
    np.testing.assert_array_equal(session.run(["logits"], {**feed, LOGITS_TO_KEEP: np.array(0)})[0], every[0])
    # the slice comes before the last layer's MLP: its two packed GEMMs and the head run on the kept positions
    model = onnx.load(path, load_external_data=False)
    (slice_node,) = [n for n in model.graph.node if n.op_type == "Slice" and n.input[0] == exported.logits_to_keep.split("'")[1]]
    after = _downstream(model, slice_node.output[0])
    assert [n.op_type for n in after].count("MatMulNBits") == 3 and "TopK" in [n.op_type for n in after]
    assert "GroupQueryAttention" not in [n.op_type for n in after]


def test_generation_reads_the_kept_logits_and_generates_the_same(refined):
    _, _, _, session = refined
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22]]
    kept = Generator(session)
    every = Generator(session)
    every.keeps_last = False
    assert kept.keeps_last and kept.binds_once
    ours = kept.generate(prompts, max_new_tokens=12, eos_token_id=[], return_logits=True)
    theirs = every.generate(prompts, max_new_tokens=12, eos_token_id=[], return_logits=True)
    np.testing.assert_array_equal(ours.sequences, theirs.sequences)
    for a, b in zip(ours.logits, theirs.logits):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _model(nodes: list[onnx.NodeProto]) -> ir.Model:
    """``x [batch, seq, 4]`` through ``nodes`` to ``logits [batch, seq, 6]``, with ``w [4, 6]``."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 6], np.linspace(-1, 1, 24, dtype=np.float32))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 6])], [w],
                              value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", "seq", None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(model))


def test_the_slice_goes_after_the_last_op_that_mixes_positions():
    """A softmax over positions before the head: the slice reads its output, and the kept
    logits are still the last positions' of the whole computation."""
    model = _model([helper.make_node("Softmax", ["x"], ["h"], axis=1), helper.make_node("MatMul", ["h", "w"], ["logits"])])
    result = keep_last_logits(model)
    assert result.applied and result.sliced == "h" and result.nodes == 1
    session = make_session(ir.serde.serialize_model(model))
    x = np.random.default_rng(0).standard_normal((2, 5, 4)).astype(np.float32)
    every = session.run(None, {"x": x})[0]
    np.testing.assert_allclose(session.run(None, {"x": x, LOGITS_TO_KEEP: np.array(2)})[0], every[:, -2:], rtol=1e-6)


def test_a_head_that_mixes_positions_is_left_as_it_is_with_the_reason():
    model = _model([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Softmax", ["h"], ["logits"], axis=1)])
    before = ir.serde.serialize_model(model).SerializeToString()
    result = keep_last_logits(model)
    assert not result.applied and "Softmax" in result.reason
    assert ir.serde.serialize_model(model).SerializeToString() == before


def test_make_session_keeps_ort_quiet_about_the_input_with_a_default(tmp_path):
    """ORT warns at load about every input that has a default; graphopt's sessions of its own
    decoders do not pass that on (a bare ORT session shows what is silenced)."""
    import subprocess
    import sys

    model = _model([helper.make_node("Softmax", ["x"], ["h"], axis=1), helper.make_node("MatMul", ["h", "w"], ["logits"])])
    assert keep_last_logits(model).applied
    path = tmp_path / "model.onnx"
    ir.save(model, path)
    warning = f"Initializer {LOGITS_TO_KEEP} appears in graph inputs"
    bare = f"import onnxruntime as ort; ort.InferenceSession({str(path)!r}, providers=['CPUExecutionProvider'])"
    ours = f"from graphopt.export import make_session; make_session({str(path)!r})"
    stderr = {name: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
              for name, code in (("bare", bare), ("ours", ours))}
    assert warning in stderr["bare"] and warning not in stderr["ours"]

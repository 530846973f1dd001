"""rms-norm: RMSNorm spelled so that ORT fuses it into SimplifiedLayerNormalization (exact)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import graphopt
from graphopt import zoo
from graphopt.export import make_session, to_onnx
from graphopt.export.generation import Generator


def _ort_ops(path, tmp_path) -> collections.Counter:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(node.op_type for node in onnx.load(tmp_path / "optimized.onnx").graph.node)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_every_norm_becomes_one_ort_kernel_and_generation_is_unchanged(arch, tmp_path):
    program = graphopt.capture_decoder(zoo.tiny_causal_lm(arch))
    result = graphopt.optimize(program, "rms-norm")
    record = result.report.passes[0]
    assert record.status == "applied" and record.exact
    assert record.info["rewritten"] == 2 * 2 + 1  # two per layer and the final norm
    to_onnx(program, tmp_path / "before.onnx")
    to_onnx(result.program, tmp_path / "after.onnx")
    assert _ort_ops(tmp_path / "before.onnx", tmp_path).get("SimplifiedLayerNormalization", 0) == 0
    after = _ort_ops(tmp_path / "after.onnx", tmp_path)
    assert after["SimplifiedLayerNormalization"] == 5 and after.get("Reciprocal", 0) == 0
    prompts = [[5, 6, 7, 8], [9, 10]]
    ours = Generator(make_session(tmp_path / "after.onnx", threads=1)).generate(prompts, max_new_tokens=16, eos_token_id=[], return_logits=True)
    plain = Generator(make_session(tmp_path / "before.onnx", threads=1)).generate(prompts, max_new_tokens=16, eos_token_id=[], return_logits=True)
    np.testing.assert_array_equal(ours.sequences, plain.sequences)
    assert max(float(np.abs(a - b).max()) for a, b in zip(ours.logits, plain.logits)) < 1e-4


def test_a_model_without_rmsnorm_is_unchanged_with_a_reason():
    program = graphopt.capture(zoo.tiny_model("bert"), kwargs=zoo.example_inputs("bert"))
    result = graphopt.optimize(program, "rms-norm?")
    assert result.report.passes[0].status == "unchanged"
    assert "no x * rsqrt" in result.report.passes[0].reason

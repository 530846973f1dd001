"""The cluster pass: k-means codebooks + packed codes, exact when centroids cover every
value, ORT parity, a compact file that ONNX Runtime decodes at load, int8 codes after quantize."""

from __future__ import annotations

import collections

import onnx
import pytest
import torch
from torch import nn

import graphopt
from graphopt import zoo
from graphopt.cluster import kmeans_1d, pack_codes, packed_bytes, unpack_codes
from graphopt.context import PassContext
from graphopt.errors import ConfigError
from graphopt.export import check_parity, make_session, to_onnx
from graphopt.passes.cluster import Cluster
from graphopt.passes.quantize import Quantize

DECODE_OPS = {"BitShift", "BitwiseAnd", "GatherElements"}


class Wide(nn.Module):
    """Two 256x256 linears: big enough that the exporter's folder keeps their packed codes."""

    def __init__(self, levels: int | None = None):
        super().__init__()
        self.a, self.b = nn.Linear(256, 256), nn.Linear(256, 256)
        if levels is not None:  # weights with few distinct values
            with torch.no_grad():
                for layer in (self.a, self.b):
                    layer.weight.copy_(torch.randint(-levels // 2, levels // 2, layer.weight.shape) / 64)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _exported_ops(program, tmp_path, name):
    exported = to_onnx(program, tmp_path / f"{name}.onnx")
    optimized = tmp_path / f"{name}.opt.onnx"
    session = make_session(exported.path, threads=2, optimized_model_path=optimized)
    stored = collections.Counter(n.op_type for n in onnx.load(exported.path).graph.node)
    after_load = collections.Counter(n.op_type for n in onnx.load(optimized).graph.node)
    return exported, session, stored, after_load


@pytest.mark.parametrize("bits", range(1, 9))
def test_codes_pack_and_unpack(bits):
    codes = torch.randint(0, 1 << bits, (1001,))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_bytes(1001, bits)
    assert torch.equal(unpack_codes(packed, bits, 1001), codes)


def test_kmeans_is_exact_with_as_many_centroids_as_values_and_close_otherwise():
    few = torch.randint(-3, 3, (16, 40)).float() / 7
    assert torch.equal(kmeans_1d(few, 8).decode(), few)
    weights = torch.randn(32, 256)
    per_row, per_tensor = kmeans_1d(weights, 16), kmeans_1d(weights.reshape(1, -1), 16)
    assert per_row.codebook.shape == (32, 16) and per_tensor.codebook.shape == (1, 16)
    for clustering in (per_row, per_tensor):
        error = (clustering.decode().reshape(32, 256) - weights).norm() / weights.norm()
        assert error < 0.12  # 4-bit k-means on a Gaussian: ~0.1 relative error


def test_clustering_with_as_many_centroids_as_distinct_values_is_exact(tmp_path):
    program = graphopt.capture(Wide(levels=16), (torch.randn(3, 256),))
    before = program.run()
    result = Cluster(bits=4)(program)
    assert result.modified and result.info.clustered == 2
    assert all(t.relative_error == 0 for t in result.info.tensors.values())
    assert all(torch.equal(x, y) for x, y in zip(before, result.program.run()))
    assert check_parity(result.program, to_onnx(result.program, tmp_path / "m.onnx").path, atol=1e-5, rtol=1e-5).passed


def test_compact_file_decoded_by_ort_at_load_with_parity(tmp_path):
    program = graphopt.capture(Wide(), (torch.randn(3, 256),))
    dense, _, _, _ = _exported_ops(program, tmp_path, "dense")
    result = Cluster(bits=4)(program.clone())
    assert result.modified
    # 4-bit codes (1/8 of fp32) + a 16-entry fp32 codebook per 256-wide row (1/16)
    assert result.info.bytes_after == 524288 // 8 + 524288 // 16
    clustered, session, stored, after_load = _exported_ops(result.program, tmp_path, "clustered")
    assert stored["GatherElements"] == 2  # the file holds the packed form ...
    assert not DECODE_OPS & set(after_load)  # ... which ORT folds to dense weights at load
    assert clustered.bytes < 0.25 * dense.bytes
    assert check_parity(result.program, session, atol=1e-5, rtol=1e-5).passed


def test_three_bit_codes_and_float16_codebooks_export_with_parity(tmp_path):
    program = graphopt.capture(Wide(), (torch.randn(3, 256),))
    result = Cluster(bits=3, granularity="tensor", codebook_dtype="float16")(program)
    assert all(t.bits == 3 and t.codebooks == 1 for t in result.info.tensors.values())
    _exported, session, _, after_load = _exported_ops(result.program, tmp_path, "m")
    assert not DECODE_OPS & set(after_load)
    assert check_parity(result.program, session, atol=1e-5, rtol=1e-5).passed


def test_nothing_to_cluster_is_unmodified_and_says_why():
    program = graphopt.capture(Wide(), (torch.randn(3, 256),))
    fingerprint = program.fingerprint()
    result = Cluster(min_numel=10**6)(program)
    assert result.status == "unchanged" and result.info.clustered == 0
    assert "min_numel=1000000" in result.reason and result.info.skipped == []
    result = Cluster(include=["no.such.*"])(program)
    assert result.status == "unchanged" and "could be clustered" in result.reason
    assert sorted(row.tensor for row in result.info.skipped) == ["a.weight", "b.weight"]
    assert all(row.kept == "dense" and "include" in row.reason and row.node and row.module_path for row in result.info.skipped)
    assert program.fingerprint() == fingerprint


def test_bert_through_the_manager_embeddings_get_their_own_bits(tmp_path):
    program = graphopt.capture(zoo.tiny_model("bert", layers=2), kwargs=zoo.example_inputs("bert"))
    budget = graphopt.Budget(min_cosine=0.99)
    result = graphopt.optimize(program, "cluster{bits=5,embedding_bits=4,min_numel=1024}", budget=budget)
    record = result.report.passes[0]
    assert record.status == "applied", record.reason
    tensors = record.info["tensors"]
    assert tensors["embeddings.word_embeddings.weight"]["bits"] == 4
    assert tensors["embeddings.word_embeddings.weight"]["codebooks"] == 1
    assert tensors["encoder.layer.0.intermediate.dense.weight"]["codebooks"] == 64  # one per output row
    exported = to_onnx(result.program, tmp_path / "bert.onnx")
    assert check_parity(result.program, exported.path, atol=1e-4, rtol=1e-4).passed


def test_codebook_gradient_sums_the_weights_that_use_each_centroid():
    codes = torch.randint(0, 4, (6, 10))
    codebook = torch.randn(6, 4, dtype=torch.double, requires_grad=True)
    packed = pack_codes(codes, 2)
    dense = torch.ops.graphopt.clustered_weight(packed, codebook, [6, 10], 2)
    grad = torch.randn(6, 10, dtype=torch.double)
    dense.backward(grad)
    expected = torch.zeros(6, 4, dtype=torch.double).scatter_add_(1, codes, grad)
    assert torch.allclose(codebook.grad, expected)


def test_cluster_after_quantize_clusters_the_int8_codes(tmp_path):
    program = graphopt.capture(Wide(), (torch.randn(3, 256),))
    quantized = Quantize(mode="dynamic")(program).program
    int8_before = quantized.run()
    result = Cluster(bits=4)(quantized)
    assert result.modified and result.info.clustered == 2
    books = [t for n, t in result.program.module.named_buffers() if n.endswith("_codebook")]
    assert books and all(b.dtype == torch.int8 for b in books)  # integer centroids: still int8 weights
    cos = torch.nn.functional.cosine_similarity(result.program.run()[0].flatten(), int8_before[0].flatten(), dim=0)
    assert cos > 0.99
    _exported, session, _, after_load = _exported_ops(result.program, tmp_path, "q")
    assert "DynamicQuantizeMatMul" in after_load and not DECODE_OPS & set(after_load)
    assert check_parity(result.program, session, atol=2e-2, rtol=2e-2).passed


def test_bad_options_are_rejected():
    with pytest.raises(ConfigError):
        Cluster(bits=9)
    with pytest.raises(ConfigError):
        Cluster(granularity="column")
    with pytest.raises(ConfigError, match="unknown option 'calibration'"):  # data comes from the PassContext
        Cluster(calibration=[])


@pytest.mark.parametrize("weighting", ["activations", "hessian"])
def test_calibration_aware_coding_lowers_output_error(weighting):
    torch.manual_seed(0)
    x = torch.randn(128, 256)
    x[:, :8] *= 20  # a few outlier channels, as in transformer hidden states
    program = graphopt.capture(Wide(), (x,))
    reference = program.run()[0]

    def error(result):
        return ((result.program.run()[0] - reference).norm() / reference.norm()).item()

    uniform = Cluster(bits=3)(program.clone())
    aware = Cluster(bits=3, weighting=weighting)(program.clone())
    assert uniform.info.calibration is None and aware.info.calibration.startswith("the example inputs")
    assert all(t.weighting == weighting for t in aware.info.tensors.values())
    assert error(aware) < 0.8 * error(uniform)
    # The statistics come from the context's calibration batches when it has some: other
    # inputs (outliers in other channels) give other codes.
    other = torch.randn(128, 256)
    other[:, 100:108] *= 20
    ctx = PassContext(calibration=(((other,), {}),), calibration_source="outliers elsewhere")
    moved = Cluster(bits=3, weighting=weighting)(program.clone(), ctx)
    assert moved.info.calibration == "1 calibration batches (outliers elsewhere)"
    assert error(moved) > error(aware)

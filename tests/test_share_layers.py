"""The share-layers pass: identical layers shared exactly, chosen groups, one tensor in the
program and in ONNX, ORT parity, tied embeddings kept and introduced."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

import graphopt
from graphopt import zoo
from graphopt.errors import ConfigError
from graphopt.export import check_parity, to_onnx
from graphopt.passes.cluster import Cluster
from graphopt.passes.share_layers import ShareLayers, consecutive_groups


def _bert(layers: int = 4, copies: dict[int, int] | None = None):
    model = zoo.tiny_model("bert", layers=layers)
    for target, source in (copies or {}).items():
        model.encoder.layer[target].load_state_dict(model.encoder.layer[source].state_dict())
    return graphopt.capture(model, kwargs=zoo.example_inputs("bert"))


def _readers(program) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in program.graph.nodes:
        if node.op == "get_attr":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def _initializers(path, shape) -> int:
    return sum(1 for t in onnx.load(path).graph.initializer if list(t.dims) == list(shape))


@pytest.fixture(scope="module")
def twin_layers():
    """Layers 1 and 2 identical, 0 and 3 random."""
    torch.manual_seed(0)
    return _bert(copies={2: 1})


def test_identical_layers_are_shared_exactly_and_stored_once(twin_layers, tmp_path):
    program = twin_layers.clone()
    before = program.run()
    params_before = program.parameter_stats()["parameters"]
    result = ShareLayers()(program)
    assert result.modified and result.info.groups == [[1, 2]] and result.info.unique_layers == 3
    assert all(torch.equal(x, y) for x, y in zip(before, result.program.run()))  # zero drift
    layer_size = sum(p.numel() for p in zoo.tiny_model("bert", layers=1).encoder.layer[0].parameters())
    assert result.program.parameter_stats()["parameters"] == params_before - layer_size
    assert _readers(result.program)["encoder.layer.1.attention.self.query.weight"] == 2
    shared = to_onnx(result.program, tmp_path / "shared.onnx")
    assert check_parity(result.program, shared.path, atol=1e-5, rtol=1e-5).passed


def test_nothing_similar_enough_leaves_the_program_unmodified(twin_layers):
    random_layers = _bert()
    result = ShareLayers()(random_layers)
    assert result.status == "unchanged" and result.info.groups == []
    assert result.reason == "no two of the 4 layers of 'encoder.layer' are identical"
    result = ShareLayers(max_distance=0.5)(twin_layers.clone())  # random layers are ~1.0 apart
    assert result.info.groups == [[1, 2]]
    assert ShareLayers(max_distance=0.5)(random_layers).reason.endswith("are within max_distance=0.5")


def test_exact_only_when_it_can_tie_identical_layers_only():
    assert ShareLayers.is_exact(ShareLayers().config)
    for options in (dict(max_distance=0.1), dict(unique=2), dict(groups=[[0, 1]]), dict(tie_embeddings=True)):
        assert not ShareLayers(**options).exact, options


def test_identical_layers_through_the_manager_pass_the_exact_check(twin_layers):
    result = graphopt.optimize(twin_layers, "share-layers")
    (record,) = result.report.passes
    assert record.exact and record.status == "applied" and not result.report.failures
    assert record.drift_step is not None and record.drift_step["max_rel"] == 0


class _Stack(nn.Module):
    """30 small layers (cdist switches to its matmul form from 25 rows on)."""

    def __init__(self, copies: dict[int, int], nudge: dict[int, float] | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(30))
        with torch.no_grad():
            for target, source in copies.items():
                self.layers[target].load_state_dict(self.layers[source].state_dict())
            for index, amount in (nudge or {}).items():
                self.layers[index].weight[0, 0] += amount

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def test_max_distance_zero_ties_equal_weights_only():
    program = graphopt.capture(_Stack({7: 3, 20: 3}, nudge={20: 1e-6}), (torch.randn(2, 16),))
    result = ShareLayers()(program)
    assert result.info.groups == [[3, 7]]  # layer 20 differs in one weight by 1e-6: not tied
    assert result.info.layers == 30 and result.info.distance[3][7] == 0


def test_groups_naming_missing_layers_are_skipped_with_the_reason(twin_layers):
    result = ShareLayers(groups=[[0, 9]])(twin_layers.clone())
    assert result.status == "skipped" and "[9]" in result.reason and "[0, 1, 2, 3]" in result.reason


def test_target_count_picks_the_most_similar_consecutive_layers(twin_layers, tmp_path):
    result = ShareLayers(unique=3)(twin_layers.clone())
    assert result.info.groups == [[1, 2]]  # the identical pair is the cheapest to merge
    result = ShareLayers(unique=2, tie="mean")(twin_layers.clone())
    program = result.program
    assert result.modified and result.info.unique_layers == 2
    assert sorted(i for g in result.info.groups for i in g) != []
    exported = to_onnx(program, tmp_path / "two.onnx")
    assert check_parity(program, exported.path, atol=1e-4, rtol=1e-4).passed
    # Shared matrices are stored once: two layers' in the file instead of three (the unshared
    # export already stores the identical layers 1 and 2 once). Vectors under the exporter's
    # folding threshold (biases, norms) may still be copied per reader.
    unshared = to_onnx(twin_layers, tmp_path / "unshared.onnx")
    matrices = 4 * (4 * 32 * 32 + 2 * 32 * 64)
    assert matrices <= unshared.initializer_bytes - exported.initializer_bytes <= matrices + 4 * 352


def test_consecutive_groups_minimise_distance():
    distance = torch.tensor([[0, 1, 9, 9], [1, 0, 9, 9], [9, 9, 0, 1], [9, 9, 1, 0]], dtype=torch.float32)
    assert consecutive_groups(distance, 2, [0, 1, 2, 3]) == [[0, 1], [2, 3]]
    assert consecutive_groups(distance, 4, [0, 1, 2, 3]) == [[0], [1], [2], [3]]


def test_named_groups_and_scope_attention_tie_only_attention(twin_layers):
    result = ShareLayers(groups=[[0, 3]], scope="attention", tie="representative")(twin_layers.clone())
    readers = _readers(result.program)
    assert readers["encoder.layer.0.attention.self.query.weight"] == 2
    assert "encoder.layer.3.attention.self.query.weight" not in readers
    assert readers["encoder.layer.3.intermediate.dense.weight"] == 1  # FFN stays per layer


def test_bad_options_are_rejected():
    with pytest.raises(ConfigError):
        ShareLayers(unique=2, groups=[[0, 1]])
    with pytest.raises(ConfigError):
        ShareLayers(groups=[[0, 1], [1, 2]])


def _gpt2_lm(tie: bool):
    import transformers as tf

    config = tf.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False,
                           tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 100, (2, 8))
    return graphopt.capture(model, kwargs={"input_ids": ids})


def _onnx_tables(path) -> int:
    return sum(1 for t in onnx.load(path).graph.initializer if sorted(t.dims) == [32, 100])


def test_tied_embeddings_stay_tied_through_sharing_clustering_and_export(tmp_path):
    program = _gpt2_lm(tie=True)
    shared = ShareLayers(unique=1)(program).program
    clustered = Cluster(bits=4, min_numel=1024)(shared)
    # torch.export reads the tied table through one name (plus a dead get_attr of the other)
    decoders = [n for n in clustered.program.graph.nodes if n.target is torch.ops.graphopt.clustered_weight.default]
    tables = [n for n in decoders if "wte" in n.args[0].target or "lm_head" in n.args[0].target]
    assert len(tables) == 1 and len(tables[0].users) == 2  # the lookup and the LM head read one decoded table
    assert len([b for b, _ in clustered.program.module.named_buffers() if ("wte" in b or "lm_head" in b) and b.endswith("_codes")]) == 1
    exported = to_onnx(clustered.program, tmp_path / "tied.onnx")
    assert check_parity(clustered.program, exported.path, atol=1e-4, rtol=1e-4).passed
    plain = to_onnx(program, tmp_path / "plain.onnx")
    assert _onnx_tables(plain.path) == 1


def test_tie_embeddings_introduces_input_output_sharing(tmp_path):
    program = _gpt2_lm(tie=False)
    before = to_onnx(program, tmp_path / "untied.onnx")
    assert _onnx_tables(before.path) == 2
    result = ShareLayers(tie_embeddings=True)(program)
    assert result.modified and result.info.lm_head_tied == "lm_head.weight"
    exported = to_onnx(result.program, tmp_path / "tied.onnx")
    assert _onnx_tables(exported.path) == 1
    assert check_parity(result.program, exported.path, atol=1e-4, rtol=1e-4).passed

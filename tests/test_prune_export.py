"""Pruned tiny models of each architecture export to ONNX and match in ONNX Runtime,
on the example inputs and on other batch sizes and sequence lengths."""

from __future__ import annotations

import pytest

import graphopt
from graphopt import zoo
from graphopt.export import check_parity, to_onnx
from graphopt.passes.prune import Prune
from graphopt.passes.sdpa import AttentionToSDPA

# (architecture, attention implementation captured, plan). BERT goes through the sdpa pass
# from eager attention, as MiniLM does; Llama has grouped-query attention.
CASES = [
    ("bert", "eager", {"heads": 0.5, "ffn": 0.5, "hidden": 0.5}),
    ("gpt2", "sdpa", {"heads": 0.25, "ffn": 0.5, "hidden": 0.25}),
    ("llama", "sdpa", {"kv_heads": 0.5, "ffn": 0.5, "hidden": 0.5}),
    ("vit", "sdpa", {"heads": 0.5, "ffn": 0.25, "hidden": 0.5}),
]


@pytest.mark.parametrize(("arch", "attn", "plan"), CASES, ids=[c[0] for c in CASES])
def test_pruned_model_exports_with_smaller_initializers_and_matches(arch, attn, plan, tmp_path):
    program = graphopt.capture(zoo.tiny_model(arch, attn, layers=1), kwargs=zoo.example_inputs(arch))
    if attn == "eager":
        assert AttentionToSDPA()(program).modified
    before = program.parameter_stats()["parameter_bytes"]

    result = Prune(**plan, multiple=4, allow_output_change=True)(program)

    assert result.modified
    kinds = {g.kind for g in result.info.groups if g.kept < g.size}
    assert kinds == set(plan), result.info.groups
    exported = to_onnx(program, tmp_path / f"{arch}.onnx")
    assert exported.initializer_bytes < before
    check_parity(program, exported.path, atol=1e-4, rtol=1e-4)  # example + 2 random (batch, seq) shapes

"""The heads-25% + FFN-50% plan on the real all-MiniLM-L6-v2: sizes, export, ORT parity,
and a floor on held-out fidelity before recovery (importance from training text only)."""

import pytest

import graphopt
from graphopt.context import PassContext
from graphopt.data import batches, heldout_sentences, train_sentences
from graphopt.export import check_parity, to_onnx
from graphopt.fidelity import compare_encoders
from graphopt.models import example_inputs, load_model
from graphopt.passes.prune import Prune
from graphopt.passes.sdpa import AttentionToSDPA

pytestmark = pytest.mark.slow


def test_minilm_heads_and_ffn_plan(tmp_path):
    loaded = load_model("minilm")
    program = graphopt.capture(loaded.model, kwargs=example_inputs(loaded.tokenizer))
    assert AttentionToSDPA()(program).modified
    calibration = tuple(((), b) for b in batches(loaded.tokenizer, train_sentences(32), batch_size=16))

    result = Prune(heads=0.25, ffn=0.5, importance="l2")(program, PassContext(calibration=calibration))

    assert result.modified
    kept = {(g.kind, g.kept, g.size) for g in result.info.groups}
    assert kept == {("heads", 9, 12), ("ffn", 768, 1536)} and len(result.info.groups) == 12
    # Each layer loses 3 heads x 32 dims of q/k/v rows (+bias) and o columns, and 768 FFN channels.
    per_layer = 3 * 32 * (3 * (384 + 1) + 384) + 768 * (384 + 1 + 384)
    assert result.info.params_before - result.info.params_after == 6 * per_layer
    exported = to_onnx(program, tmp_path / "pruned.onnx")
    check_parity(program, exported.path, atol=1e-4, rtol=1e-3)
    fidelity = compare_encoders(loaded.model, program, loaded.tokenizer, heldout_sentences(64))
    assert fidelity["mean_cosine"] > 0.5  # measured 0.62 (l2), before any recovery

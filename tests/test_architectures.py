"""Every tiny architecture, eager and SDPA: capture → exact pipeline → ONNX → ORT parity."""

import numpy as np
import onnx
import pytest
import torch
import transformers

import graphopt
from graphopt import zoo
from graphopt.export import make_session, run

aten = torch.ops.aten


def _is_fused_attention(node) -> bool:
    name = node.target.name() if node.op == "call_function" and hasattr(node.target, "name") else ""
    return name.startswith(("graphopt::attention_qkv", "graphopt::fused_attention"))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", zoo.ARCHS)
def test_exact_pipeline_exports_with_ort_parity(arch, attn, tmp_path):
    model = zoo.tiny_model(arch, attn=attn)
    program = graphopt.capture(model, kwargs=zoo.example_inputs(arch))
    result = graphopt.optimize(program, "default")
    assert result.report.ok, result.report.failures
    sdpa = next(r for r in result.report.passes if r.name == "sdpa")
    if attn == "eager":
        assert sdpa.status == "applied" and sdpa.info["replaced"] == 2
    else:
        assert sdpa.status == "unchanged"
    # every attention block is SDPA or, after fused-attention, one graphopt attention kernel
    fused = [n for n in result.program.graph.nodes if n.target is aten.scaled_dot_product_attention.default or _is_fused_attention(n)]
    assert len(fused) == 2
    result.export(tmp_path / "model.onnx")
    assert result.parity.passed
    assert max(r.max_abs for r in result.parity.results) <= 1e-4
    # and against the original model, on a fresh input of another size
    inputs = zoo.example_inputs(arch, batch=3, seq=11, seed=1)
    session = make_session(tmp_path / "model.onnx")
    feed = {k: v for k, v in inputs.items() if k in {i.name for i in session.get_inputs()}}
    want = graphopt.program.flatten_outputs(model(**inputs))[0].detach().numpy()
    got = run(session, feed)[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_tied_lm_head_is_stored_once_in_onnx(tmp_path):
    config = zoo._config("gpt2", 2)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    inputs = zoo.example_inputs("gpt2")
    result = graphopt.optimize(graphopt.capture(model, kwargs=inputs), "default")
    result.export(tmp_path / "lm.onnx")
    wte = model.transformer.wte.weight.detach().numpy()
    proto = onnx.load(str(tmp_path / "lm.onnx"))
    copies = 0
    for init in proto.graph.initializer:
        array = onnx.numpy_helper.to_array(init)
        if array.shape == wte.shape and np.array_equal(array, wte):
            copies += 1
        if array.shape == wte.T.shape and np.array_equal(array, wte.T):
            copies += 1
    assert copies == 1
    logits = run(make_session(tmp_path / "lm.onnx"), inputs)[0]
    np.testing.assert_allclose(logits, model(**inputs).logits.detach().numpy(), atol=1e-4, rtol=0)

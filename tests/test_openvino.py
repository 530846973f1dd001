"""The ``openvino`` target: OpenVINO's runtime behind the session interface, bf16 precision,
the recipe checks, and a bundle that reopens on the runtime and precision it was built for."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from graphopt.errors import ConfigError
from graphopt.export import make_session, run, to_onnx
from graphopt.export.openvino_session import RUNTIME, OpenVINOSession, capabilities
from graphopt.export.session import ProviderError, resolve_provider
from graphopt.recipe import Recipe

pytest.importorskip("openvino")


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(64)
        self.up = torch.nn.Linear(64, 256)
        self.down = torch.nn.Linear(256, 64)

    def forward(self, x, mask):
        h = self.down(torch.nn.functional.gelu(self.up(self.norm(x))))
        return x + h * mask[..., None], h.sum(-1)


@pytest.fixture(scope="module")
def block_onnx(tmp_path_factory):
    from graphopt.capture import capture

    torch.manual_seed(0)
    model = _Block().eval()
    kwargs = {"x": torch.randn(2, 16, 64), "mask": torch.ones(2, 16)}
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    program = capture(model, kwargs=kwargs, dynamic_shapes={"x": {0: batch, 1: seq}, "mask": {0: batch, 1: seq}})
    path = tmp_path_factory.mktemp("ov") / "model.onnx"
    return model, to_onnx(program, path).path


def _feed(batch: int, seq: int):
    g = torch.Generator().manual_seed(batch * 100 + seq)
    return {"x": torch.randn(batch, seq, 64, generator=g), "mask": (torch.rand(batch, seq, generator=g) > 0.2).float()}


def test_openvino_provider_runs_openvino_runtime_when_ort_lacks_the_ep():
    assert "OpenVINOExecutionProvider" not in __import__("onnxruntime").get_available_providers()
    assert resolve_provider("openvino") == RUNTIME


def test_openvino_session_matches_onnxruntime_at_fp32_on_dynamic_shapes(block_onnx):
    model, path = block_onnx
    ort_session = make_session(path, threads=1)
    ov_session = make_session(path, provider="openvino", threads=1)
    assert isinstance(ov_session, OpenVINOSession) and ov_session.get_providers() == [RUNTIME]
    assert [i.name for i in ov_session.get_inputs()] == [i.name for i in ort_session.get_inputs()]
    assert [o.name for o in ov_session.get_outputs()] == [o.name for o in ort_session.get_outputs()]
    assert ov_session.get_inputs()[0].type == "tensor(float)"
    for batch, seq in [(1, 7), (3, 33)]:  # shapes the export never saw
        feed = _feed(batch, seq)
        with torch.no_grad():
            expected = [t.numpy() for t in model(**feed)]
        for session in (ort_session, ov_session):
            got = run(session, feed)
            for g, e in zip(got, expected, strict=True):
                np.testing.assert_allclose(g, e, atol=1e-4, rtol=1e-4)
    # a named subset of outputs, in the order asked for
    second, first = ov_session.run([ov_session.get_outputs()[1].name, ov_session.get_outputs()[0].name],
                                   {k: v.numpy() for k, v in _feed(1, 5).items()})
    assert second.shape == (1, 5) and first.shape == (1, 5, 64)


@pytest.mark.skipif("BF16" not in capabilities(), reason="this CPU has no bf16 instructions")
def test_bf16_runs_bf16_kernels_close_to_fp32_but_not_bitwise(block_onnx):
    model, path = block_onnx
    feed = _feed(2, 24)
    expected = model(**feed)[0].detach().numpy()
    fp32 = run(make_session(path, provider="openvino", precision="fp32"), feed)[0]
    bf16 = run(make_session(path, provider="openvino", precision="bf16"), feed)[0]
    err32, err16 = np.abs(fp32 - expected).max(), np.abs(bf16 - expected).max()
    assert err32 < 1e-4
    assert 1e-4 < err16 < 0.1 * np.abs(expected).max()  # bf16 rounding, not f32 and not garbage


def test_precision_errors_name_the_problem(block_onnx, monkeypatch):
    _, path = block_onnx
    with pytest.raises(ConfigError, match="needs provider 'openvino'"):
        make_session(path, precision="bf16")
    with pytest.raises(ConfigError, match="precision must be one of"):
        make_session(path, provider="openvino", precision="fp8")
    with pytest.raises(ConfigError, match=r"needs runtime\.provider = 'openvino'"):
        Recipe.from_dict({"name": "x", "pipeline": "dce", "runtime": {"precision": "bf16"}})
    import graphopt.export.openvino_session as ovs

    monkeypatch.setattr(ovs, "capabilities", lambda: ["FP32", "INT8"])
    with pytest.raises(ConfigError, match="needs a CPU with bf16 instructions"):
        make_session(path, provider="openvino", precision="bf16")
    monkeypatch.setattr(ovs, "available", lambda: False)
    with pytest.raises(ProviderError, match=r"pip install graphopt\[openvino\]"):
        make_session(path, provider="openvino")


def test_auto_precision_is_bf16_where_the_cpu_has_it_and_fp32_elsewhere(block_onnx, monkeypatch):
    import graphopt.export.openvino_session as ovs
    from graphopt.build import _resolve_precision
    from graphopt.export.session import resolve_precision

    _, path = block_onnx
    assert resolve_precision("cpu", "auto") == "fp32"  # ORT runs what the graph declares
    assert Recipe.from_dict({"name": "x", "pipeline": "dce", "runtime": {"precision": "auto"}}).runtime.precision == "auto"
    recipe = Recipe.from_dict({"name": "x", "pipeline": "dce", "runtime": {"provider": "openvino", "precision": "auto"}})
    for caps, expected in ((["FP32", "BF16", "INT8"], "bf16"), (["FP32", "INT8"], "fp32")):
        monkeypatch.setattr(ovs, "capabilities", lambda caps=caps: caps)
        assert resolve_precision("openvino", "auto") == expected
        assert _resolve_precision(recipe, lambda _m: None).runtime.precision == expected  # what the report and bundle record
    monkeypatch.undo()
    session = make_session(path, provider="openvino", precision="auto")
    assert session.precision == ("bf16" if "BF16" in capabilities() else "fp32")


def test_generation_refuses_a_session_without_io_binding(block_onnx):
    from graphopt.export.generation import Generator

    with pytest.raises(ConfigError, match="IO binding"):
        Generator(make_session(block_onnx[1], provider="openvino"))


@pytest.mark.slow
@pytest.mark.skipif("BF16" not in capabilities(), reason="this CPU has no bf16 instructions")
def test_bf16_preset_builds_minilm_for_openvino_and_the_bundle_reopens_there(tmp_path):
    from graphopt.build import BuildOptions, build
    from graphopt.bundle import open_session
    from graphopt.models import load_model
    recipe = Recipe.load("bf16")
    out = tmp_path / "bundle"
    result = build(load_model("minilm"), recipe, BuildOptions(out_dir=out, threads=2, heldout=48, bench_repeat=5), say=lambda _m: None)
    assert not result.gate_failures, result.gate_failures
    report = json.loads((out / "report.json").read_text())
    assert report["sections"]["parity"]["passed"] is True
    assert report["sections"]["session"]["precision"] == "bf16" and report["sections"]["session"]["parity_precision"] == "fp32"
    rows = report["sections"]["comparison"]
    assert "OpenVINO bf16 (plain export)" in rows
    ours = rows["graphopt → ORT"]
    assert 0.9995 <= ours["heldout_mean_cos"] < 1.0  # bf16 really ran: close, not bitwise
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["session"]["runtime"] == "openvino" and manifest["session"]["precision"] == "bf16"
    assert manifest["target"]["precision"] == "bf16" and "openvino" in manifest["versions"]
    session = open_session(out)
    assert isinstance(session, OpenVINOSession) and session.precision == "bf16"


def test_openvino_int8_preset_passes_op_parity_on_openvino_and_the_bundle_reopens_there(tmp_path):
    # OpenVINO rounds a few activation codes the other way (x / scale + zero point in fp32):
    # op parity must excuse exactly those flips and pass, not fail or be skipped.
    from graphopt.build import BuildOptions, build
    from graphopt.bundle import open_session
    from graphopt.models import load_model
    recipe = Recipe.load("openvino-int8")
    assert recipe.runtime.precision == "auto"
    out = tmp_path / "bundle"
    result = build(load_model("minilm"), recipe, BuildOptions(out_dir=out, threads=2, heldout=48, bench_repeat=5), say=lambda _m: None)
    assert not result.gate_failures, result.gate_failures
    report = json.loads((out / "report.json").read_text())
    parity = report["sections"]["parity"]
    assert parity["passed"] is True
    assert parity["ops"]["linear_static_int8"]["count"] == 37 and parity["ops"]["linear_static_int8"]["failed"] == 0
    expected = "bf16" if "BF16" in capabilities() else "fp32"
    assert report["sections"]["session"]["precision"] == expected
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["session"]["runtime"] == "openvino" and manifest["session"]["precision"] == expected
    ours = report["sections"]["comparison"]["graphopt → ORT"]
    assert ours["heldout_mean_cos"] >= recipe.gates.min_heldout_cosine
    session = open_session(out)
    assert isinstance(session, OpenVINOSession) and session.precision == expected

"""The smooth pass (SmoothQuant): exact rewrite, where the scales go, α chosen by simulated int8
error, what it leaves alone and why; and what it buys once static int8 follows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphopt
from graphopt import zoo
from graphopt.context import PassContext
from graphopt.passes.sdpa import AttentionToSDPA
from graphopt.passes.smooth import Smooth
from graphopt.quant.smoothing import ActivationSample, choose_alpha, int8_error, smoothing_scales

aten = torch.ops.aten


def _calibration(arch: str, batches: int) -> PassContext:
    data = tuple(((), zoo.example_inputs(arch, seed=s)) for s in range(batches))
    return PassContext(calibration=data, calibration_source=f"seeded {arch} examples")


def _outlier_sample(outlier: float, rows: int = 256, channels: int = 64, seed: int = 0) -> ActivationSample:
    """Activations whose channel 3 is ``outlier`` times larger than the others."""
    g = torch.Generator().manual_seed(seed)
    sample = ActivationSample()
    for _ in range(3):
        x = torch.randn(rows, channels, generator=g)
        x[:, 3] *= outlier
        sample.update(x)
    return sample


def test_scales_follow_the_smoothquant_formula_and_leave_dead_channels_alone():
    act = torch.tensor([4.0, 1.0, 0.0])
    weight = torch.tensor([1.0, 4.0, 2.0])
    s = smoothing_scales(act, weight, 0.5)
    assert torch.allclose(s[:2], torch.tensor([2.0, 0.5]))
    assert s[2] == 1.0  # a channel that is always zero is not scaled


def test_smoothing_lowers_the_int8_error_of_outlier_activations_and_is_declined_without_them():
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(32, 64, generator=g) * 0.1]
    choice = choose_alpha(_outlier_sample(60.0), weights)
    assert choice.alpha is not None and choice.scales is not None
    assert choice.error_after < 0.5 * choice.error_before
    assert choice.errors["none"] == choice.error_before
    assert choice.scales[3] == choice.scales.max()  # the outlier channel is divided the most
    plain = choose_alpha(_outlier_sample(1.0), weights, min_gain=0.3)
    assert plain.alpha is None and plain.scales is None and plain.error_after == plain.error_before


def test_static_simulation_takes_one_range_over_every_batch():
    g = torch.Generator().manual_seed(2)
    sample = ActivationSample()
    sample.update(torch.randn(64, 16, generator=g))
    sample.update(torch.randn(64, 16, generator=g) * 20)  # one batch with a much wider range
    weights = [torch.randn(8, 16, generator=g)]
    assert int8_error(sample, weights, None, static=True, weight_qmax=127) > int8_error(sample, weights, None, static=False, weight_qmax=127)


def test_smooth_is_exact_on_bert_and_folds_where_it_can():
    program = graphopt.capture(zoo.tiny_model("bert", layers=2), kwargs=zoo.example_inputs("bert"))
    AttentionToSDPA()(program)
    inputs = [zoo.example_inputs("bert", batch=3, seq=11, seed=s) for s in range(3)]
    before = [program.run((), kw) for kw in inputs]
    result = Smooth(min_gain=0.0)(program, _calibration("bert", 4))
    assert result.modified and Smooth.is_exact(Smooth().config)
    folds = {g.fold for g in result.info.groups}
    assert "value-projection" in folds and "multiply" in folds, result.info.groups
    # post-LN BERT: the LayerNorm output is the residual too, so Q/K/V and the FFN need a multiply
    assert result.info.multiplies_inserted == sum(g.fold == "multiply" for g in result.info.groups)
    muls = [n for n in program.graph.nodes if n.meta.get("graphopt_created_by") == "smooth" and n.target is aten.mul.Tensor]
    assert len(muls) == result.info.multiplies_inserted
    after = [program.run((), kw) for kw in inputs]
    for b, a in zip(before, after):
        for x, y in zip(b, a):
            assert torch.allclose(x, y, rtol=1e-4, atol=1e-5), float((x - y).abs().max())
    assert result.info.calibration == "4 calibration batches (seeded bert examples)"


class _PreNorm(nn.Module):
    """x -> Linear(LayerNorm(x)): the LayerNorm feeds the layer alone, so it absorbs 1/s."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.fc = nn.Linear(32, 16)
        with torch.no_grad():
            self.norm.weight[5] = 40.0  # an outlier channel

    def forward(self, x):
        return self.fc(self.norm(x))


def test_a_layer_norm_read_by_the_group_alone_absorbs_the_scales_without_a_multiply():
    model = _PreNorm().eval()
    x = torch.randn(2, 24, 32)
    program = graphopt.capture(model, args=(x,))
    ctx = PassContext(calibration=tuple(((torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(s)),), {}) for s in range(3)))
    result = Smooth()(program, ctx)
    assert result.modified and [g.fold for g in result.info.groups] == ["layer-norm"]
    assert result.info.multiplies_inserted == 0
    assert not any(n.target is aten.mul.Tensor for n in program.graph.nodes)
    assert torch.allclose(program.run((x,), {})[0], model(x), rtol=1e-4, atol=1e-5)
    assert model.norm.weight[5] == 40.0  # the user's model is not touched


def test_insert_mul_false_leaves_groups_that_need_one_and_says_why():
    program = graphopt.capture(zoo.tiny_model("bert", layers=1), kwargs=zoo.example_inputs("bert"))
    AttentionToSDPA()(program)
    result = Smooth(insert_mul=False, min_gain=0.0)(program, _calibration("bert", 2))
    assert all(g.fold != "multiply" for g in result.info.groups)
    assert any("insert_mul=false" in g.reason for g in result.info.left)


def test_a_program_without_linear_layers_is_unchanged_with_the_reason():
    class Plain(nn.Module):
        def forward(self, x):
            return torch.relu(x) * 2

    program = graphopt.capture(Plain(), args=(torch.randn(2, 4),))
    result = Smooth()(program)
    assert result.status == "unchanged" and "no group of linear layers" in result.reason


def test_the_recipe_runs_smooth_and_the_manager_holds_it_to_exactness():
    program = graphopt.capture(zoo.tiny_model("bert", layers=2), kwargs=zoo.example_inputs("bert"))
    result = graphopt.optimize(program, "sdpa,smooth{min_gain=0},quantize{mode=static},int8-attention", context=_calibration("bert", 4))
    records = {r.name: r for r in result.report.passes}
    assert not result.report.failures, result.report.failures
    smooth = records["smooth"]
    assert smooth.exact and smooth.status == "applied" and smooth.info["smoothed"] > 0
    assert smooth.drift_step is not None and smooth.drift_step["max_rel"] < 1e-4
    assert records["int8-attention"].info["fused"] == 2  # the inserted multiply keeps Q/K/V on one input


@pytest.mark.parametrize("bad", [{"alpha": 1.5}, {"scheme": "per-token"}, {"min_gain": 1.0}, {"scheme": "weight_only", "group_size": 24}, {"scheme": "weight_only", "bits": 3}])
def test_config_errors_are_clear(bad):
    from graphopt.errors import ConfigError

    with pytest.raises((ConfigError, ValueError)):
        Smooth(**bad)


def test_smooth_then_static_int8_is_closer_to_fp32_than_static_int8_alone():
    """On activations with outlier channels (a LayerNorm gain of 40 on one channel), smoothing
    before static int8 lowers the error against fp32 on inputs it was not calibrated on."""
    model = _PreNorm().eval()
    gen = torch.Generator().manual_seed(7)
    ctx = PassContext(calibration=tuple(((torch.randn(4, 24, 32, generator=gen),), {}) for _ in range(4)))
    held = [torch.randn(4, 24, 32, generator=gen) for _ in range(4)]
    errors = {}
    for pipeline in ("quantize{mode=static}", "smooth{scheme=static},quantize{mode=static}"):
        program = graphopt.capture(model, args=(held[0],))
        result = graphopt.optimize(program, pipeline, context=ctx, budget={"min_cosine": 0.5})
        assert not result.report.failures, result.report.failures
        with torch.no_grad():
            errors[pipeline] = sum(float((result.program.run((x,), {})[0] - model(x)).pow(2).sum() / model(x).pow(2).sum()) for x in held)
    assert errors["smooth{scheme=static},quantize{mode=static}"] < 0.5 * errors["quantize{mode=static}"], errors


# ---- weight_only: AWQ's activation-aware scales before n-bit weights -----------------------------
class _GatedBlock(nn.Module):
    """RMSNorm (gain ``w``) -> gate/up -> ``silu(gate) * up`` -> down, plus a layer whose input
    (``tanh(x)``) no weight can absorb. A few norm channels and up rows are large: the
    activation channels weight-only rounding should protect."""

    def __init__(self, width: int = 64, ffn: int = 128):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.gain = nn.Parameter(torch.ones(width))
        self.gate, self.up, self.down = nn.Linear(width, ffn, bias=False), nn.Linear(width, ffn, bias=False), nn.Linear(ffn, width, bias=False)
        self.side = nn.Linear(width, width, bias=False)
        with torch.no_grad():
            for layer in (self.gate, self.up, self.down, self.side):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.1)
            self.gain[[3, 17, 40]] = 25.0
            self.up.weight[[5, 70, 99]] *= 20.0

    def forward(self, x):
        h = self.gain * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        return self.down(nn.functional.silu(self.gate(h)) * self.up(h)) + self.side(torch.tanh(x))


def test_awq_scales_are_mean_activation_powers_normalised_between_their_extremes():
    from graphopt.quant.smoothing import activation_scales

    s = activation_scales(torch.tensor([4.0, 1.0, 0.0, 16.0]), 0.5)
    assert s[2] == 1.0  # a channel that is always zero is not scaled
    live = s[[0, 1, 3]]
    assert torch.allclose(live / live[1], torch.tensor([2.0, 1.0, 4.0]))  # mean|x|^0.5
    assert torch.allclose(live.max() * live.min(), torch.tensor(1.0))


@pytest.mark.parametrize("alpha", [None, 0.5])
def test_weight_only_smoothing_folds_into_norm_gains_and_up_projections_exactly(alpha):
    model = _GatedBlock().eval()
    gen = torch.Generator().manual_seed(5)
    ctx = PassContext(calibration=tuple(((torch.randn(4, 24, 64, generator=gen),), {}) for _ in range(4)))
    held = [torch.randn(4, 24, 64, generator=gen) for _ in range(3)]
    program = graphopt.capture(model, args=(held[0],))
    result = Smooth(scheme="weight_only", bits=4, group_size=16, insert_mul=False, alpha=alpha)(program, ctx)
    assert result.modified, result.reason
    assert alpha is None or {g.alpha for g in result.info.groups} == {alpha}
    folds = {tuple(g.layers): g.fold for g in result.info.groups}
    assert folds == {("gate", "up"): "norm-gain", ("down",): "up-projection"}, result.info
    assert [g.layers for g in result.info.left] == [["side"]] and "insert_mul=false" in result.info.left[0].reason
    assert not [n for n in program.graph.nodes if n.meta.get("graphopt_created_by") == "smooth" and n.target is aten.mul.Tensor]
    with torch.no_grad():
        for x in held:
            got, want = program.run((x,), {})[0], model(x)
            assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_awq_then_int4_is_closer_to_fp32_than_int4_alone():
    """Weight-only 4-bit rounding loses most where activations are large; the activation-aware
    scales lower the error against fp32 on inputs they were not calibrated on."""
    model = _GatedBlock().eval()
    gen = torch.Generator().manual_seed(6)
    ctx = PassContext(calibration=tuple(((torch.randn(4, 24, 64, generator=gen),), {}) for _ in range(4)))
    held = [torch.randn(4, 24, 64, generator=gen) for _ in range(4)]
    quantize = "quantize{mode=weight_only,bits=4,group_size=16}"
    errors = {}
    for pipeline in (quantize, f"smooth{{scheme=weight_only,bits=4,group_size=16}},{quantize}"):
        program = graphopt.capture(model, args=(held[0],))
        result = graphopt.optimize(program, pipeline, context=ctx, budget={"min_cosine": 0.5})
        assert not result.report.failures, result.report.failures
        with torch.no_grad():
            errors[pipeline] = sum(float((result.program.run((x,), {})[0] - model(x)).pow(2).sum() / model(x).pow(2).sum()) for x in held)
    assert errors[f"smooth{{scheme=weight_only,bits=4,group_size=16}},{quantize}"] < 0.5 * errors[quantize], errors

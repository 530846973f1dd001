"""The prune pass: groups found in the graph, weights sliced, shape constants rewritten.

Numerical references are models built from smaller configs with the kept weights sliced
here by hand, so a wrong coupling (a head's rows cut from q but not from o, a kv head cut
without its query heads) shows up as a wrong number, not only as a shape error.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import nn

import graphopt
from graphopt import zoo
from graphopt.analysis import dependency_groups
from graphopt.context import PassContext, Services
from graphopt.passes.prune import Prune, PruneInfo

LAYERS = 2
HEAD_DIM = zoo.HIDDEN // zoo.HEADS


def _capture(arch: str, attn: str = "sdpa", **kwargs):
    model = zoo.tiny_model(arch, attn, layers=LAYERS)
    return model, graphopt.capture(model, kwargs=zoo.example_inputs(arch, **kwargs))


def _kept(info: PruneInfo, kind: str, path: str) -> list[int]:
    (group,) = [g for g in info.groups if g.kind == kind and g.module_path == path]
    return group.kept_indices


def _calibrated(batches) -> PassContext:
    return PassContext(calibration=tuple(batches), calibration_source="test batches")


def _rows(heads: list[int], dim: int = HEAD_DIM) -> torch.Tensor:
    return torch.tensor([h * dim + i for h in heads for i in range(dim)])


def _close(got, want, tol=1e-5):
    assert got.shape == want.shape
    assert (got - want).abs().max() <= tol * max(1.0, want.abs().max()), (got - want).abs().max()


# ---- contract -------------------------------------------------------------------------------
@pytest.mark.parametrize(("options", "reason"), [({}, "all ratios are 0"), ({"heads": 0.1, "ffn": 0.01}, "nothing to cut after rounding")],
                         ids=["zero", "rounds-to-nothing"])
def test_nothing_to_cut_is_unchanged_with_the_reason(options, reason):
    _, program = _capture("bert")
    fingerprint = program.fingerprint()
    result = Prune(**options)(program)
    assert not result.modified and result.status is graphopt.Status.UNCHANGED and result.reason == reason
    assert isinstance(result.info, PruneInfo)
    assert program.fingerprint() == fingerprint


def test_text_form_round_trips_and_is_lossy():
    from graphopt.pipeline import parse_pipeline

    (p,) = parse_pipeline("prune{heads=0.25,ffn=0.5,importance=taylor}").passes
    assert isinstance(p, Prune) and not p.exact
    assert str(p) == "prune{heads=0.25,ffn=0.5,importance=taylor}"
    with pytest.raises(graphopt.ConfigError):
        Prune(heads=1.0)


# ---- numerics against smaller configs -------------------------------------------------------
def test_bert_heads_and_ffn_equal_a_hand_sliced_smaller_bert():
    model, program = _capture("bert")
    result = Prune(heads=0.5, ffn=0.5, multiple=1, importance="l2")(program)
    assert result.modified and result.info.params_after < result.info.params_before

    small = tf.BertModel(tf.BertConfig(**{**model.config.to_dict(), "intermediate_size": zoo.FFN // 2}), add_pooling_layer=True).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, layer in enumerate(small.encoder.layer):
        heads = _kept(result.info, "heads", f"encoder.layer.{i}.attention")
        assert heads == _top_l2_heads(model.encoder.layer[i], 2)  # the importance, checked by hand
        channels = torch.tensor(_kept(result.info, "ffn", f"encoder.layer.{i}"))
        prefix = f"encoder.layer.{i}."
        rows = _rows(heads)
        attention = layer.attention
        attention.self.num_attention_heads, attention.self.all_head_size = len(heads), len(heads) * HEAD_DIM
        for name in ("query", "key", "value"):
            setattr(attention.self, name, nn.Linear(zoo.HIDDEN, len(rows)))
            state[f"{prefix}attention.self.{name}.weight"] = state[f"{prefix}attention.self.{name}.weight"][rows]
            state[f"{prefix}attention.self.{name}.bias"] = state[f"{prefix}attention.self.{name}.bias"][rows]
        attention.output.dense = nn.Linear(len(rows), zoo.HIDDEN)
        state[f"{prefix}attention.output.dense.weight"] = state[f"{prefix}attention.output.dense.weight"][:, rows]
        state[f"{prefix}intermediate.dense.weight"] = state[f"{prefix}intermediate.dense.weight"][channels]
        state[f"{prefix}intermediate.dense.bias"] = state[f"{prefix}intermediate.dense.bias"][channels]
        state[f"{prefix}output.dense.weight"] = state[f"{prefix}output.dense.weight"][:, channels]
    small.load_state_dict(state)

    for inputs in (zoo.example_inputs("bert"), zoo.example_inputs("bert", batch=3, seq=11, seed=1)):
        with torch.no_grad():
            want = small(**inputs)
        got = program(**inputs)
        _close(got["last_hidden_state"], want.last_hidden_state)
        _close(got["pooler_output"], want.pooler_output)


def _top_l2_heads(layer, keep: int) -> list[int]:
    attention = layer.attention
    power = torch.zeros(zoo.HEADS)
    for linear in (attention.self.query, attention.self.key, attention.self.value):
        rows = linear.weight.detach().pow(2).sum(1) + linear.bias.detach().pow(2)
        power += rows.view(zoo.HEADS, HEAD_DIM).sum(1)
    power += attention.output.dense.weight.detach().pow(2).sum(0).view(zoo.HEADS, HEAD_DIM).sum(1)
    return sorted(torch.argsort(power, descending=True)[:keep].tolist())


def _llama_state(model, info, *, q_heads, kv_heads, ffn, hidden=None) -> dict:
    """Slice a Llama state dict by hand: q heads, kv heads and FFN channels per layer, hidden."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(LAYERS):
        p = f"layers.{i}."
        q, kv = _rows(q_heads(i)), _rows(kv_heads(i))
        channels = torch.tensor(ffn(i)) if ffn else torch.arange(zoo.FFN)
        state[p + "self_attn.q_proj.weight"] = state[p + "self_attn.q_proj.weight"][q]
        state[p + "self_attn.k_proj.weight"] = state[p + "self_attn.k_proj.weight"][kv]
        state[p + "self_attn.v_proj.weight"] = state[p + "self_attn.v_proj.weight"][kv]
        state[p + "self_attn.o_proj.weight"] = state[p + "self_attn.o_proj.weight"][:, q]
        state[p + "mlp.gate_proj.weight"] = state[p + "mlp.gate_proj.weight"][channels]
        state[p + "mlp.up_proj.weight"] = state[p + "mlp.up_proj.weight"][channels]
        state[p + "mlp.down_proj.weight"] = state[p + "mlp.down_proj.weight"][:, channels]
    if hidden is not None:
        h = torch.tensor(hidden)
        for key, value in state.items():
            if key.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight", "embed_tokens.weight")):
                state[key] = value[:, h]
            elif key.endswith(("o_proj.weight", "down_proj.weight", "norm.weight")):
                state[key] = value[h]
    return state


def _small_llama(model, **overrides):
    config = tf.LlamaConfig(**{**model.config.to_dict(), "head_dim": HEAD_DIM, **overrides})
    return tf.AutoModel.from_config(config, attn_implementation="sdpa").eval()


def _assert_llama_equal(program, small):
    for inputs in (zoo.example_inputs("llama"), zoo.example_inputs("llama", batch=3, seq=9, seed=1)):
        with torch.no_grad():
            want = small(**inputs).last_hidden_state
        _close(program(**inputs)["last_hidden_state"], want)


def test_llama_kv_heads_take_their_query_heads_along():
    model, program = _capture("llama")
    result = Prune(kv_heads=0.5, ffn=0.5, multiple=1)(program)
    info = result.info
    kv = lambda i: _kept(info, "kv_heads", f"layers.{i}.self_attn")
    n_rep = zoo.HEADS // zoo.KV_HEADS
    small = _small_llama(model, num_attention_heads=2, num_key_value_heads=1, intermediate_size=zoo.FFN // 2)
    small.load_state_dict(_llama_state(
        model, info, kv_heads=kv, q_heads=lambda i: [k * n_rep + r for k in kv(i) for r in range(n_rep)],
        ffn=lambda i: _kept(info, "ffn", f"layers.{i}.mlp"),
    ))
    _assert_llama_equal(program, small)


def test_llama_query_heads_are_cut_alike_in_every_kv_group():
    model, program = _capture("llama")
    info = Prune(heads=0.5)(program).info
    slot = lambda i: _kept(info, "heads", f"layers.{i}.self_attn")
    n_rep = zoo.HEADS // zoo.KV_HEADS
    small = _small_llama(model, num_attention_heads=2, num_key_value_heads=2)
    small.load_state_dict(_llama_state(
        model, info, kv_heads=lambda i: list(range(zoo.KV_HEADS)),
        q_heads=lambda i: [k * n_rep + r for k in range(zoo.KV_HEADS) for r in slot(i)], ffn=None,
    ))
    _assert_llama_equal(program, small)


def test_llama_hidden_width_through_embeddings_norms_and_residual():
    model, program = _capture("llama")
    info = Prune(hidden=0.5, multiple=1, allow_output_change=True)(program).info
    hidden = _kept(info, "hidden", "")
    small = _small_llama(model, hidden_size=zoo.HIDDEN // 2)
    small.load_state_dict(_llama_state(
        model, info, kv_heads=lambda i: list(range(zoo.KV_HEADS)), q_heads=lambda i: list(range(zoo.HEADS)),
        ffn=None, hidden=hidden,
    ))
    _assert_llama_equal(program, small)


def test_hidden_width_needs_permission_to_change_the_output():
    _, program = _capture("llama")
    result = Prune(hidden=0.5)(program)
    assert not result.modified and result.info.kinds_without_groups == ["hidden"]
    assert "allow_output_change=true" in result.reason


# ---- importance ------------------------------------------------------------------------------
@pytest.mark.parametrize("criterion", ["l1", "l2", "taylor", "activation"])
def test_dead_units_go_first_and_cutting_them_is_exact(criterion):
    model = zoo.tiny_model("bert", "sdpa", layers=LAYERS)
    with torch.no_grad():
        for layer in model.encoder.layer:  # head 1 and FFN channels 0..31 contribute nothing
            rows = _rows([1])
            for linear in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
                linear.weight[rows] = 0
                linear.bias[rows] = 0
            layer.attention.output.dense.weight[:, rows] = 0
            layer.intermediate.dense.weight[:32] = 0
            layer.intermediate.dense.bias[:32] = 0  # GELU(0) = 0
            layer.output.dense.weight[:, :32] = 0
    program = graphopt.capture(model, kwargs=zoo.example_inputs("bert"))
    ctx = _calibrated([((), zoo.example_inputs("bert", seed=s)) for s in range(2)])
    before = program.run()
    result = Prune(heads=0.25, ffn=0.5, importance=criterion)(program, ctx)
    for i in range(LAYERS):
        assert 1 not in _kept(result.info, "heads", f"encoder.layer.{i}.attention")
        assert _kept(result.info, "ffn", f"encoder.layer.{i}") == list(range(32, 64))
    for got, want in zip(program.run(), before):
        _close(got, want)


def test_global_scope_moves_width_between_layers():
    model = zoo.tiny_model("bert", "sdpa", layers=LAYERS)
    with torch.no_grad():
        layer = model.encoder.layer[0]  # layer 0's channels matter less
        for tensor in (layer.intermediate.dense.weight, layer.intermediate.dense.bias, layer.output.dense.weight):
            tensor.mul_(0.1)
    program = graphopt.capture(model, kwargs=zoo.example_inputs("bert"))
    info = Prune(ffn=0.5, scope="global", importance="l2")(program).info
    widths = [_kept(info, "ffn", f"encoder.layer.{i}") for i in range(LAYERS)]
    assert len(widths[0]) < len(widths[1]) and len(widths[0]) >= 8
    assert all(len(w) % 8 == 0 for w in widths)


# ---- what is left alone ------------------------------------------------------------------------
class CumulativeFFN(nn.Module):
    """An FFN whose channels pass through an op with no channel rule (cumsum)."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)
        self.up2, self.down2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        x = x + self.down(torch.cumsum(self.up(x), dim=-1))
        return self.down2(torch.relu(self.up2(x)))


def test_groups_the_analysis_cannot_follow_are_left_alone_and_listed():
    program = graphopt.capture(CumulativeFFN().eval(), (torch.randn(2, 5, 16),))
    result = Prune(ffn=0.5)(program)
    assert result.modified
    assert program.module.up.weight.shape == (32, 16) and program.module.up2.weight.shape == (16, 16)
    listed = {entry.module_path: entry.reason for entry in result.info.not_prunable if "cumsum" in entry.reason}
    assert sorted(listed) == ["down", "up"]  # the channels before and after the cumsum


def test_groups_are_cached_and_dropped_on_change():
    _, program = _capture("bert")
    analysis = dependency_groups(program)
    assert dependency_groups(program) is analysis
    kinds = sorted(g.kind for g in analysis.prunable())
    assert kinds == ["ffn"] * LAYERS + ["heads"] * LAYERS
    Prune(heads=0.5)(program)
    assert dependency_groups(program) is not analysis


def test_latency_aware_widths_are_measured_and_never_below_the_plan():
    from graphopt.api import default_services  # ONNX Runtime's block timer

    _, program = _capture("bert")
    info = Prune(heads=0.5, ffn=0.5, latency_aware=True, latency_tokens=32)(program, PassContext(services=default_services())).info
    for group in info.groups:
        latency = group.latency_ms
        assert group.kept >= latency.planned_width
        assert str(group.kept) in latency.measured and str(group.size) in latency.measured
        if group.kept < group.size:  # a cut is only made when it was measured to pay
            assert latency.planned < latency.full
    summary = info.latency
    assert summary.provider == "cpu" and summary.predicted_chosen_ms > 0


class StepTimer:
    """A block timer whose kernels run in tiles of 16 units: widths inside a tile cost alike."""

    def __init__(self, provider, threads, tokens):
        self.asked = (provider, threads, tokens)
        self.calls = 0

    def ms(self, block, units):
        self.calls += 1
        return sum(other * per for other, per, _ in block) * -(-units // 16) * 1e-3


def test_latency_aware_keeps_the_units_a_tile_makes_free_with_any_timer_service():
    timers = []
    services = Services(block_timer=lambda *a: timers.append(StepTimer(*a)) or timers[-1])
    _, program = _capture("bert")
    info = Prune(ffn=0.6, multiple=4, latency_aware=True, latency_threads=2, latency_tokens=64)(program, PassContext(services=services)).info
    assert [t.asked for t in timers] == [("cpu", 2, 64)] and timers[0].calls > 0
    for group in info.groups:  # FFN 64 -> planned 24 (2 tiles): 32 costs the same, 36 a third tile
        assert (group.latency_ms.planned_width, group.kept) == (24, 32)
        assert group.latency_ms.planned == group.latency_ms.chosen < group.latency_ms.full


def test_latency_aware_without_a_timer_service_is_skipped_with_the_reason():
    _, program = _capture("bert")
    fingerprint = program.fingerprint()
    result = Prune(heads=0.5, latency_aware=True)(program)  # an empty context lends no timer
    assert result.status is graphopt.Status.SKIPPED and not result.modified
    assert "block timer" in result.reason and "ctx.services.block_timer" in result.reason
    assert program.fingerprint() == fingerprint


def test_in_a_pipeline_the_budget_decides():
    model = zoo.tiny_model("bert", "eager", layers=LAYERS)
    inputs = zoo.example_inputs("bert")
    loose = graphopt.optimize(model, "sdpa,prune{heads=0.5,ffn=0.5}", kwargs=inputs, budget=graphopt.Budget(min_cosine=0.5))
    assert [r.status for r in loose.report.passes] == ["applied", "applied"]
    strict = graphopt.optimize(model, "sdpa,prune{heads=0.5,ffn=0.5}", kwargs=inputs, budget=graphopt.Budget(min_cosine=0.999999))
    assert [r.status for r in strict.report.passes] == ["applied", "rolled-back"]
    assert loose.program.parameter_stats()["parameters"] < strict.program.parameter_stats()["parameters"]


def test_a_parameter_target_scales_the_ratios_to_meet_it():
    _, program = _capture("bert")
    before = program.parameter_stats()["parameters"]
    result = Prune(heads=0.25, ffn=0.5, target_params=0.8, multiple=1)(program)  # proportions heads : ffn = 1 : 2
    after = program.parameter_stats()["parameters"]
    target = result.info.target
    assert target.reachable and target.predicted_params == after
    assert 0.75 * before < after <= 0.8 * before
    assert target.ratios["ffn"] > target.ratios["heads"]


# ---- reconstruction ----------------------------------------------------------------------------
def _calibration(arch: str, seeds) -> list:
    return [((), zoo.example_inputs(arch, batch=8, seq=32, seed=s)) for s in seeds]


def _relative_error(program, references, batches) -> float:
    errors = [(program(**kw)["last_hidden_state"] - want).norm() / want.norm() for want, (_, kw) in zip(references, batches)]
    return float(sum(errors) / len(errors))


@pytest.mark.parametrize("arch, options", [
    ("bert", {"heads": 0.5, "ffn": 0.5}),
    ("llama", {"kv_heads": 0.5, "ffn": 0.5}),
    ("llama", {"heads": 0.5}),
], ids=["bert", "llama-kv-heads", "llama-heads"])
def test_reconstruction_brings_the_output_closer_on_calibration_and_heldout_inputs(arch, options):
    model = zoo.tiny_model(arch, "sdpa", layers=LAYERS)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calibration, heldout = _calibration(arch, range(4)), _calibration(arch, range(100, 102))
    errors, shapes = {}, {}
    for reconstruct in (False, True):
        program = graphopt.capture(model, kwargs=zoo.example_inputs(arch))
        references = {name: [program(**kw)["last_hidden_state"] for _, kw in batches]
                      for name, batches in (("calibration", calibration), ("heldout", heldout))}
        before = {name: (t, t.clone()) for name, t in program.tensors().items()}
        info = Prune(**options, importance="activation", reconstruct=reconstruct)(program, _calibrated(calibration)).info
        for name, (t, values) in before.items():  # new tensors replace the old ones, never written in place
            assert torch.equal(t, values), name
        errors[reconstruct] = {name: _relative_error(program, references[name], batches)
                               for name, batches in (("calibration", calibration), ("heldout", heldout))}
        shapes[reconstruct] = {name: t.shape for name, t in program.tensors().items()}
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert shapes[True] == shapes[False]
    for name in ("calibration", "heldout"):
        assert errors[True][name] < 0.9 * errors[False][name], errors
    assert info.reconstruction.data == "4 calibration batches (test batches)" and info.reconstruction.batches == 4
    assert info.calibration == info.reconstruction.data
    for group in info.groups:
        if group.kept < group.size:
            assert group.reconstructed and group.reconstruction_error < group.pruning_error


def test_reconstruction_is_exact_when_the_cut_channels_duplicate_kept_ones():
    model = zoo.tiny_model("bert", "sdpa", layers=LAYERS)
    half = zoo.FFN // 2
    with torch.no_grad():
        for layer in model.encoder.layer:  # channel j < half copies channel half + j, and is read less (l2 cuts it)
            layer.intermediate.dense.weight[:half] = layer.intermediate.dense.weight[half:]
            layer.intermediate.dense.bias[:half] = layer.intermediate.dense.bias[half:]
            layer.output.dense.weight[:, :half] *= 0.3
            layer.output.dense.weight[:, half:] *= 3
    calibration, heldout = _calibration("bert", range(4)), _calibration("bert", range(100, 102))
    for reconstruct in (False, True):
        program = graphopt.capture(model, kwargs=zoo.example_inputs("bert"))
        batches = calibration + heldout
        references = [program(**kw)["last_hidden_state"] for _, kw in batches]
        info = Prune(ffn=0.5, importance="l2", reconstruct=reconstruct, reconstruct_damp=1e-9)(program, _calibrated(calibration)).info
        for i in range(LAYERS):
            assert _kept(info, "ffn", f"encoder.layer.{i}") == list(range(half, zoo.FFN))
        error = max((program(**kw)["last_hidden_state"] - want).abs().max() for want, (_, kw) in zip(references, batches))
        if reconstruct:
            assert error < 1e-5
            assert all(g.reconstruction_error < 1e-6 < g.pruning_error for g in info.groups)
        else:
            assert error > 1e-3


def test_reconstruction_without_calibration_fits_on_the_example_inputs():
    _, program = _capture("bert", batch=4, seq=32)
    info = Prune(ffn=0.5, reconstruct=True)(program).info
    assert info.reconstruction.model_dump() == {"data": "the example inputs (the context has no calibration data)", "batches": 1, "damp": 0.01}
    assert all(g.reconstructed for g in info.groups)


# ---- calibration comes from the context ----------------------------------------------------------
class GatedFFN(nn.Module):
    """FFN channels 0..15 fire on inputs with x[0] > 0, channels 16..31 on x[0] < 0."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)
        with torch.no_grad():
            self.up.weight.zero_()
            self.up.bias.zero_()
            self.up.weight[:16, 0], self.up.weight[16:, 0] = 1.0, -1.0
            self.down.weight.fill_(0.1)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _signed_batches(sign: float) -> list:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        x = torch.randn(4, 8, generator=generator)
        x[:, 0] = sign * (1 + x[:, 0].abs())
        batches.append(((x,), {}))
    return batches


def test_activation_importance_is_calibrated_on_the_context_batches():
    kept = {}
    for sign in (1.0, -1.0):
        program = graphopt.capture(GatedFFN().eval(), (torch.randn(4, 8),))
        result = Prune(ffn=0.5, importance="activation")(program, _calibrated(_signed_batches(sign)))
        assert result.modified and result.info.calibration == "2 calibration batches (test batches)"
        (group,) = result.info.groups
        kept[sign] = group.kept_indices
    assert kept == {1.0: list(range(16)), -1.0: list(range(16, 32))}
    program = graphopt.capture(GatedFFN().eval(), (torch.randn(4, 8),))
    result = Prune(ffn=0.5, importance="activation", calibration_batches=1)(program, _calibrated(_signed_batches(-1.0) + _signed_batches(1.0)))
    assert result.info.calibration == "1 calibration batches (test batches)" and result.info.groups[0].kept_indices == list(range(16, 32))

"""The sdpa pass: eager attention → scaled_dot_product_attention, exact, on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import graphopt
from graphopt import zoo
from graphopt.passes.sdpa import AttentionToSDPA, SDPAInfo
from graphopt.program import flatten_outputs

LAYERS = 2
SDPA = "aten::scaled_dot_product_attention"
DYN = torch.export.Dim.DYNAMIC


def _relative_error(got, want) -> float:
    got, want = flatten_outputs(got), flatten_outputs(want)
    assert len(got) == len(want)
    return max(((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want))


def _ops(program) -> dict[str, int]:
    return {name.split(".")[0]: count for name, count in program.op_histogram().items()}


def _capture(model, inputs):
    # PlainAttention's inputs are not named like text inputs, so say which dims are dynamic.
    dynamic = {name: {0: DYN, 1: DYN} for name in inputs} if isinstance(model, zoo.PlainAttention) else "auto"
    return graphopt.capture(model, kwargs=inputs, dynamic_shapes=dynamic)


# ViT has no padding mask; HF text models build a mask even without one (all ones).
CASES = [(arch, padded) for arch in (*zoo.ARCHS, "plain") for padded in (True, False) if arch != "vit" or padded]


@pytest.mark.parametrize(("arch", "padded"), CASES, ids=[f"{a}-{'padded' if p else 'nomask'}" for a, p in CASES])
def test_eager_attention_becomes_sdpa(arch, padded):
    model = zoo.PlainAttention() if arch == "plain" else zoo.tiny_model(arch, "eager", layers=LAYERS)
    blocks = 1 if arch == "plain" else LAYERS
    program = _capture(model, zoo.example_inputs(arch, padded=padded))

    result = AttentionToSDPA()(program)

    assert result.modified and result.status == "applied" and result.info.replaced == blocks, result.info
    assert result.info.near_misses == [] and result.reason == ""
    ops = _ops(program)
    assert ops.get(SDPA) == blocks and "aten::softmax" not in ops
    created = [n for n in program.graph.nodes if n.meta.get("graphopt_created_by", "").startswith("sdpa:")]
    assert any(n.meta.get("graphopt_module_path", "") for n in created) or arch == "plain"
    assert _relative_error(program.run(), program.reference_outputs) < 1e-5
    # Captures are dynamic: another batch (and sequence length, where the model has one).
    other = zoo.example_inputs(arch, batch=3, seq=9, padded=padded)
    with torch.no_grad():
        assert _relative_error(program(**other), model(**other)) < 1e-5


@pytest.mark.parametrize("arch", ["bert", "distilbert", "gpt2", "llama", "vit"])
def test_sdpa_models_are_left_alone(arch):
    program = _capture(zoo.tiny_model(arch, "sdpa", layers=1), zoo.example_inputs(arch))
    code = program.module.code
    result = AttentionToSDPA()(program)
    assert not result.modified and result.status == "unchanged" and result.info == SDPAInfo(replaced=0, near_misses=[])
    assert "no softmax" in result.reason
    assert program.module.code == code


def test_graph_without_attention_is_left_alone():
    model = nn.Sequential(nn.Linear(8, 8), nn.Softmax(dim=-1), nn.Linear(8, 4)).eval()
    result = AttentionToSDPA()(graphopt.capture(model, (torch.randn(2, 8),)))
    assert not result.modified and result.status == "unchanged" and result.info.replaced == 0
    assert [m["check"] for m in result.info.near_misses] == ["rank"]  # the softmax is a candidate
    assert "near misses" in result.reason and "rank" in result.reason


def test_second_run_finds_nothing():
    program = _capture(zoo.tiny_model("gpt2", layers=1), zoo.example_inputs("gpt2"))
    assert AttentionToSDPA()(program).modified
    again = AttentionToSDPA()(program)
    assert not again.modified and again.status == "unchanged" and again.reason


class Variant(nn.Module):
    """One head-split attention block whose scores path is chosen by ``kind``."""

    def __init__(self, kind: str, heads: int = 2, hidden: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.kind, self.heads, self.head_dim = kind, heads, hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.eval()

    def forward(self, x, mask):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        kind, d = self.kind, self.head_dim
        if kind == "bmm_3d":
            q, k, v = (t.reshape(b * self.heads, s, d) for t in (q, k, v))
            return torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)) * d**-0.5, dim=-1), v)
        k_t = k.permute(0, 1, 3, 2) if kind == "permute_k" else k.transpose(-1, -2)
        scores = torch.matmul(q, k_t)
        if kind == "div_full":  # GPT-2 style: divide by a full([]) scalar tensor
            scores = scores / torch.full([], math.sqrt(d), dtype=scores.dtype)
        elif kind == "scale_left":
            scores = d**-0.5 * scores
        elif kind != "no_scale":
            scores = scores / math.sqrt(d)
        keep = mask[:, None, None, :]
        if kind in ("fill_min", "softmax_dim1", "weights_out", "div_full", "permute_k", "no_scale"):
            scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        elif kind == "where_keep":
            scores = torch.where(keep, scores, torch.finfo(scores.dtype).min)
        elif kind in ("scale_left", "fill_inf"):
            scores = scores.masked_fill(~keep, float("-inf"))
        weights = torch.softmax(scores, dim=1 if kind == "softmax_dim1" else -1)
        out = torch.matmul(weights.clone() if kind == "permute_k" else weights, v)
        return (out, weights) if kind == "weights_out" else out


def _variant_inputs(fully_masked_row: bool = False):
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[1, 5:] = False
    if fully_masked_row:
        mask[2] = False
    return {"x": torch.randn(3, 8, 16, generator=gen), "mask": mask}


@pytest.mark.parametrize("kind", ["bmm_3d", "permute_k", "div_full", "scale_left", "no_scale", "fill_min", "where_keep"])
def test_variants_are_rewritten_exactly(kind):
    # fill_min / where_keep with a fully-masked row: masked scores stay exactly finfo.min.
    inputs = _variant_inputs(fully_masked_row=kind in ("fill_min", "where_keep", "div_full"))
    program = graphopt.capture(Variant(kind), kwargs=inputs, dynamic_shapes=None)
    result = AttentionToSDPA()(program)
    assert result.modified and result.info.replaced == 1, result.info
    assert "aten::softmax" not in _ops(program)
    assert _relative_error(program.run(), program.reference_outputs) < 1e-5
    sdpa = next(n for n in program.graph.nodes if "scaled_dot_product" in str(n.target))
    expected_scale = 1.0 if kind == "no_scale" else 8**-0.5
    assert sdpa.kwargs["scale"] == pytest.approx(expected_scale, rel=1e-12)


def test_minus_inf_fill_on_a_fully_masked_row_gives_zero_instead_of_nan():
    # Capture refuses NaN references, so capture first and then mask a whole row.
    model = Variant("fill_inf")
    program = graphopt.capture(model, kwargs=_variant_inputs(), dynamic_shapes=None)
    assert AttentionToSDPA()(program).modified
    inputs = _variant_inputs(fully_masked_row=True)
    with torch.no_grad():
        got, want = program(**inputs), model(**inputs)
    assert torch.isnan(want[2]).all() and (got[2] == 0).all()
    assert _relative_error(got[:2], want[:2]) < 1e-5


@pytest.mark.parametrize(
    ("kind", "check", "words"),
    [("softmax_dim1", "softmax_dim", "dim 1"), ("weights_out", "single_user", "escapes")],
)
def test_non_matching_variants_report_the_failing_check(kind, check, words):
    program = graphopt.capture(Variant(kind), kwargs=_variant_inputs(), dynamic_shapes=None)
    code = program.module.code
    result = AttentionToSDPA(debug=True)(program)
    assert not result.modified and result.info.replaced == 0 and program.module.code == code
    (miss,) = result.info.near_misses
    assert check in result.reason
    assert miss["check"] == check and words in miss["reason"] and miss["rule"] == "eager_attention"
    assert miss["node"].startswith("softmax")


def test_hf_attention_weights_as_outputs_are_not_rewritten():
    model = zoo.tiny_model("bert", layers=1)
    model.config.output_attentions = True  # as a kwarg it would trip capture's auto dynamic shapes
    program = graphopt.capture(model, kwargs=zoo.example_inputs("bert"))
    assert len(program.reference_outputs) == 3  # hidden states, pooled output, attention weights
    result = AttentionToSDPA()(program)
    assert not result.modified and result.status == "unchanged"
    (miss,) = result.info.near_misses
    assert miss["check"] == "single_user" and miss["module_path"].startswith("encoder.layer.0")

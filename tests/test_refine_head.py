"""refine-head: a low-bit LM head whose k best logits per position come from int8 rows."""

from __future__ import annotations

import onnx
import pytest
import torch

import graphopt
from graphopt import zoo
from graphopt.decoder import capture_decoder, decoder_inputs, decoder_spec
from graphopt.export import check_parity, to_onnx
from graphopt.quant.schemes import quantize_embedding

K = 8
# the head alone at 4 bits in groups of 16, so that its rounding is all the test sees
HEAD_4BIT = 'quantize{mode=weight_only,bits=4,group_size=16,accuracy_level=0,include=["*lm_head"]}'


def _logits(program, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return program.module(**inputs)[program.output_names.index("logits")]


def _inputs(program, seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row
    return decoder_inputs(decoder_spec(program), ids, mask)


def _real(logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[positions, V]``: the logits of real tokens, padding left out (a prefill: the mask is the step's)."""
    return logits[inputs["attention_mask"].bool()]


def _chosen(logits: torch.Tensor, k: int = K) -> torch.Tensor:
    return torch.zeros_like(logits, dtype=torch.bool).scatter(-1, logits.topk(k, dim=-1).indices, True)


@pytest.fixture(scope="module")
def llama():
    return capture_decoder(zoo.tiny_causal_lm("llama"))


def test_the_op_rewrites_the_top_k_with_the_int8_rows():
    gen = torch.Generator().manual_seed(0)
    coarse, x, weight = torch.randn(3, 5, 40, generator=gen), torch.randn(3, 5, 16, generator=gen), torch.randn(40, 16, generator=gen)
    codes, scales = quantize_embedding(weight)
    out = torch.ops.graphopt.refine_topk_int8(coarse, x, codes, scales, 6)
    chosen = _chosen(coarse, 6)
    fine = x @ (codes.float() * scales).T
    assert torch.equal(out[~chosen], coarse[~chosen])
    torch.testing.assert_close(out[chosen], fine[chosen], rtol=1e-6, atol=1e-6)


def test_alone_it_moves_only_the_top_k_by_the_int8_rounding(llama):
    result = graphopt.optimize(llama, f"refine-head{{k={K}}}")
    record = result.report.passes[0]
    assert record.status == "applied" and record.info["k"] == K and record.info["vocab"] == 128 and record.info["module_path"].endswith("lm_head")
    inputs = _inputs(llama, 0)
    exact, refined = _logits(llama, inputs), _logits(result.program, inputs)
    chosen = _chosen(exact)
    assert torch.equal(refined[~chosen], exact[~chosen])
    moved = (refined - exact)[chosen].abs()
    assert 0 < float(moved.max()) <= 1e-2 * float(exact.abs().max())


def test_a_4bit_head_refined_picks_what_the_int8_rows_pick(llama):
    """At 4 bits the head flips argmaxes of the fp32 head; refined, it picks what the int8 rows
    pick at every position (those flip only near-ties of the tiny random model), and its fine
    logits do not depend on the coarse head's precision."""
    plain = graphopt.optimize(llama, HEAD_4BIT).program
    refined_alone = graphopt.optimize(llama, f"refine-head{{k={K}}}").program
    refined = graphopt.optimize(llama, f"refine-head{{k={K}}}, {HEAD_4BIT}").program
    agree = {"plain": 0, "refined": 0}
    for seed in range(4):
        inputs = _inputs(llama, seed)
        exact, coarse = _real(_logits(llama, inputs), inputs), _real(_logits(plain, inputs), inputs)
        ours, alone = _real(_logits(refined, inputs), inputs), _real(_logits(refined_alone, inputs), inputs)
        assert torch.equal(ours.argmax(-1), alone.argmax(-1))
        agree["plain"] += int((coarse.argmax(-1) == exact.argmax(-1)).sum())
        agree["refined"] += int((ours.argmax(-1) == exact.argmax(-1)).sum())
        # where both heads ranked a logit in their top k, both recomputed it from the same rows and h
        both = _chosen(coarse) & _chosen(exact)
        assert torch.equal(ours[both], alone[both])
    assert agree["plain"] + 8 <= agree["refined"], agree  # measured: 158 against 169 of 172 positions


def test_exports_to_topk_and_scatter_with_parity(llama, tmp_path):
    result = graphopt.optimize(llama, f"refine-head{{k={K}}}, {HEAD_4BIT}")
    path = tmp_path / "refined.onnx"
    to_onnx(result.program, path)
    report = check_parity(result.program, path, raise_on_failure=False)
    assert report.passed, report.summary()
    assert any(check.op == "refine_topk_int8" and check.observable for check in report.ops)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"TopK", "ScatterElements", "MatMulNBits"} <= ops


def test_a_tied_head_shares_its_int8_table_with_the_embedding():
    """GPT-2 ties its head to the token embedding: after quantize stores the embedding at 8 bits,
    dedup finds the refinement's table equal to it and keeps one."""
    program = capture_decoder(zoo.tiny_causal_lm("gpt2"))
    result = graphopt.optimize(program, f"refine-head{{k={K}}}, quantize{{mode=weight_only,bits=4,group_size=16,embeddings=true,embedding_bits=8}}, dedup")
    merged = result.report.passes[-1].info["merged"]
    pairs = {(a, b) for a, b in merged.items()} | {(b, a) for a, b in merged.items()}
    assert any("refine_" in a and a.endswith("_table") and b.startswith("quant_") and b.endswith("_table") for a, b in pairs), merged


def test_errors_and_refusals(llama):
    record = graphopt.optimize(llama, "refine-head{k=128}").report.passes[0]
    assert record.status == "rolled-back" and "k=128 must be smaller than the head's 128 outputs" in record.reason
    encoder = graphopt.capture(zoo.tiny_model("bert"), kwargs=zoo.example_inputs("bert"))
    record = graphopt.optimize(encoder, "refine-head?").report.passes[0]
    assert record.status == "skipped" and "no 'logits' output" in record.reason

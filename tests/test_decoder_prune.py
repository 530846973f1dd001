"""prune and share-layers on decoder programs (one KV-cache graph for prefill and decode).

References are smaller Hugging Face models loaded with the kept weights, sliced here by
hand from the reported indices, and checked with :func:`graphopt.decoder.check_decoder`
(prefill, a one- and a three-token decode step): a kv head cut without its query heads, or
a repeat_kv expand left at the old group size, is a wrong number. The exported ONNX
generates with the runtime, which allocates its cache from the DecoderSpec, against the
pruned program's own greedy run.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import transformers as tf

import graphopt
from graphopt import zoo
from graphopt.data import left_pad
from graphopt.decoder import capture_decoder, check_decoder, decoder_context, decoder_inputs, decoder_spec, decoder_steps, replay_steps
from graphopt.errors import CaptureError
from graphopt.export import make_session, to_onnx
from graphopt.export.generation import Generator
from graphopt.passes.prune import Prune, PruneInfo
from graphopt.passes.sdpa import AttentionToSDPA
from graphopt.surgery import get_tensor, set_tensor
from graphopt.verify import decoder_unread, drift_many, real_positions

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22]]  # different lengths: the second is left-padded
NEW_TOKENS = 16
HEAD_DIM = zoo.HIDDEN // zoo.HEADS
N_REP = zoo.HEADS // zoo.KV_HEADS


@pytest.fixture(scope="module")
def llama():
    model = zoo.tiny_causal_lm("llama", "sdpa")
    return model, capture_decoder(model)


def _greedy(program, prompts, new_tokens):
    """The program's own greedy generation, step by step on its own cache."""
    spec = decoder_spec(program)
    ids, mask = left_pad(prompts, 0)
    sequence, step, past, logits = ids, ids, None, []
    for _ in range(new_tokens):
        outputs = program.run((), decoder_inputs(spec, step, mask, past))
        logits.append(outputs[0][:, -1].numpy())
        step, past = outputs[0][:, -1].argmax(-1, keepdim=True), list(outputs[1:])
        sequence = torch.cat([sequence, step], 1)
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.long)], 1)
    return sequence.numpy(), logits


def _generates_like_the_program(program, path):
    ours = Generator(make_session(path, threads=1)).generate(PROMPTS, max_new_tokens=NEW_TOKENS, return_logits=True, eos_token_id=[], pad_token_id=0)
    sequences, logits = _greedy(program, PROMPTS, NEW_TOKENS)
    assert ours.sequences.shape == (2, 7 + NEW_TOKENS)
    np.testing.assert_array_equal(ours.sequences, sequences)
    assert max(float(np.abs(a - b).max()) for a, b in zip(ours.logits, logits)) <= 1e-4


def _cache_matches_spec(program):
    spec = decoder_spec(program)
    for label, kwargs in decoder_steps(spec, program):
        presents = program.run((), kwargs)[1:]
        total = kwargs["attention_mask"].shape[1]
        assert [tuple(p.shape) for p in presents] == [(2, spec.kv_heads, total, spec.head_dim)] * (2 * spec.layers), label


def _kept(info: PruneInfo | dict, kind: str, layer: int, default: list[int]) -> list[int]:
    groups = info["groups"] if isinstance(info, dict) else [g.model_dump() for g in info.groups]
    found = [g["kept_indices"] for g in groups if g["kind"] == kind and g["module_path"].startswith(f"model.model.layers.{layer}.")]
    assert len(found) <= 1
    return found[0] if found else default


def _rows(heads: list[int]) -> torch.Tensor:
    return torch.tensor([h * HEAD_DIM + i for h in heads for i in range(HEAD_DIM)])


def _sliced_model(model, info):
    """``model`` rebuilt at the pruned sizes with its weights sliced by hand from ``info``."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(model.config.num_hidden_layers):
        p = f"model.layers.{i}."
        kv = _kept(info, "kv_heads", i, list(range(zoo.KV_HEADS)))
        slots = _kept(info, "heads", i, list(range(N_REP)))  # query heads kept in every kv group
        ffn = torch.tensor(_kept(info, "ffn", i, list(range(zoo.FFN))))
        q = _rows([k * N_REP + r for k in kv for r in slots])
        for name, rows in (("q_proj", q), ("k_proj", _rows(kv)), ("v_proj", _rows(kv))):
            for suffix in ("weight", "bias"):
                if f"{p}self_attn.{name}.{suffix}" in state:
                    state[f"{p}self_attn.{name}.{suffix}"] = state[f"{p}self_attn.{name}.{suffix}"][rows]
        state[f"{p}self_attn.o_proj.weight"] = state[f"{p}self_attn.o_proj.weight"][:, q]
        for name in ("gate_proj", "up_proj"):
            state[f"{p}mlp.{name}.weight"] = state[f"{p}mlp.{name}.weight"][ffn]
        state[f"{p}mlp.down_proj.weight"] = state[f"{p}mlp.down_proj.weight"][:, ffn]
    config = type(model.config)(**{**model.config.to_dict(), "head_dim": HEAD_DIM, "num_attention_heads": len(kv) * len(slots),
                                   "num_key_value_heads": len(kv), "intermediate_size": len(ffn)})
    small = tf.AutoModelForCausalLM.from_config(config, attn_implementation=model.config._attn_implementation).eval()
    small.load_state_dict(state)
    return small


def test_ffn_and_query_heads_within_budget_generate_like_a_smaller_model(llama, tmp_path):
    model, program = llama
    result = graphopt.optimize(program, "prune{heads=0.5,ffn=0.5}", budget={"min_cosine": 0.8})
    (record,) = result.report.passes
    assert result.report.ok and record.status == "applied", record.reason
    assert result.report.final_drift is not None and 0.8 <= result.report.final_drift["cosine"] < 1.0
    assert sorted((g["kind"], g["kept"], g["size"]) for g in record.info["groups"]) == [("ffn", 32, 64)] * 2 + [("heads", 1, N_REP)] * 2
    assert decoder_spec(result.program).kv_heads == zoo.KV_HEADS  # query heads leave the cache alone
    _cache_matches_spec(result.program)
    check_decoder(result.program, _sliced_model(model, record.info))
    to_onnx(result.program, tmp_path / "model.onnx")
    _generates_like_the_program(result.program, tmp_path / "model.onnx")


@pytest.fixture(scope="module")
def kv_pruned(llama):
    """The llama with half its kv heads cut on the program directly (no verification data of the old cache)."""
    model, program = llama
    pruned = program.clone()
    result = Prune(kv_heads=0.5, allow_output_change=True)(pruned)
    return model, program, pruned, result


def test_kv_heads_take_their_query_heads_and_shrink_the_cache(kv_pruned, tmp_path):
    model, program, pruned, result = kv_pruned
    assert result.status == "applied" and result.info.cache_kv_heads == 1
    assert [(g.kind, g.kept) for g in result.info.groups] == [("kv_heads", 1)] * 2
    assert decoder_spec(pruned).kv_heads == 1 and decoder_spec(program).kv_heads == zoo.KV_HEADS
    assert all(v.shape[1] == 1 for k, v in pruned.kwargs.items() if k.startswith("past"))  # the example inputs follow
    _cache_matches_spec(pruned)
    check_decoder(pruned, _sliced_model(model, result.info))
    path = to_onnx(pruned, tmp_path / "model.onnx").path
    past = next(v for v in onnx.load(path, load_external_data=False).graph.input if v.name == "past_key_values.0.key")
    assert [d.dim_param or d.dim_value for d in past.type.tensor_type.shape.dim] == ["batch_size", 1, "past_sequence_length", HEAD_DIM]
    _generates_like_the_program(pruned, path)


def test_later_passes_are_verified_on_the_pruned_cache(kv_pruned):
    model, _, pruned, result = kv_pruned
    fused = graphopt.optimize(pruned, "gqa-attention")  # the manager's decoder steps now carry 1-kv-head caches
    (record,) = fused.report.passes
    assert fused.report.ok and record.status == "applied" and record.exact and record.info["fused"] == 2
    assert decoder_spec(fused.program).kv_heads == 1
    check_decoder(fused.program, _sliced_model(model, result.info))


def test_kv_heads_are_refused_without_permission(llama):
    _, program = llama
    result = Prune(kv_heads=0.5)(program.clone())
    assert result.status == "unchanged" and "kv heads are the KV cache's head axis" in result.reason
    assert "allow_output_change=true" in result.reason


def test_replayed_steps_are_the_runs_the_program_itself_builds(llama):
    _, program = llama
    spec = decoder_spec(program)
    steps = [((), kwargs) for _, kwargs in decoder_steps(spec, program, seed=3)]
    replayed = replay_steps(program, steps)
    assert len(replayed) == len(steps)
    for (_, want), (_, got) in zip(steps, replayed):
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    with pytest.raises(CaptureError, match="not the step before it's output"):
        replay_steps(program, steps[1:])  # a decode step without the prefill that built its cache


def test_kv_heads_under_the_manager_are_verified_on_their_own_cache(llama):
    model, program = llama
    spec = decoder_spec(program)
    pipeline = "prune{kv_heads=0.5,allow_output_change=true},gqa-attention,quantize{mode=static}"
    managed = graphopt.optimize(program, pipeline, budget={"min_cosine": 0.3})
    cut, fused, quantized = managed.report.passes
    assert managed.report.ok and {r.status for r in managed.report.passes} == {"applied"}, managed.report.failures
    assert "generation runs" in quantized.info["calibration"]  # calibrated on the replayed runs: the old caches do not fit
    assert decoder_spec(managed.program).kv_heads == 1 and decoder_spec(program).kv_heads == zoo.KV_HEADS
    # the same cut made directly: a smaller llama's numbers, and what the budget saw, the logits of its own
    # generation runs (the verification prompts, replayed on its cache) against the original's
    direct = Prune(kv_heads=0.5, allow_output_change=True)(program.clone())
    pruned = direct.program
    assert _kept(direct.info, "kv_heads", 0, []) == _kept(cut.info, "kv_heads", 0, []) and _kept(direct.info, "kv_heads", 1, []) == _kept(cut.info, "kv_heads", 1, [])
    check_decoder(pruned, _sliced_model(model, cut.info))
    ctx = decoder_context(program)
    ours = replay_steps(pruned, ctx.verification)
    reference = [program.run((), kwargs)[0] for _, kwargs in ctx.verification]
    got = [pruned.run((), kwargs)[0] for _, kwargs in ours]
    batches = [kwargs for _, kwargs in ctx.verification]
    want = drift_many([(r,) for r in reference], [(g,) for g in got], [real_positions(kw) for kw in batches],
                      [decoder_unread(kw, (r,)) for kw, r in zip(batches, reference)])
    assert 0.3 <= cut.drift_total["cosine"] < 0.9999
    assert abs(cut.drift_total["cosine"] - want.cosine) < 1e-6
    assert fused.exact and fused.drift_step["max_rel"] <= 1e-4  # gqa-attention is checked exactly, on the pruned cache
    tight = graphopt.optimize(program, "prune{kv_heads=0.5,allow_output_change=true}", budget={"min_cosine": 0.9999})
    (record,) = tight.report.passes
    assert record.status == "rolled-back" and "broke its tolerance" in record.reason
    assert decoder_spec(tight.program).kv_heads == spec.kv_heads


def test_every_layer_keeps_one_cache_layout(llama):
    _, program = llama
    lopsided = program.clone()
    for name in ("k_proj", "v_proj"):  # layer 1's kv heads outscore layer 0's: a global ranking cuts layer 0 only
        attr = f"model.model.layers.1.self_attn.{name}.weight"
        set_tensor(lopsided.module, attr, get_tensor(lopsided.module, attr) * 10)
    result = Prune(kv_heads=0.5, scope="global", allow_output_change=True)(lopsided)
    assert result.status == "skipped" and "layer 0: 1, layer 1: 2" in result.reason and "one layout" in result.reason
    assert decoder_spec(lopsided).kv_heads == zoo.KV_HEADS


def test_qwen2_eager_needs_sdpa_then_cuts_heads_kv_heads_and_ffn_with_biases():
    model = zoo.tiny_causal_lm("qwen2", "eager")
    program = capture_decoder(model)
    refused = Prune(heads=0.5)(program.clone())
    assert refused.status == "unchanged" and "run sdpa first" in refused.reason
    assert AttentionToSDPA()(program).status == "applied"
    result = Prune(heads=0.5, kv_heads=0.5, ffn=0.5, allow_output_change=True)(program)
    assert result.status == "applied" and decoder_spec(program).kv_heads == 1
    assert sorted({g.kind for g in result.info.groups}) == ["ffn", "heads", "kv_heads"]
    _cache_matches_spec(program)
    check_decoder(program, _sliced_model(model, result.info))


def test_share_layers_ties_weights_and_keeps_every_layers_cache(llama, tmp_path):
    _, program = llama
    twins = program.clone()
    for attr in list(twins.tensors()):  # layer 1 becomes a copy of layer 0
        if ".layers.1." in attr:
            set_tensor(twins.module, attr, get_tensor(twins.module, attr.replace(".layers.1.", ".layers.0.")).clone())
    exact = graphopt.optimize(twins, "share-layers")
    (record,) = exact.report.passes
    assert record.status == "applied" and record.exact and record.info["groups"] == [[0, 1]]
    assert len([n for n in exact.program.graph.nodes if n.op == "get_attr" and ".layers.1." in str(n.target)]) == 0
    assert exact.program.output_names == twins.output_names and len(exact.program.output_names) == 1 + 2 * 2
    _cache_matches_spec(exact.program)
    steps = decoder_steps(decoder_spec(twins), twins)
    for (_, kwargs) in steps:
        got, want = exact.program.run((), kwargs), twins.run((), kwargs)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        assert not torch.equal(got[1], got[3])  # one weight set, two caches: layer 1 reads layer 0's output
    lossy = graphopt.optimize(program, "share-layers{unique=1}", budget={"min_cosine": 0.8})
    (record,) = lossy.report.passes
    assert lossy.report.ok and record.status == "applied" and not record.exact and record.info["unique_layers"] == 1
    assert 0.8 <= lossy.report.final_drift["cosine"] < 1.0
    _cache_matches_spec(lossy.program)
    path = to_onnx(lossy.program, tmp_path / "model.onnx").path
    graph = onnx.load(path, load_external_data=False).graph
    assert [o.name for o in graph.output] == ["logits", *decoder_spec(program).present_names()]
    assert len([i for i in graph.initializer if "q_proj" in i.name]) == 1  # one stored copy for both layers
    _generates_like_the_program(lossy.program, path)

"""The build step and the command line for a causal LM: `graphopt optimize` on a model folder
keeps the LM head and the cache, writes a bundle that `graphopt generate` and
`graphopt.generate` run, and gates on next-token agreement and decode speed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import save_tiny_causal_lm

import graphopt
from graphopt.cli import EXIT_FAILED, EXIT_OK, main
from graphopt.errors import ExportError

FAST = ["--bench-repeat", "3", "--heldout", "16", "--calibration", "8", "--bench-seq", "16", "--quiet"]


def recipe(folder: Path, pipeline: str, gates: str = "") -> str:
    path = folder / "recipe.toml"
    path.write_text(f'pipeline = "{pipeline}"\n[runtime]\ndisabled_optimizers = []\n[gates]\n{gates}')
    return str(path)


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("lm") / "model")


@pytest.fixture(scope="module")
def bundle(causal_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    # an encoder's gate in the recipe (the presets carry one): not checked, and the report says so
    code = main(["optimize", "--model", str(causal_dir), "--recipe", recipe(out, "dce,dedup?", "min_heldout_cosine = 0.99"), "--out", str(out), *FAST])
    assert code == EXIT_OK
    return out


def test_build_keeps_the_head_and_writes_a_generation_bundle(bundle):
    report = json.loads((bundle / "report.json").read_text())
    decoder = report["sections"]["capture"]["decoder"]
    assert decoder["layers"] == 2 and decoder["vocab_size"] == 128
    rows = report["sections"]["comparison"]
    ours = rows["graphopt → ORT"]
    assert ours["heldout_agreement"] == 1.0 and abs(ours["heldout_ppl_ratio"] - 1.0) < 1e-4  # an exact recipe
    assert ours["decode_tokens_per_s"] > 0 and ours["prefill_ms"] > 0
    assert report["sections"]["parity"]["passed"]
    assert report["sections"]["gates"]["not applied"] == [
        "min_heldout_cosine = 0.99: held-out cosine of mean-pooled embeddings is an encoder's measure; a decoder is gated by min_token_agreement and max_perplexity_ratio"]
    assert "- not applied:\n  - min_heldout_cosine = 0.99: held-out cosine" in (bundle / "report.md").read_text()
    assert {"manifest.json", "model.onnx", "generation_config.json"} <= {p.name for p in bundle.iterdir()}
    assert (bundle / "tokenizer").is_dir()


def test_generate_from_python_and_cli_match_transformers(bundle, causal_dir, capsys):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(causal_dir).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    ours = graphopt.generate(bundle, input_ids=prompts, max_new_tokens=12, eos_token_id=[])
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 0, 10, 11]])
    mask = (ids != 0).long()
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(ours, expected.numpy())

    capsys.readouterr()
    assert main(["generate", "--bundle", str(bundle), "--ids", "5,6,7,8,9", "--ids", "10,11", "--max-new-tokens", "12", "--json"]) == EXIT_OK
    printed = json.loads(capsys.readouterr().out)
    # the CLI stops rows at the model's eos ([SEP]); up to there it is the same run
    got = np.array(printed["sequences"])
    assert got.shape[0] == 2 and printed["prompt_length"] == 5 and printed["decode_tokens_per_s"] > 0
    width = got.shape[1]
    stopped = expected.numpy()[:, :width]
    for row in range(2):
        eos = [i for i, t in enumerate(stopped[row, 5:]) if t == 3]
        end = 5 + (eos[0] + 1 if eos else width - 5)
        np.testing.assert_array_equal(got[row, :end], stopped[row, :end])

    text = graphopt.generate(bundle, prompt="the value of a list", max_new_tokens=4)
    assert text.shape[0] == 1 and text.shape[1] >= 5
    assert main(["generate", "--bundle", str(bundle), "--prompt", "the value of", "--max-new-tokens", "4"]) == EXIT_OK
    assert capsys.readouterr().out.startswith("the value of")


def test_a_tampered_bundle_is_refused(bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"x")
    with pytest.raises(ExportError, match="does not match its manifest"):
        graphopt.generate(copy, input_ids=[[5, 6]], max_new_tokens=2)


def test_missed_agreement_gate_fails_the_build(causal_dir, tmp_path, capsys):
    """int4 weights on a random tiny model change most next tokens: the gate catches it."""
    path = recipe(tmp_path, "quantize{mode=weight_only,bits=4}", "min_token_agreement = 0.99\nmax_perplexity_ratio = 1.5")
    code = main(["optimize", "--model", str(causal_dir), "--recipe", path, "--out", str(tmp_path / "out"), *FAST, "--no-baseline"])
    assert code == EXIT_FAILED
    assert "min_token_agreement: held-out next-token agreement" in capsys.readouterr().err


def test_gates_of_the_other_kind_of_model_are_listed_as_not_applied():
    from graphopt.build import gates_not_applied
    from graphopt.recipe import Recipe

    recipe = Recipe.model_validate({"pipeline": "dce", "gates": {"min_token_agreement": 0.97, "min_heldout_cosine": 0.99}})
    assert [g.split(":")[0] for g in gates_not_applied(recipe, is_decoder=False)] == ["min_token_agreement = 0.97"]
    assert [g.split(":")[0] for g in gates_not_applied(recipe, is_decoder=True)] == ["min_heldout_cosine = 0.99"]
    assert gates_not_applied(Recipe.model_validate({"pipeline": "dce"}), is_decoder=True) == []


def test_onnxruntime_genai_runs_the_bundle(bundle):
    """The bundle's genai_config.json lets onnxruntime-genai load graphopt's export and
    generate the same greedy tokens as graphopt's runtime."""
    og = pytest.importorskip("onnxruntime_genai")
    config = json.loads((bundle / "genai_config.json").read_text())
    assert config["model"]["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"
    model = og.Model(str(bundle))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=5 + 16, min_length=5 + 16, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens([[5, 6, 7, 8, 9]])
    theirs = []
    while not generator.is_done():
        generator.generate_next_token()
        theirs.append(int(generator.get_next_tokens()[0]))
    ours = graphopt.generate(bundle, input_ids=[[5, 6, 7, 8, 9]], max_new_tokens=16, eos_token_id=[])[0, 5:].tolist()
    assert theirs == ours


def test_a_windowed_bundle_leaves_the_window_to_graphopt_runtime(causal_dir, tmp_path):
    """window-attention on GroupQueryAttention: the export hands the window to graphopt's runtime
    (one shared buffer), so the bundle carries no genai_config.json (onnxruntime-genai would
    attend over the whole cache) and says why; it generates past the window with a capped cache."""
    out = tmp_path / "out"
    pipeline = "sdpa, gqa-attention, window-attention{sinks=2,window=160}"  # longer than the verification texts
    assert main(["optimize", "--model", str(causal_dir), "--recipe", recipe(tmp_path, pipeline), "--out", str(out), *FAST, "--no-baseline"]) == EXIT_OK
    export = json.loads((out / "report.json").read_text())["sections"]["export"]
    assert export["kv_buffer"] == "shared; the runtime applies the cache window (2, 160)"
    assert export["genai_config"] == "not written: onnxruntime-genai would not apply the cache window (2, 160)"
    assert not (out / "genai_config.json").exists()
    result = graphopt.generate(out, input_ids=[[5, 6, 7, 8, 9]], max_new_tokens=300, eos_token_id=[], return_result=True)
    assert result.new_tokens.shape == (1, 300) and max(result.cache_lengths) == 162  # past the model's 256 positions
    assert result.buffer_slots == 2 + 160 + 64  # sinks + window + the runtime's slack, not 5 + 300

"""The `graphopt` command line as a build step: files, reports, exit codes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from factories import save_tiny_text_model

import graphopt.errors
from graphopt import data
from graphopt.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main

FAST = ["--bench-repeat", "3", "--heldout", "0", "--no-baseline", "--quiet"]
# The default recipe's passes, optional where a tiny model may give them nothing to do.
EXACT = "dce,dedup?,sdpa,fused-attention?,bias-gelu?,dce?"


def fast_recipe(folder: Path, pipeline: str, extra: str = "") -> str:
    """A recipe without the ORT session tuning (it times sessions: slow on a shared machine)."""
    path = folder / "fast.toml"
    path.write_text(f'pipeline = "{pipeline}"\n[runtime]\ndisabled_optimizers = []\n{extra}')
    return str(path)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> Path:
    return save_tiny_text_model(tmp_path_factory.mktemp("text") / "model")


@pytest.fixture(scope="module")
def user_data(tmp_path_factory) -> Path:
    """600 real sentences as a user's JSONL file with the text under "body"."""
    path = tmp_path_factory.mktemp("data") / "reviews.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "body": t}) for i, t in enumerate(data.corpus("topics")[:600])))
    return path


def test_optimize_tiny_model_writes_model_and_reports(tmp_path, capsys):
    code = main(["optimize", "--model", "factories:tiny_bert", "--pipeline", EXACT, "--out", str(tmp_path), "--print-after-change", *FAST])
    assert code == EXIT_OK, capsys.readouterr().err
    for name in ("model.onnx", "report.json", "report.md", "manifest.json"):
        assert (tmp_path / name).is_file()
    from graphopt.bundle import verify_manifest

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert {"model.onnx", "report.json", "report.md"} <= set(manifest["files"])
    assert not any(f.startswith("ir/") for f in manifest["files"])  # IR dumps are not part of the bundle
    assert manifest["versions"]["torch"].startswith("2.13") and manifest["tuned_for"]["provider"] == "cpu"
    assert manifest["recipe"]["pipeline"] == EXACT
    assert manifest["target"]["provider"] == "cpu" and manifest["target"]["threads"] >= 1 and manifest["target"]["isa"]
    assert manifest["data"]["source"].startswith("seeded random inputs")  # no tokenizer: random inputs over the dynamic shapes
    assert verify_manifest(tmp_path) == []
    report = json.loads((tmp_path / "report.json").read_text())
    tuning = report["sections"]["session"]  # recipe default "auto": measured on the built model
    assert set(tuning["tuning"]) == {"SkipLayerNormFusion"}
    assert manifest["session"]["disabled_optimizers"] == tuning["disabled_optimizers"]
    assert manifest["session"]["graph_optimization"] == "all"
    assert report["sections"]["target"] == manifest["target"] and report["sections"]["capture"]["ir"] == "aten"
    assert "seeded random batches" in report["verification"]["source"]
    assert sorted(p.name for p in (tmp_path / "ir").iterdir())  # --print-after-change without DIR: <out>/ir
    from graphopt.bundle import open_session

    session = open_session(tmp_path)
    assert {i.name for i in session.get_inputs()} >= {"input_ids"}
    (tmp_path / "model.onnx").write_bytes(b"tampered")
    assert verify_manifest(tmp_path) == ["model.onnx: changed"]
    with pytest.raises(graphopt.errors.ExportError, match="does not match its manifest"):
        open_session(tmp_path)
    assert [p["name"] for p in report["passes"]] == ["dce", "dedup", "sdpa", "fused-attention", "bias-gelu", "dce"]
    assert report["ok"] is True and report["sections"]["parity"]["passed"] is True
    sdpa = report["passes"][2]
    assert sdpa["status"] == "applied" and sdpa["info"]["replaced"] == 2
    assert "graphopt → ORT" in capsys.readouterr().out


def test_missed_gate_exits_1_and_says_which(tmp_path, capsys):
    recipe = tmp_path / "strict.toml"
    recipe.write_text('pipeline = "dce"\n[gates]\nmin_speedup = 1e9\nmax_size_mb = 0.001\n')
    code = main(["optimize", "--model", "factories:tiny_bert", "--recipe", str(recipe), "--out", str(tmp_path / "o"), *FAST])
    assert code == EXIT_FAILED
    err = capsys.readouterr().err
    assert "FAILED: gate: min_speedup: ORT speed-up over PyTorch eager fp32" in err
    assert "max_size_mb" in err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["ok"] is False and report["sections"]["gates"]["passed"] is False


def test_unknown_pass_exits_2_listing_passes(tmp_path, capsys):
    code = main(["optimize", "--model", "factories:tiny_bert", "--pipeline", "dce,fuse-everything", "--out", str(tmp_path), *FAST])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "unknown pass 'fuse-everything'" in err and "dedup" in err and "sdpa" in err
    assert not (tmp_path / "model.onnx").exists()  # failed before anything ran


def test_wrong_recipe_key_exits_2_naming_it(tmp_path, capsys):
    recipe = tmp_path / "typo.toml"
    recipe.write_text('pipeline = "dce"\n[gates]\nmin_heldout_cosin = 0.99\n')
    code = main(["optimize", "--model", "factories:tiny_bert", "--recipe", str(recipe), "--out", str(tmp_path / "o"), *FAST])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "gates.min_heldout_cosin" in err and "min_heldout_cosine" in err


def test_missing_model_exits_2(tmp_path, capsys):
    code = main(["optimize", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), *FAST])
    assert code == EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err


def test_passes_lists_every_pass_with_summary_exactness_and_options(capsys):
    assert main(["passes", "--json"]) == EXIT_OK
    described = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert {"dce", "dedup", "sdpa"} <= set(described)
    assert described["dedup"]["options"]["min_numel"]["default"] == 1
    assert described["dce"]["exact"] is True and described["dce"]["exactness"] == "exact" and described["dce"]["doc"]
    assert described["quantize"]["exactness"].startswith("lossy")
    assert main(["passes"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "dce  (exact)\n    Remove unused nodes" in out and "    min_numel: int = 1" in out


def test_passes_says_exact_for_some_options():
    from typing import ClassVar

    from graphopt import Pass, PassConfig, register_pass
    from graphopt.cli import exactness
    from graphopt.passbase import unregister_pass

    class SometimesConfig(PassConfig):
        lossless: bool = False

    @register_pass
    class Sometimes(Pass):
        """Exact only with lossless=true."""

        name: ClassVar[str] = "test-cli-sometimes"
        Config: ClassVar[type[PassConfig]] = SometimesConfig

        @classmethod
        def is_exact(cls, config):
            return config.lossless

    try:
        assert exactness(Sometimes) == "lossy (exact for some options)"
    finally:
        unregister_pass("test-cli-sometimes")


def test_inspect_finds_attention_blocks(capsys):
    assert main(["inspect", "--model", "factories:tiny_gpt2", "--json"]) == EXIT_OK
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["attention"]) == 2
    assert all("eager (fusable" in block["kind"] for block in summary["attention"])
    assert summary["parameters"] > 0
    assert {"aten::linear", "aten::addmm"} & set(summary["ops"])  # GPT-2's Conv1D is addmm


def test_console_script_is_installed():
    bin_dir = Path(sys.executable).parent
    out = subprocess.run([str(bin_dir / "graphopt"), "recipes"], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "default" in out.stdout and "lossless" in out.stdout


@pytest.mark.parametrize("arch", ["bert", "vit"])
def test_optimize_a_hugging_face_directory(tmp_path, arch, capsys):
    from graphopt import zoo

    model_dir = tmp_path / arch
    zoo.tiny_model(arch).save_pretrained(model_dir)  # weights + config, no tokenizer
    out = tmp_path / "out"
    assert main(["optimize", "--model", str(model_dir), "--pipeline", EXACT, "--out", str(out), *FAST]) == EXIT_OK
    assert "has no tokenizer files" in capsys.readouterr().out  # said in the build output (the report), --quiet or not
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == arch and "seeded random inputs" in report["sections"]["data"]["notes"][0]
    sdpa = next(p for p in report["passes"] if p["name"] == "sdpa")
    assert sdpa["info"]["replaced"] == 2  # loaded with eager attention, fused by the pass
    assert report["sections"]["parity"]["passed"]


def test_search_keeps_the_best_candidate_meeting_the_gate(tmp_path, capsys):
    plain = tmp_path / "plain.toml"
    plain.write_text('name = "plain"\npipeline = "dce"\n')
    exact = tmp_path / "exact.toml"
    exact.write_text(f'name = "exact"\npipeline = "{EXACT}"\n')
    out = tmp_path / "out"
    args = ["optimize", "--model", "factories:tiny_bert", "--out", str(out), "--candidates", f"{exact},{plain}", *FAST]
    assert main([*args, "--max-latency-ms", "1e6"]) == EXIT_OK
    found = json.loads((out / "search.json").read_text())
    assert [c["name"] for c in found["candidates"]] == ["exact", "plain"]
    assert all(c["meets_gate"] and c["p50_ms"] > 0 for c in found["candidates"]), found
    assert found["winner"] in ("exact", "plain")
    assert any(c["pareto"] for c in found["candidates"])
    assert (out / "model.onnx").is_file() and (out / "manifest.json").is_file()
    assert "(chosen)" in capsys.readouterr().out

    one = ["optimize", "--model", "factories:tiny_bert", "--out", str(tmp_path / "none"), "--candidates", str(plain), *FAST]
    assert main([*one, "--max-latency-ms", "1e-9"]) == EXIT_FAILED
    assert "no candidate recipe meets the gate" in capsys.readouterr().err


def test_search_disqualifies_a_candidate_whose_requested_pass_changed_nothing(tmp_path, capsys):
    recipe = tmp_path / "nothing.toml"
    recipe.write_text('name = "nothing"\npipeline = "dce,dedup{min_numel=1000000000}"\n[runtime]\ndisabled_optimizers = []\n')
    out = tmp_path / "out"
    assert main(["optimize", "--model", "factories:tiny_bert", "--out", str(out), "--candidates", str(recipe), "--max-latency-ms", "1e6", *FAST]) == EXIT_FAILED
    (candidate,) = json.loads((out / "search.json").read_text())["candidates"]
    assert not candidate["ok"] and "pass 'dedup{min_numel=1000000000}' was requested but" in candidate["note"]


def test_fidelity_search_needs_a_text_model(tmp_path, capsys):
    code = main(["optimize", "--model", "factories:tiny_bert", "--out", str(tmp_path), "--min-fidelity", "0.99", "--no-baseline", "--quiet"])
    assert code == EXIT_USAGE
    assert "held-out sentences" in capsys.readouterr().err


def test_command_line_overrides_reach_the_build(tmp_path, capsys):
    from graphopt.cli import _build_options, _parser, _recipe
    from graphopt.recipe import Recipe

    args = _parser().parse_args(["optimize", "--model", "minilm", "--out", str(tmp_path), "--calibration", "512", "--print-after-change", str(tmp_path / "dumps")])
    assert _build_options(args).calibration == 512 and _build_options(args).print_after_change == str(tmp_path / "dumps")
    default = _parser().parse_args(["optimize", "--model", "minilm", "--out", str(tmp_path)])
    assert _build_options(default).calibration is None and _build_options(default).heldout is None  # the recipe's [data] counts
    assert _build_options(default).print_after_change is None
    recipe = _recipe(_parser().parse_args(["optimize", "--model", "m", "--out", "o", "--data", "mine.csv", "--data-column", "review"]), Recipe.load("default"))
    assert (recipe.data.source, recipe.data.field) == ("mine.csv", "review")
    assert _recipe(default, Recipe.load("default")).data.source == "stdlib"
    with pytest.raises(SystemExit):
        main(["optimize", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--data-column" in help_text and "save_to_disk" in help_text and "<out>/ir" in help_text


# ---- the user's data --------------------------------------------------------------------------
def test_optimize_on_the_users_data(tmp_path, text_model, user_data, capsys):
    out = tmp_path / "out"
    recipe = fast_recipe(tmp_path, EXACT, "[data]\nheldout = 40\nverification = 32\n")
    code = main(["optimize", "--model", str(text_model), "--recipe", recipe, "--data", str(user_data), "--data-column", "body",
                 "--out", str(out), "--bench-repeat", "3", "--no-baseline"])
    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.err
    report = json.loads((out / "report.json").read_text())
    section = report["sections"]["data"]
    assert section["source"] == str(user_data) and section["description"] == f"data file {user_data} (field 'body')"
    assert section["counts"]["verification"] == 32 and section["counts"]["heldout"] == 40
    assert f"32 verification texts of data file {user_data}" in report["verification"]["source"]
    assert report["verification"]["samples"] == 32
    ours = report["sections"]["comparison"]["graphopt → ORT"]
    assert ours["heldout_n"] == 40 and ours["heldout_mean_cos"] > 0.9999  # an exact pipeline, gated on the user's held-out texts
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["counts"] == section["counts"] and manifest["data"]["source"] == str(user_data)
    assert (out / "tokenizer" / "tokenizer_config.json").is_file()
    assert f"data file {user_data}" in captured.err  # the build says what it calibrates and verifies on


def test_data_too_small_exits_2_naming_file_and_counts(tmp_path, text_model, capsys):
    few = tmp_path / "few.txt"
    few.write_text("\n".join(data.corpus("topics")[:100]))
    code = main(["optimize", "--model", str(text_model), "--data", str(few), "--out", str(tmp_path / "o"), *FAST])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"data file {few} (one text per line): 100 distinct texts split into" in err and "at least 32 verification" in err


def test_data_for_a_model_without_tokenizer_exits_2(tmp_path, user_data, capsys):
    code = main(["optimize", "--model", "factories:tiny_bert", "--data", str(user_data), "--out", str(tmp_path), *FAST])
    assert code == EXIT_USAGE
    assert "has no tokenizer to read it with" in capsys.readouterr().err


# ---- requested compression that did not happen: exit 1 -------------------------------------------
def test_quantize_that_matches_nothing_fails_the_build(tmp_path, capsys):
    code = main(["optimize", "--model", "factories:conv_net", "--recipe", fast_recipe(tmp_path, "quantize"), "--out", str(tmp_path / "o"), *FAST])
    assert code == EXIT_FAILED
    err = capsys.readouterr().err
    assert "FAILED: pass 'quantize' was requested but" in err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["ok"] is False and report["passes"][0]["status"] in ("unchanged", "skipped")


def test_capture_fallback_fails_a_build_whose_passes_need_aten(tmp_path, capsys):
    with pytest.warns(UserWarning, match="fell back to torch.fx.symbolic_trace"):
        code = main(["optimize", "--model", "factories:numpy_net", "--recipe", fast_recipe(tmp_path, "dce?,sdpa?"), "--out", str(tmp_path / "o"), *FAST])
    assert code == EXIT_FAILED
    err = capsys.readouterr().err
    assert "FAILED: capture fell back to torch.fx.symbolic_trace" in err and "cannot run: sdpa?" in err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["sections"]["capture"]["ir"] == "fx" and "numpy" in report["sections"]["capture"]["fallback"]
    assert not (tmp_path / "o" / "model.onnx").exists()  # nothing is exported from a build that already failed


def test_tokenizer_that_fails_to_load_exits_2(tmp_path, capsys):
    model_dir = save_tiny_text_model(tmp_path / "broken", tokenizer="broken")
    code = main(["optimize", "--model", str(model_dir), "--out", str(tmp_path / "o"), *FAST])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "the tokenizer in" in err and "tokenizer.json" in err and "failed to load" in err


# ---- search on a text model: chooses on one half, quotes the other ------------------------------
def test_search_chooses_on_one_half_of_the_heldout_texts_and_quotes_the_other(tmp_path, text_model, capsys):
    recipe = fast_recipe(tmp_path, "dce")
    out = tmp_path / "out"
    code = main(["optimize", "--model", str(text_model), "--out", str(out), "--candidates", recipe, "--min-fidelity", "0.9",
                 "--heldout", "24", "--bench-repeat", "3", "--no-baseline", "--quiet"])
    assert code == EXIT_OK, capsys.readouterr().err
    found = json.loads((out / "search.json").read_text())
    assert found["selection_texts"] == 12 and found["report_texts"] == 12
    (candidate,) = found["candidates"]
    assert candidate["selection_mean_cos"] > 0.9999 and candidate["heldout_mean_cos"] > 0.9999
    row = json.loads((out / "manifest.json").read_text())["figures"]["graphopt → ORT"]
    assert row["selection_n"] == 12 and row["heldout_n"] == 12  # the promoted bundle shows both figures
    assert "selection-half mean cos" in (out / "search.md").read_text()


# ---- repro ----------------------------------------------------------------------------------------
def test_repro_reruns_a_crash_and_exits_1(tmp_path, capsys):
    import factories  # noqa: F401 - registers test-factories-crash

    import graphopt
    from graphopt import zoo

    program = graphopt.capture(zoo.tiny_model("bert"), kwargs=zoo.example_inputs("bert"))
    result = graphopt.optimize(program, "test-factories-crash?", reproducer_dir=tmp_path)
    folder = result.report.passes[0].reproducer
    assert folder and Path(folder).is_dir()
    assert main(["repro", folder]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "RuntimeError: boom in test-factories-crash" in err and "failed again" in err


# ---- parity on the deployed session (the interface OptimizeResult.check_parity provides) ----------
def test_build_checks_parity_on_the_deployed_session_settings(tmp_path, monkeypatch):
    from graphopt.api import OptimizeResult
    from graphopt.build import BuildOptions, build, evaluate_gates, export_and_check
    from graphopt.errors import ParityError
    from graphopt.models import load_model
    from graphopt.recipe import Recipe

    calls = []

    def check_parity(self, *, session, original):
        calls.append({"session": session, "original": original, "measured": self.report.sections.get("session"), "parity": self.report.sections.get("parity")})
        self.report.sections["parity"] = {"passed": True, "session": session}

    monkeypatch.setattr(OptimizeResult, "check_parity", check_parity, raising=False)
    recipe = Recipe.load(fast_recipe(tmp_path, "dce"))
    callers_threads = torch.get_num_threads()
    options = BuildOptions(out_dir=tmp_path / "o", bench_repeat=3, heldout=0, baseline_onnx=False, progress=False, threads=callers_threads + 1)
    outcome = build(load_model("factories:tiny_bert"), recipe, options, say=lambda _m: None)
    assert outcome.ok, outcome.result.report.failures
    # the build ran on its own threads and gave the caller's back (a build that kept them
    # oversubscribed every later test of its pytest worker: 8x slower int8 rebuilds)
    assert torch.get_num_threads() == callers_threads
    (call,) = calls
    threads = outcome.result.report.sections["target"]["threads"]
    assert threads == callers_threads + 1
    assert call["session"] == {"provider": "cpu", "threads": threads, "graph_optimization": "all", "disabled_optimizers": []}
    assert call["measured"]["disabled_optimizers"] == [] and call["parity"] is None  # settings first; export checked no parity itself
    assert call["original"].ir == "aten" and call["original"] is not outcome.result.program
    assert call["original"].node_count() > outcome.result.program.node_count()  # the captured program, before dce

    def failing(self, *, session, original):
        self.report.sections["parity"] = {"passed": False, "error": "1e-2 off"}
        raise ParityError("1e-2 off")

    monkeypatch.setattr(OptimizeResult, "check_parity", failing, raising=False)
    said = []
    export_and_check(outcome.result, call["original"], tmp_path / "again" / "model.onnx", {}, threads, said.append)
    assert said == ["  parity failed: 1e-2 off"]
    assert "ORT parity failed (see parity section)" in evaluate_gates(recipe, outcome.result, outcome.rows)

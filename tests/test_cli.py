"""The `graphopt` command line as a build step: files, reports, exit codes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import graphopt.errors

from graphopt.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main

FAST = ["--bench-repeat", "3", "--heldout", "0", "--no-baseline", "--quiet"]


def test_optimize_tiny_model_writes_model_and_reports(tmp_path, capsys):
    code = main(["optimize", "--model", "factories:tiny_bert", "--out", str(tmp_path), *FAST])
    assert code == EXIT_OK
    for name in ("model.onnx", "report.json", "report.md", "manifest.json"):
        assert (tmp_path / name).is_file()
    from graphopt.bundle import verify_manifest

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert {"model.onnx", "report.json", "report.md"} <= set(manifest["files"])
    assert manifest["versions"]["torch"].startswith("2.13") and manifest["tuned_for"]["provider"] == "cpu"
    assert manifest["recipe"]["pipeline"] == "dce,dedup,sdpa,fused-attention,bias-gelu,dce"
    assert verify_manifest(tmp_path) == []
    report = json.loads((tmp_path / "report.json").read_text())
    tuning = report["sections"]["session"]  # recipe default "auto": measured on the built model
    assert set(tuning["tuning"]) == {"SkipLayerNormFusion"}
    assert manifest["session"]["disabled_optimizers"] == tuning["disabled_optimizers"]
    from graphopt.bundle import open_session

    session = open_session(tmp_path)
    assert {i.name for i in session.get_inputs()} >= {"input_ids"}
    (tmp_path / "model.onnx").write_bytes(b"tampered")
    assert verify_manifest(tmp_path) == ["model.onnx: changed"]
    with pytest.raises(graphopt.errors.ExportError, match="does not match its manifest"):
        open_session(tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
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


def test_passes_lists_every_pass_with_options(capsys):
    assert main(["passes", "--json"]) == EXIT_OK
    described = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert {"dce", "dedup", "sdpa"} <= set(described)
    assert described["dedup"]["options"]["min_numel"]["default"] == 1
    assert described["dce"]["exact"] is True and described["dce"]["doc"]


def test_inspect_finds_attention_blocks(capsys):
    assert main(["inspect", "--model", "factories:tiny_gpt2", "--json"]) == EXIT_OK
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["attention"]) == 2
    assert all("eager (fusable" in block["kind"] for block in summary["attention"])
    assert summary["parameters"] > 0
    assert {"aten::linear", "aten::addmm"} & set(summary["ops"])  # GPT-2's Conv1D is addmm


def test_console_script_is_installed():
    bin_dir = Path(sys.executable).parent
    out = subprocess.run([str(bin_dir / "graphopt"), "recipes"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "default" in out.stdout and "lossless" in out.stdout


@pytest.mark.parametrize("arch", ["bert", "vit"])
def test_optimize_a_hugging_face_directory(tmp_path, arch):
    from graphopt import zoo

    model_dir = tmp_path / arch
    zoo.tiny_model(arch).save_pretrained(model_dir)  # weights + config, no tokenizer
    out = tmp_path / "out"
    assert main(["optimize", "--model", str(model_dir), "--out", str(out), *FAST]) == EXIT_OK
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == arch
    sdpa = next(p for p in report["passes"] if p["name"] == "sdpa")
    assert sdpa["info"]["replaced"] == 2  # loaded with eager attention, fused by the pass
    assert report["sections"]["parity"]["passed"]


def test_search_keeps_the_best_candidate_meeting_the_gate(tmp_path, capsys):
    plain = tmp_path / "plain.toml"
    plain.write_text('name = "plain"\npipeline = "dce"\n')
    out = tmp_path / "out"
    args = ["optimize", "--model", "factories:tiny_bert", "--out", str(out), "--candidates", f"lossless,{plain}", *FAST]
    assert main([*args, "--max-latency-ms", "1e6"]) == EXIT_OK
    found = json.loads((out / "search.json").read_text())
    assert [c["name"] for c in found["candidates"]] == ["lossless", "plain"]
    assert all(c["meets_gate"] and c["p50_ms"] > 0 for c in found["candidates"])
    assert found["winner"] in ("lossless", "plain")
    assert any(c["pareto"] for c in found["candidates"])
    assert (out / "model.onnx").is_file() and (out / "manifest.json").is_file()
    assert "(chosen)" in capsys.readouterr().out

    one = ["optimize", "--model", "factories:tiny_bert", "--out", str(tmp_path / "none"), "--candidates", str(plain), *FAST]
    assert main([*one, "--max-latency-ms", "1e-9"]) == EXIT_FAILED
    assert "no candidate recipe meets the gate" in capsys.readouterr().err


def test_fidelity_search_needs_a_text_model(tmp_path, capsys):
    code = main(["optimize", "--model", "factories:tiny_bert", "--out", str(tmp_path), "--min-fidelity", "0.99", "--no-baseline", "--quiet"])
    assert code == EXIT_USAGE
    assert "held-out sentences" in capsys.readouterr().err


def test_calibration_sentences_reach_the_build_options(tmp_path):
    from graphopt.cli import _build_options, _parser

    args = _parser().parse_args(["optimize", "--model", "minilm", "--out", str(tmp_path), "--calibration", "512"])
    assert _build_options(args).calibration == 512
    default = _parser().parse_args(["optimize", "--model", "minilm", "--out", str(tmp_path)])
    assert _build_options(default).calibration == 64

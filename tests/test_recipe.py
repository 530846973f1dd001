"""TOML recipes: presets, [[passes]] tables, early and precise errors."""

import pytest

import graphopt
from graphopt import ConfigError, Recipe, UnknownPassError
from graphopt.recipe import presets


def test_presets_load_and_are_exact_pipelines():
    assert {"default", "lossless"} <= set(presets())
    recipe = Recipe.load("default")
    manager = recipe.manager()
    # every pass of the lossless preset is optional: on a model without attention or
    # duplicate weights it still builds, and stays exact
    assert str(manager) == "dce?,dedup?,sdpa?,gqa-attention?,rotary?,rms-norm?,pack-linears?,fused-attention?,bias-gelu?,dce?"
    assert manager.exact and all(p.optional for p in manager.passes)
    assert recipe.gates.require_parity


@pytest.mark.parametrize("name", ["int8", "fastest", "balanced", "int4"])
def test_lossy_presets_require_their_quantize_stage_and_gate_on_heldout_text(name):
    recipe = Recipe.load(name)
    manager = recipe.manager()
    quantize = [p for p in manager.passes if p.name == "quantize"]
    assert len(quantize) == 1 and not quantize[0].optional  # a quantize that matched nothing fails the build
    assert not manager.exact
    assert recipe.gates.min_heldout_cosine is not None and recipe.gates.min_heldout_cosine >= 0.98


def test_pipeline_string_and_pass_tables_combine(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(
        'name = "mix"\npipeline = "dce"\non_failure = "stop"\n'
        '[[passes]]\nname = "dedup"\nmin_numel = 4\n'
        "[budget]\nmin_cosine = 0.98\n[export]\nopset = 17\n"
    )
    recipe = Recipe.load(path)
    manager = recipe.manager()
    assert str(manager) == "dce,dedup{min_numel=4}"
    assert manager.on_failure == "stop" and manager.budget.min_cosine == 0.98
    assert recipe.export.opset == 17


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('pipeline = "dce"\n[budget]\nmin_cosin = 0.9\n', "unknown key 'budget.min_cosin' (allowed here: min_cosine"),
        ('pipeline = "dce"\nexport_opset = 18\n', "unknown key 'export_opset'"),
        ('pipeline = "dce"\n[export]\nopset = 9\n', "'export.opset'"),
        ('pipeline = "dce"\non_failure = "ignore"\n', "'on_failure'"),
        ('[[passes]]\nmin_numel = 3\n', "has no 'name'"),
        ('pipeline = "dce"\n[gates]\nmin_speedup = "fast"\n', "'gates.min_speedup'"),
    ],
)
def test_bad_recipes_name_the_key(tmp_path, text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        Recipe.load(path)
    assert fragment in str(err.value)
    assert str(path) in str(err.value)


def test_unknown_pass_in_recipe_fails_at_load(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[[passes]]\nname = "prune-everything"\n')
    with pytest.raises(UnknownPassError, match=r"available passes: .*dce"):
        Recipe.load(path)


def test_bad_pass_option_in_table_fails_at_load(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[[passes]]\nname = "dedup"\nmin_numels = 4\n')
    with pytest.raises(ConfigError, match="unknown option 'min_numels'"):
        Recipe.load(path)


def test_invalid_toml_and_missing_file(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("pipeline = [unclosed\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        Recipe.load(path)
    with pytest.raises(ConfigError, match=r"not found .*presets: .*default"):
        Recipe.load(tmp_path / "missing.toml")


def test_optimize_accepts_recipe_objects_paths_and_presets(tmp_path):
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1))
    program = graphopt.capture(model, (torch.randn(2, 4),))
    for spec, recipe in (("lossless", Recipe.load("lossless")), (Recipe.load("default"), Recipe.load("default")), ("dce,dedup?", None)):
        result = graphopt.optimize(program, spec)
        assert result.report.passes[0].name == "dce" and result.report.passes[0].status == "applied"
        assert result.report.pipeline == (recipe.pipeline_text() if recipe else "dce,dedup?")
        # no attention in this model: what a preset requests and cannot do is a failure that says so
        assert all("was requested but" in f for f in result.report.failures)
    assert graphopt.optimize(program, "dce,dedup?").report.ok


@pytest.mark.parametrize("name", ["int8", "int4", "balanced", "fastest"])
def test_quantized_presets_run_on_a_tiny_bert(name, tmp_path):
    import torch

    from graphopt import zoo

    assert {"lossless", "int8", "int4", "balanced", "fastest"} <= set(presets())
    recipe = Recipe.load(name)
    assert recipe.description and not recipe.manager().exact
    torch.manual_seed(0)
    program = graphopt.capture(zoo.tiny_model("bert"), kwargs=zoo.example_inputs("bert"))
    result = graphopt.optimize(program, recipe)
    statuses = {r.name: r.status for r in result.report.passes}
    assert statuses["quantize"] == "applied" and statuses["fused-attention"] in ("applied", "unchanged"), result.report.failures
    ops = {n.target.name() for n in result.program.graph.nodes if n.op == "call_function" and hasattr(n.target, "name")}
    assert any(op.startswith(("graphopt::linear_dynamic_int8", "graphopt::linear_nbits", "graphopt::attention_int8", "graphopt::linear_static_int8", "graphopt::attention_static_int8")) for op in ops)
    result.export(tmp_path / "model.onnx")
    assert result.report.sections["parity"]["passed"] is True


# ---- [data] ----------------------------------------------------------------------------------
def test_data_section_defaults_to_the_stdlib_text():
    data = Recipe.load("default").data
    assert data.source == "stdlib" and data.field is None
    assert (data.calibration, data.verification, data.heldout, data.max_length) == (64, 64, 64, 128)
    assert data.fractions == (0.7, 0.1, 0.2)


def test_data_section_reads_a_source_beside_the_recipe(tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    path = folder / "r.toml"
    path.write_text('pipeline = "dce"\n[data]\nsource = "reviews.jsonl"\ncolumn = "body"\nheldout = 100\nverification = 48\nmax_length = 64\n')
    data = Recipe.load(path).data
    assert data.source == str(folder / "reviews.jsonl") and data.field == "body"  # 'column' is 'field' by another name
    assert (data.heldout, data.verification, data.max_length) == (100, 48, 64)
    absolute = tmp_path / "abs.toml"
    absolute.write_text(f'[data]\nsource = "{tmp_path / "x.csv"}"\nfield = "review"\n')
    assert Recipe.load(absolute).data.source == str(tmp_path / "x.csv")


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[data]\nverification = 10\n", "'data.verification'"),
        ("[data]\nheldout = 2\n", "'data.heldout'"),
        ("[data]\nsorce = \"x.txt\"\n", "unknown key 'data.sorce' (allowed here: source, field, calibration"),
        ("[data]\nfractions = [0.5, 0.1, 0.1]\n", "'data.fractions'"),
        ("[data]\nfractions = [0.9, 0.0, 0.1]\n", "'data.fractions'"),
        ("[data]\nsource = \"\"\n", "'data.source'"),
    ],
)
def test_bad_data_sections_name_the_key(tmp_path, text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text('pipeline = "dce"\n' + text)
    with pytest.raises(ConfigError) as err:
        Recipe.load(path)
    assert fragment in str(err.value)


def test_with_data_overrides_source_and_field_only():
    recipe = Recipe.from_dict({"pipeline": "dce,dedup", "data": {"heldout": 32, "field": "title"}})
    replaced = recipe.with_data("mine.csv", "review")
    assert replaced.data.source == "mine.csv" and replaced.data.field == "review" and replaced.data.heldout == 32
    assert replaced.pipeline_text() == "dce,dedup"
    assert recipe.with_data("mine.txt").data.field is None  # a new source does not keep the old one's field
    assert recipe.with_data(field="body").data.source == "stdlib"

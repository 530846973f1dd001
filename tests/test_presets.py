"""Presets keep their word: each lossy preset, rebuilt on MiniLM from its own recipe (data
section, budget and all), reaches the held-out figure its description quotes.

The rebuilds cost about six CPU-minutes (and the long-attention preset, which trains, about
twenty more), so the default run (and CI) checks only that every
lossy preset quotes a measured figure and gates below it; run the rebuilds with
``bash scripts/test.sh -m presets`` whenever a preset, a pass it uses or the data split changes."""

import pytest

import graphopt
from graphopt.datasets import load_splits, passage_joiner, text_context
from graphopt.fidelity import compare_encoders
from graphopt.recipe import Recipe, presets

QUOTE_TOLERANCE = 0.003
LOSSY = [name for name in presets() if not Recipe.load(name).manager().exact]


@pytest.fixture(scope="module")
def minilm():
    from graphopt.models import load_model

    loaded = load_model("minilm")
    return loaded, graphopt.capture(loaded.model, kwargs=loaded.example_kwargs)


def test_every_lossy_preset_quotes_a_measured_figure_and_gates_below_it():
    assert {"int8", "balanced", "int4"} <= set(LOSSY)
    for name in LOSSY:
        recipe = Recipe.load(name)
        assert recipe.measured is not None, f"preset {name} quotes no measured figure"
        quoted = recipe.measured.heldout_mean_cosine
        assert f"{quoted:.3f}" in recipe.description, f"preset {name}'s description does not quote {quoted:.3f}"
        assert recipe.gates.min_heldout_cosine is not None and recipe.gates.min_heldout_cosine < quoted


def _builds() -> dict[str, list[str]]:
    """Lossy presets grouped by what they build (int8 and fastest are one pipeline today):
    each build runs once and is held to every member's quoted figure."""
    groups: dict[str, list[str]] = {}
    for name in LOSSY:
        recipe = Recipe.load(name)
        key = recipe.model_dump_json(include={"pipeline", "budget", "data", "on_failure"})
        groups.setdefault(key, []).append(name)
    return {"+".join(names): names for names in groups.values()}


BUILDS = _builds()


@pytest.mark.slow
@pytest.mark.presets
@pytest.mark.parametrize("build", list(BUILDS))
def test_lossy_preset_reaches_the_heldout_figure_it_quotes(minilm, build):
    loaded, program = minilm
    recipe = Recipe.load(BUILDS[build][0])
    settings = recipe.data
    join = passage_joiner(loaded.tokenizer, settings.passage_tokens) if settings.passage_tokens else None
    splits = load_splits(settings.source, settings.field, calibration=settings.calibration, verification=settings.verification,
                         heldout=recipe.measured.heldout_texts, fractions=settings.fractions, seed=settings.seed, join=join)
    ctx = text_context(loaded.tokenizer, splits, list(loaded.example_kwargs), max_length=settings.max_length)
    result = graphopt.optimize(program, recipe, context=ctx)
    assert result.report.ok, result.report.failures
    fidelity = compare_encoders(loaded.model, result.program, loaded.tokenizer, splits.heldout, input_names=list(loaded.example_kwargs),
                                max_length=settings.max_length)
    for name in BUILDS[build]:
        member = Recipe.load(name)
        assert fidelity["n"] == member.measured.heldout_texts
        assert abs(fidelity["mean_cosine"] - member.measured.heldout_mean_cosine) <= QUOTE_TOLERANCE, (name, fidelity)
        assert fidelity["mean_cosine"] >= member.gates.min_heldout_cosine, (name, fidelity)

import math

import pytest

import graphopt
from graphopt import ConfigError, UnknownPassError, parse_pipeline
from graphopt.errors import PipelineSyntaxError
from graphopt.passes.dce import DeadCodeElimination
from graphopt.passes.dedup import Deduplicate


@pytest.mark.parametrize(
    "text",
    [
        "dce",
        "dce,dedup,sdpa",
        "dedup{min_numel=16}",
        "dce{remove_identities=false,remove_unused_tensors=false},dedup",
        "fixpoint(dce,dedup),sdpa",
        "pipeline(dce,fixpoint(dedup){max_iterations=3}){max_iterations=2}",
        "dce?,dedup{min_numel=16}?,sdpa",
        "fixpoint(dce?,dedup)?,pipeline(sdpa)?",
    ],
)
def test_text_round_trips(text):
    manager = parse_pipeline(text)
    assert str(manager) == text
    assert parse_pipeline(str(manager)) == manager


def test_whitespace_and_defaults_normalise():
    manager = parse_pipeline(" dce , dedup{ min_numel = 1 } ")
    assert str(manager) == "dce,dedup"  # default options are not printed
    assert manager == graphopt.PassManager([DeadCodeElimination(), Deduplicate()])


def test_objects_print_to_text():
    manager = graphopt.PassManager([Deduplicate(min_numel=8), DeadCodeElimination(remove_identities=False)])
    assert str(manager) == "dedup{min_numel=8},dce{remove_identities=false}"
    assert parse_pipeline(str(manager)) == manager


def test_optional_mark_is_part_of_the_pipeline_not_the_config():
    manager = parse_pipeline("dce?,dedup")
    dce, dedup = manager.passes
    assert dce.optional and not dedup.optional
    assert dce.config == DeadCodeElimination().config and dce != DeadCodeElimination()
    assert DeadCodeElimination(optional=True).text() == "dce?"


def test_different_options_are_different_passes():
    assert Deduplicate(min_numel=2) != Deduplicate(min_numel=3)
    assert parse_pipeline("dce,dedup") != parse_pipeline("dedup,dce")


def test_unknown_pass_lists_available_names():
    with pytest.raises(UnknownPassError) as err:
        parse_pipeline("dce,quantise")
    assert "quantise" in str(err.value)
    for name in ("dce", "dedup", "sdpa"):
        assert name in str(err.value)


def test_unknown_option_lists_allowed_keys():
    with pytest.raises(ConfigError) as err:
        parse_pipeline("dedup{min_elements=3}")
    message = str(err.value)
    assert "min_elements" in message and "min_numel" in message and "dedup" in message


def test_bad_option_value_names_the_option():
    with pytest.raises(ConfigError, match="min_numel"):
        parse_pipeline("dedup{min_numel=0}")


@pytest.mark.parametrize("text", ["dce,", "dce{", "dce{x}", "dce dedup", "fixpoint(dce", "dedup{min_numel=1,min_numel=2}", "dce??", "?dce"])
def test_syntax_errors_point_at_the_problem(text):
    with pytest.raises(PipelineSyntaxError) as err:
        parse_pipeline(text)
    assert "position" in str(err.value)


def test_value_types():
    from graphopt.pipeline import _Parser

    def value(text):
        return _Parser(text).value()

    assert value("3") == 3 and isinstance(value("3"), int)
    assert value("0.25") == 0.25
    assert value("1e-5") == 1e-5
    assert value("true") is True and value("false") is False
    assert math.isinf(value("inf"))
    assert value("int8") == "int8"
    assert value('"a b,c"') == "a b,c"
    assert value("[1,2.5,x]") == [1, 2.5, "x"]

"""The pass manager enforces the contract: verification, rollback, reproducers, reports."""

import json
from pathlib import Path
from typing import ClassVar

import pydantic
import pytest
import torch

import graphopt
from graphopt import Budget, Pass, PassConfig, PassFailedError, PassManager, PassResult, register_pass
from graphopt.passbase import unregister_pass
from graphopt.reproducer import rerun_reproducer


class SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def first_weight(program):
    return next(n for n in program.graph.nodes if n.op == "get_attr")


class ScaleWeights(Pass):
    """Lossy on purpose: scales the first weight by ``factor``."""

    name: ClassVar[str] = "test-scale"
    exact: ClassVar[bool] = False

    class Config(PassConfig):
        factor: float = 1.01

    def run(self, program):
        node = first_weight(program)
        weight = program.module.get_parameter(node.target)
        with torch.no_grad():
            weight.mul_(self.config.factor)
        return PassResult(program, True, {"scaled": node.target})


class WrongExact(ScaleWeights):
    """Claims to be exact but changes the numbers."""

    name: ClassVar[str] = "test-wrong-exact"
    exact: ClassVar[bool] = True


class Crashes(Pass):
    name: ClassVar[str] = "test-crash"

    def run(self, program):
        # break the graph half-way, then crash: the manager must restore the program
        node = first_weight(program)
        node.target = "does.not.exist"
        raise RuntimeError("boom in test-crash")


class LiesAboutModified(ScaleWeights):
    name: ClassVar[str] = "test-liar"
    exact: ClassVar[bool] = True

    def run(self, program):
        super().run(program)
        return PassResult(program, False, {})


class CountCalls(Pass):
    """Modifies the program (exactly) the first ``times`` calls: tests fixpoint iteration."""

    name: ClassVar[str] = "test-count"

    class Config(PassConfig):
        times: int = 2

    def run(self, program):
        calls = program.meta.setdefault("count_calls", 0)
        program.meta["count_calls"] = calls + 1
        if calls < self.config.times:
            node = first_weight(program)
            weight = program.module.get_parameter(node.target)
            with torch.no_grad():
                weight.add_(0.0)  # in-place write: same values, new version
            return PassResult(program, True, {})
        return PassResult(program, False, {})


TEST_PASSES = (ScaleWeights, WrongExact, Crashes, LiesAboutModified, CountCalls)


@pytest.fixture(autouse=True)
def registered():
    for cls in TEST_PASSES:
        register_pass(cls)
    yield
    for cls in TEST_PASSES:
        unregister_pass(cls.name)


@pytest.fixture
def program():
    torch.manual_seed(0)
    return graphopt.capture(SmallNet(), (torch.randn(3, 8),))


def outputs_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.run(), b.run()))


def test_wrong_exact_pass_is_rolled_back_with_figures(program, tmp_path):
    before = program.clone()
    result = graphopt.optimize(program, "dce,test-wrong-exact{factor=1.5}", reproducer_dir=tmp_path)
    record = result.report.passes[-1]
    assert record.name == "test-wrong-exact" and record.status == "rolled-back"
    assert "exact pass 'test-wrong-exact' broke its tolerance" in record.reason
    assert "max_rel" in record.reason and record.drift_step["max_rel"] > 1e-5
    assert outputs_equal(result.program, before)
    assert not result.report.ok
    assert "test-wrong-exact" in result.report.failures[0]
    markdown = result.report.to_markdown()
    assert "rolled-back" in markdown and "test-wrong-exact" in markdown
    # not a crash: no reproducer for a tolerance failure
    assert record.reproducer is None


def test_lossy_pass_within_budget_is_kept(program):
    result = graphopt.optimize(program, "test-scale{factor=1.001}", budget=Budget(min_cosine=0.99))
    record = result.report.passes[0]
    assert record.status == "applied"
    assert 0.99 < record.drift_total["cosine"] < 1.0
    assert not outputs_equal(result.program, program)


def test_budget_may_be_a_dict(program):
    result = graphopt.optimize(program, "test-scale{factor=-1.0}", budget={"min_cosine": 0.99})
    assert result.report.passes[0].status == "rolled-back"
    with pytest.raises(pydantic.ValidationError, match="min_cosin"):
        graphopt.optimize(program, "dce", budget={"min_cosin": 0.99})


def test_lossy_pass_over_budget_is_rolled_back(program):
    result = graphopt.optimize(program, "test-scale{factor=-1.0}", budget=Budget(min_cosine=0.99))
    record = result.report.passes[0]
    assert record.status == "rolled-back"
    assert "min_cosine 0.99" in record.reason
    assert outputs_equal(result.program, program)


def test_input_program_is_not_modified(program):
    fingerprint = program.fingerprint()
    weights = {k: v.clone() for k, v in program.tensors().items()}
    graphopt.optimize(program, "test-scale{factor=2.0}", budget=Budget(min_cosine=-1.0))
    assert program.fingerprint() == fingerprint
    assert all(torch.equal(weights[k], v) for k, v in program.tensors().items())


def test_crash_is_rolled_back_and_writes_a_reproducer(program, tmp_path):
    result = graphopt.optimize(program, "test-crash,dce", reproducer_dir=tmp_path)
    crash, dce = result.report.passes
    assert crash.status == "rolled-back" and "RuntimeError: boom in test-crash" in crash.reason
    assert dce.status == "applied"  # on_failure="continue": the pipeline goes on
    assert outputs_equal(result.program, program)
    folder = Path(crash.reproducer)
    assert folder.parent == tmp_path
    assert {p.name for p in folder.iterdir()} >= {"program.pt2", "pass.json", "error.txt", "command.txt"}
    assert (folder / "command.txt").read_text().strip() == f"graphopt repro {folder}"
    assert json.loads((folder / "pass.json").read_text())["pass"] == "test-crash"
    assert "boom in test-crash" in (folder / "error.txt").read_text()
    with pytest.raises(RuntimeError, match="boom in test-crash"):
        rerun_reproducer(folder)


def test_pass_that_lies_about_modified_is_rolled_back(program):
    result = graphopt.optimize(program, "test-liar")
    record = result.report.passes[0]
    assert record.status == "rolled-back"
    assert "modified=False but changed the program" in record.reason
    assert outputs_equal(result.program, program)


def test_on_failure_stop_skips_the_rest(program):
    result = graphopt.optimize(program, "test-wrong-exact{factor=2.0},dce", on_failure="stop")
    assert [r.name for r in result.report.passes] == ["test-wrong-exact"]
    assert not result.report.ok


def test_on_failure_raise(program):
    with pytest.raises(PassFailedError, match="test-wrong-exact"):
        graphopt.optimize(program, "test-wrong-exact{factor=2.0}", on_failure="raise")


def test_fixpoint_repeats_until_nothing_changes(program):
    result = graphopt.optimize(program, "fixpoint(test-count{times=2})")
    statuses = [r.status for r in result.report.passes]
    assert statuses == ["applied", "applied", "unchanged"]


def test_fixpoint_is_bounded(program):
    result = graphopt.optimize(program, "fixpoint(test-count{times=100}){max_iterations=3}")
    assert len(result.report.passes) == 3


def test_manager_is_a_pass_and_nests(program):
    inner = PassManager([graphopt.create_pass("dce")])
    outer = PassManager([inner, graphopt.create_pass("dedup")])
    assert isinstance(inner, Pass)
    result = outer(program.clone())
    assert isinstance(result, PassResult) and result.modified  # dce removes the eval dropout
    assert [r.name for r in result.info["report"].passes] == ["dce", "dedup"]


def test_instrumentation_records_every_figure(program):
    result = graphopt.optimize(program, "dce,dedup")
    report = result.report
    assert report.initial.nodes > report.final.nodes  # dropout removed
    assert report.initial.parameters == sum(p.numel() for p in SmallNet().parameters())
    for record in report.passes:
        assert record.wall_s >= 0 and record.before is not None and record.after is not None
    applied = report.passes[0]
    assert applied.status == "applied" and applied.drift_step["max_rel"] == 0.0 and applied.drift_total["cosine"] == pytest.approx(1.0)
    assert report.initial.flops == 2 * 3 * (8 * 16 + 16 * 4)
    data = json.loads(report.to_json())
    assert data["passes"][0]["name"] == "dce" and data["ok"] is True
    assert data["environment"]["cpu_isa"]


def test_analyses_are_cached_and_invalidated(program):
    calls = []
    program.analysis("count", lambda p: calls.append(1) or len(calls))
    program.analysis("count", lambda p: calls.append(1) or len(calls))
    assert len(calls) == 1
    result = graphopt.optimize(program, "dce")
    assert "count" not in result.program.analyses


class PadNet(torch.nn.Module):
    """Its ``pad`` parameter only reaches the positions the attention mask marks as padding."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.pad = torch.nn.Parameter(torch.zeros(8))

    def forward(self, x, attention_mask):
        return self.fc(x) + (1 - attention_mask).unsqueeze(-1).to(x.dtype) * self.pad


class DisturbPadding(Pass):
    name: ClassVar[str] = "test-disturb-padding"
    exact: ClassVar[bool] = False

    def run(self, program):
        with torch.no_grad():
            program.module.get_parameter("pad").fill_(100.0)
        return PassResult(program, True, {})


class DisturbPaddingExact(DisturbPadding):
    name: ClassVar[str] = "test-disturb-padding-exact"
    exact: ClassVar[bool] = True


@pytest.fixture
def padded():
    for cls in (DisturbPadding, DisturbPaddingExact):
        register_pass(cls)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    yield graphopt.capture(PadNet(), kwargs={"x": torch.randn(2, 4, 8), "attention_mask": mask}, dynamic_shapes=None)
    for cls in (DisturbPadding, DisturbPaddingExact):
        unregister_pass(cls.name)


def test_budget_counts_only_the_real_positions(padded):
    # Outputs at padded positions are used by nothing: a lossy pass that only moves them
    # is within any budget; over every position its cosine would be far below it.
    assert graphopt.drift(padded.run(), padded.run()).cosine == pytest.approx(1.0)
    result = graphopt.optimize(padded, "test-disturb-padding", budget=Budget(min_cosine=0.999))
    record = result.report.passes[0]
    assert record.status == "applied"
    assert record.drift_total["cosine"] == pytest.approx(1.0)
    everywhere = graphopt.drift(padded.run(), result.program.run())
    assert everywhere.cosine < 0.9
    assert result.report.final_drift["cosine"] == pytest.approx(1.0)


def test_exact_passes_are_held_to_every_position(padded):
    result = graphopt.optimize(padded, "test-disturb-padding-exact")
    assert result.report.passes[0].status == "rolled-back"
    assert "exact pass moved the outputs" in result.report.passes[0].reason

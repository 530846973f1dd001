"""The pass manager and its instrumentations enforce the contract: verification, rollback,
reproducers, reports, and a failure for every requested pass that changed nothing."""

import gc
import json
import weakref
from pathlib import Path
from typing import ClassVar

import pydantic
import pytest
import torch

import graphopt
from graphopt import Budget, Instrumentation, Pass, PassConfig, PassContext, PassFailedError, PassInfo, PassManager, PassResult, register_pass
from graphopt.instrument import PrintAfterChange, default_instrumentations
from graphopt.passbase import unregister_pass
from graphopt.repro import rerun_reproducer


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


class ScaledInfo(PassInfo):
    scaled: str = ""


class ScaleWeights(Pass):
    """Lossy on purpose: scales the first weight by ``factor``."""

    name: ClassVar[str] = "test-scale"
    Info: ClassVar[type[PassInfo]] = ScaledInfo

    class Config(PassConfig):
        factor: float = 1.01

    def run(self, program, ctx):
        node = first_weight(program)
        weight = program.module.get_parameter(node.target)
        with torch.no_grad():
            weight.mul_(self.config.factor)
        return PassResult.applied(program, ScaledInfo(scaled=node.target))


class WrongExact(ScaleWeights):
    """Claims to be exact but changes the numbers."""

    name: ClassVar[str] = "test-wrong-exact"

    @classmethod
    def is_exact(cls, config):
        return True


class Crashes(Pass):
    """Breaks the graph half-way, then crashes."""

    name: ClassVar[str] = "test-crash"

    def run(self, program, ctx):
        first_weight(program).target = "does.not.exist"
        raise RuntimeError("boom in test-crash")


class LiesAboutModified(ScaleWeights):
    """Changes the weights and says it did not."""

    name: ClassVar[str] = "test-liar"

    def run(self, program, ctx):
        super().run(program, ctx)
        return PassResult.unchanged(program, ScaledInfo(), "nothing to do, it claims")


class WrongInfo(Pass):
    """Reports another pass's Info type."""

    name: ClassVar[str] = "test-wrong-info"

    def run(self, program, ctx):
        return PassResult.unchanged(program, ScaledInfo())


class Nothing(Pass):
    """Never finds anything to do."""

    name: ClassVar[str] = "test-nothing"

    def run(self, program, ctx):
        return PassResult.unchanged(program, reason="no pattern found")


class CountCalls(Pass):
    """Modifies the program (exactly) the first ``times`` calls: tests fixpoint iteration."""

    name: ClassVar[str] = "test-count"
    calls: ClassVar[dict] = {}

    class Config(PassConfig):
        times: int = 2

    @classmethod
    def is_exact(cls, config):
        return True

    def run(self, program, ctx):
        count = CountCalls.calls.setdefault(id(ctx), 0)
        CountCalls.calls[id(ctx)] = count + 1
        if count < self.config.times:
            weight = program.module.get_parameter(first_weight(program).target)
            with torch.no_grad():
                weight.add_(0.0)  # in-place write: same values, new version
            return PassResult.applied(program)
        return PassResult.unchanged(program, reason="done")


class OrthogonalBias(Pass):
    """Claims exactness: shifts fc1's weight along a direction orthogonal to every example
    input, so the example's outputs do not move and every other input's do."""

    name: ClassVar[str] = "test-orthogonal"

    @classmethod
    def is_exact(cls, config):
        return True

    def run(self, program, ctx):
        x = program.args[0]
        q, _ = torch.linalg.qr(torch.cat([x.T, torch.randn(8, 8 - x.shape[0])], dim=1))
        direction = q[:, -1]  # orthogonal to the example rows
        weight = program.module.get_parameter(first_weight(program).target)
        with torch.no_grad():
            weight.add_(torch.outer(torch.ones(weight.shape[0]), direction))
        return PassResult.applied(program)


TEST_PASSES = (ScaleWeights, WrongExact, Crashes, LiesAboutModified, WrongInfo, Nothing, CountCalls, OrthogonalBias)


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
    assert record.reproducer is None  # not a crash: no reproducer for a tolerance failure


def test_an_exact_rewrite_right_only_on_the_example_is_caught(program):
    # The example's own outputs do not move at all; the verification inputs' do.
    moved = OrthogonalBias()(program.clone())
    assert graphopt.drift(program.run(), moved.program.run()).max_rel < 1e-6
    result = graphopt.optimize(program, "test-orthogonal")
    record = result.report.passes[0]
    assert record.status == "rolled-back" and "exact pass moved the outputs" in record.reason
    assert result.report.verification["samples"] >= 32


def test_lossy_pass_within_budget_is_kept(program):
    result = graphopt.optimize(program, "test-scale{factor=1.001}", budget=Budget(min_cosine=0.99))
    record = result.report.passes[0]
    assert record.status == "applied" and result.report.ok
    assert 0.99 < record.drift_total["cosine"] < 1.0
    assert record.info == {"scaled": "fc1.weight"}
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


def test_per_sample_budget(program):
    # Scaling a weight moves every sample alike: a tight per-sample floor rejects what the
    # pooled cosine accepts, a loose one does not.
    loose = graphopt.optimize(program, "test-scale{factor=0.9}", budget=Budget(min_cosine=0.9, min_sample_cosine=0.5))
    assert loose.report.passes[0].status == "applied"
    drift = loose.report.passes[0].drift_total
    tight = graphopt.optimize(program, "test-scale{factor=0.9}", budget=Budget(min_cosine=0.9, min_sample_cosine=(drift["min_sample_cosine"] + 1) / 2))
    assert tight.report.passes[0].status == "rolled-back" and "min_sample_cosine" in tight.report.passes[0].reason


def test_input_program_is_not_modified(program):
    fingerprint = program.fingerprint()
    weights = {k: v.clone() for k, v in program.tensors().items()}
    graphopt.optimize(program, "test-scale{factor=2.0}", budget=Budget(min_cosine=-1.0))
    assert program.fingerprint() == fingerprint
    assert all(torch.equal(weights[k], v) for k, v in program.tensors().items())


def test_each_pass_snapshot_is_freed_before_the_next_is_taken(program):
    """A snapshot is a deep copy of the program, and an fx GraphModule is all reference cycles:
    without an explicit collection each pass's copy outlived it (a 0.5B decoder grew 2 GB a
    pass). With the cycle collector off, only the manager's own collection can free it."""

    class Watch(Instrumentation):
        copies: ClassVar[list] = []
        alive: ClassVar[list] = []

        def before_pass(self, p, program, run, record):
            self.alive.append(sum(ref() is not None for ref in self.copies))

        def after_pass(self, p, result, run, record):
            self.copies.append(weakref.ref(run.snapshot.module))

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        graphopt.optimize(program, "test-scale{factor=1.0}, test-scale{factor=1.0}, test-scale{factor=1.0}",
                          instrumentations=[*default_instrumentations(), Watch()])
    finally:
        if was_enabled:
            gc.enable()
    assert len(Watch.copies) == 3 and Watch.alive == [0, 0, 0]


def test_crash_is_rolled_back_and_writes_a_reproducer_with_the_context(program, tmp_path):
    calibration = (((torch.full((2, 8), 0.5),), {}),)
    ctx = PassContext(calibration=calibration, calibration_source="two rows of 0.5", artifacts=tmp_path / "artifacts")
    result = graphopt.optimize(program, "test-crash,dce", reproducer_dir=tmp_path, context=ctx)
    crash, dce = result.report.passes
    assert crash.status == "rolled-back" and "RuntimeError: boom in test-crash" in crash.reason
    assert dce.status == "applied"  # on_failure="continue": the pipeline goes on
    assert outputs_equal(result.program, program)
    folder = Path(crash.reproducer)
    assert folder.parent == tmp_path
    assert {p.name for p in folder.iterdir()} >= {"program.pt2", "pass.json", "error.txt", "command.txt", "context"}
    assert (folder / "command.txt").read_text().strip() == f"graphopt repro {folder}"
    assert json.loads((folder / "pass.json").read_text())["pass"] == "test-crash"
    assert "boom in test-crash" in (folder / "error.txt").read_text()
    from graphopt.repro import load_reproducer

    _, _, loaded = load_reproducer(folder)
    assert loaded.calibration_source == "two rows of 0.5" and torch.equal(loaded.calibration[0][0][0], calibration[0][0][0])
    assert loaded.teacher is not None and outputs_equal(loaded.teacher, program)  # optimize() made the original the teacher
    assert loaded.artifacts == tmp_path / "artifacts" and len(loaded.verification) == 16  # optimize() filled in the verification data
    with pytest.raises(RuntimeError, match="boom in test-crash"):
        rerun_reproducer(folder)


def test_pass_that_lies_about_modified_is_rolled_back(program):
    result = graphopt.optimize(program, "test-liar")
    record = result.report.passes[0]
    assert record.status == "rolled-back"
    assert "returned unchanged but changed the program" in record.reason
    assert outputs_equal(result.program, program)


def test_pass_reporting_the_wrong_info_type_breaks_the_contract(program):
    result = graphopt.optimize(program, "test-wrong-info")
    assert result.report.passes[0].status == "rolled-back"
    assert "reported ScaledInfo, not its NoInfo" in result.report.passes[0].reason


def test_a_requested_pass_that_changes_nothing_fails_the_run(program):
    result = graphopt.optimize(program, "dce,test-nothing")
    assert result.report.passes[1].status == "unchanged" and result.report.passes[1].reason == "no pattern found"
    assert not result.report.ok
    assert "pass 'test-nothing' was requested but left the program unchanged: no pattern found" in result.report.failures[0]


def test_an_optional_pass_may_change_nothing(program):
    result = graphopt.optimize(program, "dce,test-nothing?")
    assert result.report.ok and result.report.passes[1].optional


def test_a_requested_pass_that_is_skipped_fails_the_run(program):
    fx_program = graphopt.capture(SmallNet(), (torch.randn(3, 8),))
    fx_program.ir = "fx"  # as after a symbolic_trace fallback
    result = graphopt.optimize(fx_program, "dce,sdpa")
    record = result.report.passes[1]
    assert record.status == "skipped" and "needs a graph from aten capture" in record.reason
    assert any("'sdpa' was requested but was skipped" in f for f in result.report.failures)


def test_a_pass_applied_once_in_a_fixpoint_is_not_a_failure(program):
    result = graphopt.optimize(program, "fixpoint(test-count{times=2})")
    assert [r.status for r in result.report.passes] == ["applied", "applied", "unchanged"]
    assert result.report.ok


def test_on_failure_stop_skips_the_rest(program):
    result = graphopt.optimize(program, "test-wrong-exact{factor=2.0},dce", on_failure="stop")
    assert [r.name for r in result.report.passes] == ["test-wrong-exact"]
    assert not result.report.ok


def test_on_failure_raise(program):
    with pytest.raises(PassFailedError, match="test-wrong-exact"):
        graphopt.optimize(program, "test-wrong-exact{factor=2.0}", on_failure="raise")


def test_without_a_rollback_a_failure_cannot_be_continued(program):
    hooks = [h for h in default_instrumentations() if h.name not in ("rollback", "reproducer")]
    with pytest.raises(PassFailedError, match="failed"):
        graphopt.optimize(program, "test-wrong-exact{factor=2.0}", instrumentations=hooks)


def test_fixpoint_is_bounded(program):
    result = graphopt.optimize(program, "fixpoint(test-count{times=100}){max_iterations=3}")
    assert len(result.report.passes) == 3


def test_manager_is_a_pass_and_nests(program):
    inner = PassManager([graphopt.create_pass("dce")])
    outer = PassManager([inner, graphopt.create_pass("dedup", optional=True)])
    assert isinstance(inner, Pass)
    result = outer(program.clone())
    assert isinstance(result, PassResult) and result.modified  # dce removes the eval dropout
    assert [r.name for r in result.info.report.passes] == ["dce", "dedup"]
    assert result.info.report.ok


def test_instrumentation_records_every_figure(program):
    result = graphopt.optimize(program, "dce,dedup?")
    report = result.report
    assert report.initial.nodes > report.final.nodes  # dropout removed
    assert report.initial.parameters == sum(p.numel() for p in SmallNet().parameters())
    for record in report.passes:
        assert record.wall_s >= 0 and record.before is not None and record.after is not None
    applied = report.passes[0]
    assert applied.status == "applied" and applied.drift_step["max_rel"] == 0.0 and applied.drift_total["cosine"] == pytest.approx(1.0)
    assert applied.info == {"identities_removed": 1, "dead_nodes_removed": 0, "tensors_removed": 0}
    assert report.initial.flops == 2 * 3 * (8 * 16 + 16 * 4)
    data = json.loads(report.to_json())
    assert data["passes"][0]["name"] == "dce" and data["ok"] is True
    assert data["environment"]["cpu_isa"] and data["verification"]["samples"] >= 32


class Recorder(Instrumentation):
    name = "recorder"

    def __init__(self):
        self.events = []

    def before_pipeline(self, program, run):
        self.events.append("start")

    def before_pass(self, p, program, run, record):
        self.events.append(f"before {p.name}")

    def after_pass(self, p, result, run, record):
        self.events.append(f"after {p.name} {result.status}")

    def after_failure(self, p, program, error, run, record):
        self.events.append(f"failed {p.name}")

    def after_pipeline(self, program, run):
        self.events.append("end")


def test_user_instrumentations_see_every_hook(program, tmp_path):
    recorder = Recorder()
    graphopt.optimize(program, "dce,test-crash,dedup?", instrumentations=[recorder, *default_instrumentations(reproducer_dir=tmp_path)])
    assert recorder.events == ["start", "before dce", "after dce applied", "before test-crash", "failed test-crash", "before dedup", "after dedup unchanged", "end"]


def test_print_after_change_writes_the_program_after_each_change(program, tmp_path):
    graphopt.optimize(program, "dce,dedup?", print_after_change=tmp_path / "ir")
    files = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert files == ["00-captured.py", "01-dce.py"]
    assert "dropout" in (tmp_path / "ir" / "00-captured.py").read_text() and "dropout" not in (tmp_path / "ir" / "01-dce.py").read_text()
    assert isinstance(PrintAfterChange(tmp_path), Instrumentation)


class Preserving(Pass):
    """Changes the graph and keeps the 'kept' analysis."""

    name: ClassVar[str] = "test-preserving"

    @classmethod
    def is_exact(cls, config):
        return True

    def run(self, program, ctx):
        node = next(n for n in program.graph.nodes if n.target is torch.ops.aten.dropout.default)
        node.replace_all_uses_with(node.args[0])
        program.graph.erase_node(node)
        return PassResult.applied(program, preserved=("kept",))


def test_analyses_are_cached_invalidated_and_preserved(program):
    calls = []
    program.analysis("count", lambda p: calls.append(1) or len(calls))
    program.analysis("count", lambda p: calls.append(1) or len(calls))
    assert len(calls) == 1
    copy = program.clone()
    copy.analysis("kept", lambda p: "k")
    copy.analysis("dropped", lambda p: "d")
    result = Preserving()(copy)
    assert "kept" in result.program.analyses and "dropped" not in result.program.analyses
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
    """Moves only the padded positions' outputs (lossy)."""

    name: ClassVar[str] = "test-disturb-padding"

    class Config(PassConfig):
        value: float = 100.0

    def run(self, program, ctx):
        with torch.no_grad():
            program.module.get_parameter("pad").fill_(self.config.value)
        return PassResult.applied(program)


class DisturbPaddingExact(DisturbPadding):
    """The same, claiming exactness."""

    name: ClassVar[str] = "test-disturb-padding-exact"

    @classmethod
    def is_exact(cls, config):
        return True


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


def test_nan_at_padded_positions_is_rejected_even_for_lossy_passes(padded):
    # A mean-pool that multiplies padding by zero still turns NaN into NaN.
    result = graphopt.optimize(padded, "test-disturb-padding{value=nan}", budget=Budget(min_cosine=0.0))
    record = result.report.passes[0]
    assert record.status == "rolled-back" and "non-finite" in record.reason


def test_exact_passes_are_held_to_every_position(padded):
    result = graphopt.optimize(padded, "test-disturb-padding-exact")
    assert result.report.passes[0].status == "rolled-back"
    assert "exact pass moved the outputs" in result.report.passes[0].reason


class Embedder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(64, 8)
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, input_ids, attention_mask):
        return self.fc(self.embed(input_ids))


class BreakUnseenRows(Pass):
    """Zeroes every embedding row the example inputs do not use (lossy)."""

    name: ClassVar[str] = "test-break-unseen-rows"

    def run(self, program, ctx):
        seen = program.kwargs["input_ids"].unique()
        table = program.module.get_parameter("embed.weight")
        unseen = torch.ones(table.shape[0], dtype=torch.bool)
        unseen[seen] = False
        with torch.no_grad():
            table[unseen] = 0.0
        return PassResult.applied(program)


def test_a_lossy_pass_that_breaks_what_the_example_does_not_use_is_rejected():
    register_pass(BreakUnseenRows)
    try:
        ids = torch.tensor([[3, 4, 5, 6], [3, 4, 5, 6]])
        program = graphopt.capture(Embedder(), kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        assert graphopt.drift(program.run(), BreakUnseenRows()(program.clone()).program.run()).cosine == pytest.approx(1.0)
        result = graphopt.optimize(program, "test-break-unseen-rows", budget=Budget(min_cosine=0.9))
        assert result.report.passes[0].status == "rolled-back" and "min_cosine" in result.report.passes[0].reason
    finally:
        unregister_pass(BreakUnseenRows.name)

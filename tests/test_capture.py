"""Capture: dynamic dims, provenance, clear failures, fallback, the user's model untouched."""

import warnings

import pytest
import torch
from factories import NumpyNet

import graphopt
from graphopt import CaptureError


class Block(torch.nn.Module):
    def __init__(self, data_dependent=False):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.data_dependent = data_dependent

    def forward(self, x):
        y = self.proj(x)
        if self.data_dependent:  # noqa: SIM102 - the test looks for the inner line in the error
            if y.sum() > 0:  # data-dependent Python control flow: not capturable
                return y * 2
        return torch.relu(y)


class Net(torch.nn.Module):
    def __init__(self, data_dependent=False):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.block = torch.nn.Sequential(Block(), Block(data_dependent))
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, input_ids, attention_mask):
        h = self.drop(self.embed(input_ids)) * attention_mask.unsqueeze(-1)
        return {"hidden": self.block(h), "pooled": h.mean(1)}


def text_inputs(batch=2, seq=6):
    ids = torch.randint(0, 50, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_capture_runs_other_batch_and_sequence_sizes():
    model = Net()
    program = graphopt.capture(model, kwargs=text_inputs())
    assert program.ir == "aten"
    assert program.output_names == ["hidden", "pooled"]
    for batch, seq in [(1, 3), (5, 11)]:
        inputs = text_inputs(batch, seq)
        got = program.run(kwargs=inputs)
        want = graphopt.program.flatten_outputs(model.eval()(**inputs))
        assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got, want))


def test_capture_with_batch_one_example_stays_dynamic():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no silent fallback to symbolic_trace
        program = graphopt.capture(Net(), kwargs=text_inputs(batch=1, seq=4))
    assert program.ir == "aten"
    assert program.run(kwargs=text_inputs(3, 9))[0].shape == (3, 9, 8)
    single = graphopt.capture(Net(), kwargs=text_inputs(batch=1, seq=1))
    assert single.ir == "aten" and single.run(kwargs=text_inputs(2, 5))[0].shape == (2, 5, 8)


def test_static_capture_when_asked():
    program = graphopt.capture(Net(), kwargs=text_inputs(), dynamic_shapes=None)
    with pytest.raises(AssertionError, match="Guard failed"):  # the exported program's shape guard
        program.run(kwargs=text_inputs(3, 9))


def test_nodes_keep_their_module_path():
    program = graphopt.capture(Net(), kwargs=text_inputs())
    linear_paths = {n.meta["graphopt_module_path"] for n in program.graph.nodes if n.target == torch.ops.aten.linear.default}
    assert linear_paths == {"block.0.proj", "block.1.proj"}
    weights = {n.target: n.meta["graphopt_module_path"] for n in program.graph.nodes if n.op == "get_attr"}
    assert weights["block.1.proj.weight"] == "block.1.proj"


def test_user_model_is_not_modified():
    model = Net().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    program = graphopt.capture(model, kwargs=text_inputs())
    graphopt.optimize(program, "dce,dedup")
    assert model.training  # capture put a copy, not the model, in eval mode
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    # and the program owns its own tensors
    program.module.get_parameter("block.0.proj.weight").data.zero_()
    assert not torch.equal(model.block[0].proj.weight, torch.zeros(8, 8))


def test_capture_failure_names_module_path_and_source_line():
    with pytest.raises(CaptureError) as err:
        graphopt.capture(Net(data_dependent=True), kwargs=text_inputs())
    message = str(err.value)
    assert "in module 'block.1' (Block)" in message
    assert "if y.sum() > 0" in message
    assert "what to try" in message


def test_failure_on_example_inputs_is_reported_as_such():
    with pytest.raises(CaptureError, match="failed on the example inputs"):
        graphopt.capture(Net(), kwargs={"input_ids": torch.zeros(2, 3, dtype=torch.long)})


def test_non_module_is_rejected():
    with pytest.raises(CaptureError, match=r"nn.Module"):
        graphopt.capture(lambda x: x, (torch.ones(1),))


def test_fallback_to_symbolic_trace():
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match="fell back to torch.fx.symbolic_trace"):
        program = graphopt.capture(NumpyNet(), (x,))
    assert program.ir == "fx"
    assert "numpy" in program.meta["capture_fallback"]
    assert torch.equal(program.run()[0], program.reference_outputs[0])
    # passes that need the ATen graph are skipped, with the reason, not misapplied
    result = graphopt.optimize(program, "sdpa")
    assert result.report.passes[0].status == "skipped"
    assert "aten" in result.report.passes[0].reason
    # ... and a requested pass that could not run is a failure of the run, not a quiet skip
    assert any("pass 'sdpa' was requested but was skipped" in f for f in result.report.failures)


def test_a_fallback_fails_the_build_when_its_passes_need_aten():
    from graphopt.build import capture_problem
    from graphopt.recipe import Recipe

    with pytest.warns(UserWarning, match="fell back"):
        program = graphopt.capture(NumpyNet(), (torch.randn(3, 4),))
    # optional ATen passes count too: '?' allows finding nothing to do, not being unable to run
    problem = capture_problem(program, Recipe.from_dict({"pipeline": "dce,sdpa?,fused-attention"}))
    assert problem.startswith("capture fell back to torch.fx.symbolic_trace (could not capture NumpyNet")
    assert problem.endswith("cannot run: sdpa?, fused-attention")
    assert capture_problem(program, Recipe.from_dict({"pipeline": "dce,dedup"})) is None  # nothing requested needs ATen
    aten = graphopt.capture(Net(), kwargs=text_inputs())
    assert capture_problem(aten, Recipe.from_dict({"pipeline": "sdpa"})) is None


def test_no_fallback_when_disabled():
    with pytest.raises(CaptureError, match="numpy"):
        graphopt.capture(NumpyNet(), (torch.randn(3, 4),), fallback=False)

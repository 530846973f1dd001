"""Dead-code elimination: removes what is dead or an inference no-op, nothing else."""

import torch

import graphopt
from graphopt.passes.dce import DeadCodeElimination

aten = torch.ops.aten


class Noisy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 6)
        self.unused = torch.nn.Linear(6, 6)  # never called
        self.drop = torch.nn.Dropout(0.2)

    def forward(self, x):
        _dead = torch.sin(x) * 3  # computed, never used
        y = self.drop(self.fc(x)).to(torch.float32)
        return y.detach() + 1


class Clean(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 6)

    def forward(self, x):
        return torch.relu(self.fc(x))


def targets(program):
    return [n.target for n in program.graph.nodes if n.op == "call_function"]


def test_removes_dead_nodes_identities_and_unused_tensors():
    program = graphopt.capture(Noisy(), (torch.randn(2, 6),))
    before = program.run()
    result = DeadCodeElimination()(program)
    assert result.modified
    ops = targets(result.program)
    assert aten.sin.default not in ops and aten.dropout.default not in ops
    assert result.info.identities_removed >= 1 and result.info.dead_nodes_removed >= 1
    assert all(torch.equal(a, b) for a, b in zip(before, result.program.run()))
    names = {n for n, _ in result.program.module.named_parameters()}
    assert not any(n.startswith("unused") for n in names)


def test_clean_graph_is_not_modified():
    program = graphopt.capture(Clean(), (torch.randn(2, 6),))
    fingerprint = program.fingerprint()
    result = DeadCodeElimination()(program)
    assert result.modified is False
    assert result.program.fingerprint() == fingerprint


def test_options_turn_parts_off():
    program = graphopt.capture(Noisy(), (torch.randn(2, 6),))
    result = DeadCodeElimination(remove_identities=False, remove_unused_tensors=False)(program)
    assert aten.dropout.default in targets(result.program)
    assert result.info.tensors_removed == 0


def test_training_dropout_is_kept():
    class TrainDrop(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.dropout(x, 0.5, training=True) * 0 + x

    program = graphopt.capture(TrainDrop(), (torch.randn(2, 3),))
    result = DeadCodeElimination()(program)
    assert aten.dropout.default in targets(result.program)

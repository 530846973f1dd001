"""Weight de-duplication: identical tensors stored once, tied weights stay tied."""

import copy

import torch

import graphopt
from graphopt.passes.dedup import Deduplicate


class Twins(torch.nn.Module):
    """Two layers with equal (but separate) weights, and one different layer."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = copy.deepcopy(self.a)
        self.c = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 8)
        self.head = torch.nn.Linear(8, 20, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, ids):
        return self.head(self.embed(ids))


def test_identical_tensors_are_stored_once():
    program = graphopt.capture(Twins(), (torch.randn(2, 8),))
    stats_before = program.parameter_stats()
    before = program.run()
    result = Deduplicate()(program)
    assert result.modified
    assert result.info.tensors_merged == 2  # b.weight -> a.weight, b.bias -> a.bias
    assert result.info.bytes_saved == (8 * 8 + 8) * 4
    after = result.program.parameter_stats()
    assert after["parameters"] == stats_before["parameters"] - (8 * 8 + 8)
    readers = {n.target for n in result.program.graph.nodes if n.op == "get_attr"}
    assert readers == {"a.weight", "a.bias", "c.weight", "c.bias"}
    assert all(torch.equal(x, y) for x, y in zip(before, result.program.run()))


def test_distinct_tensors_are_not_merged():
    torch.manual_seed(0)

    class Distinct(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 8)
            self.c = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.c(self.a(x))

    program = graphopt.capture(Distinct(), (torch.randn(2, 8),))
    fingerprint = program.fingerprint()
    result = Deduplicate()(program)
    assert result.modified is False and result.program.fingerprint() == fingerprint


def test_min_numel_skips_small_tensors():
    program = graphopt.capture(Twins(), (torch.randn(2, 8),))
    result = Deduplicate(min_numel=9)(program)
    assert result.info.tensors_merged == 1  # only the 8x8 weight, not the 8-element bias


def test_tied_weights_stay_tied():
    program = graphopt.capture(Tied(), (torch.randint(0, 20, (2, 5)),))
    result = graphopt.optimize(program, "dce,dedup")
    tensors = result.program.tensors()
    storages = {t.untyped_storage().data_ptr() for t in tensors.values()}
    assert len(storages) == 1
    assert result.program.parameter_stats()["parameters"] == 20 * 8

"""The rewrite-rule driver on small hand-built ATen graphs."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from graphopt.rewrite import Match, NoMatch, RewriteRule, apply_rules, emit, only_user

aten = torch.ops.aten


def _add_zero_match(node: fx.Node) -> Match | NoMatch:
    x, other = node.args[:2]
    if other != 0:
        return NoMatch("zero", f"adds {other!r}, not 0")
    return Match(root=node, nodes=(node,), bindings={"x": x})


ADD_ZERO = RewriteRule("add_zero", frozenset({aten.add.Tensor}), _add_zero_match, lambda graph, m: m.bindings["x"])


def _neg_neg_match(node: fx.Node) -> Match | NoMatch:
    inner = node.args[0]
    if not isinstance(inner, fx.Node) or inner.target is not aten.neg.default:
        return NoMatch("inner_neg", "input is not a neg")
    user = only_user(inner)
    if isinstance(user, NoMatch):
        return user
    return Match(root=node, nodes=(inner, node), bindings={"x": inner.args[0]})


# neg(neg(x)) → mul(x, 1): creates a node, so provenance can be checked.
NEG_NEG = RewriteRule("neg_neg", frozenset({aten.neg.default}), _neg_neg_match,
                      lambda graph, m: emit(graph, aten.mul.Tensor, (m.bindings["x"], 1.0)))


def _graph(build) -> fx.GraphModule:
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(build(graph, x))
    return fx.GraphModule(torch.nn.Module(), graph)


def test_applies_to_fixpoint_and_counts_per_rule():
    def build(g, x):
        y = x
        for _ in range(3):
            y = g.call_function(aten.add.Tensor, (y, 0))
        return g.call_function(aten.neg.default, (g.call_function(aten.neg.default, (y,)),))

    gm = _graph(build)
    stats = apply_rules(gm, [ADD_ZERO, NEG_NEG])
    gm.recompile()
    assert stats.applied == {"add_zero": 3, "neg_neg": 1} and stats.total == 4
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [aten.mul.Tensor]
    x = torch.randn(3)
    torch.testing.assert_close(gm(x), x)


def test_near_misses_name_node_rule_and_check():
    gm = _graph(lambda g, x: g.call_function(aten.add.Tensor, (x, 2)))
    stats = apply_rules(gm, [ADD_ZERO])
    assert stats.total == 0
    (miss,) = stats.near_misses
    assert (miss.node, miss.rule, miss.check) == ("add_tensor", "add_zero", "zero") and "2" in miss.reason
    assert miss.to_dict()["check"] == "zero"


def test_single_user_check_and_its_reason():
    def build(g, x):
        inner = g.call_function(aten.neg.default, (x,))
        outer = g.call_function(aten.neg.default, (inner,))
        return (outer, inner)  # inner escapes as an output

    stats = apply_rules(_graph(build), [NEG_NEG])
    checks = {(m.node, m.check) for m in stats.near_misses}
    assert ("neg_default_1", "single_user") in checks  # the outer neg: its input has 2 users
    assert ("neg_default", "inner_neg") in checks


def test_provenance_and_module_metadata_copied_to_new_nodes():
    def build(g, x):
        inner = g.call_function(aten.neg.default, (x,))
        outer = g.call_function(aten.neg.default, (inner,))
        outer.meta["nn_module_stack"] = {"m": ("blocks.0", "Block")}
        outer.meta["graphopt_module_path"] = "blocks.0"
        return outer

    gm = _graph(build)
    apply_rules(gm, [NEG_NEG], provenance="mypass")
    (new,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert new.meta["graphopt_created_by"] == "mypass:neg_neg"
    assert new.meta["graphopt_module_path"] == "blocks.0" and "nn_module_stack" in new.meta


def test_metadata_assertions_do_not_count_as_users_and_are_erased():
    def build(g, x):
        inner = g.call_function(aten.neg.default, (x,))
        g.call_function(aten._assert_tensor_metadata.default, (inner,), {"dtype": torch.float32})
        return g.call_function(aten.neg.default, (inner,))

    gm = _graph(build)
    assert apply_rules(gm, [NEG_NEG], debug=True).total == 1
    assert aten._assert_tensor_metadata.default not in {n.target for n in gm.graph.nodes}


def test_nomatch_is_falsy_and_prints_check():
    miss = NoMatch("softmax_dim", "softmax over dim 1")
    assert not miss and str(miss) == "softmax_dim: softmax over dim 1"


def test_rules_that_never_settle_are_stopped():
    def flip_match(node):
        return Match(root=node, nodes=(node,), bindings={})

    flip = RewriteRule("flip", frozenset({aten.neg.default}), flip_match,
                       lambda graph, m: emit(graph, aten.neg.default, m.root.args))
    with pytest.raises(RuntimeError, match="fixpoint"):
        apply_rules(_graph(lambda g, x: g.call_function(aten.neg.default, (x,))), [flip], max_sweeps=5)

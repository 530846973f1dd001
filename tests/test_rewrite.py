"""The rewrite-rule driver on small hand-built ATen graphs."""

from __future__ import annotations

import pytest
import torch
from torch import fx

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


# ---- rules over captured graphs (FakeTensor values on every node) ---------------------------
class _MaskedAttention(torch.nn.Module):
    """SDPA with a boolean mask, heads merged the way transformers' SDPA attention does."""

    def forward(self, q, k, v, keep):
        b, _h, s, d = q.shape
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return out.reshape(b, -1, s, d).transpose(1, 2).contiguous().reshape(b, s, -1)


def _masked_attention_program():
    import graphopt

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=gen) for _ in range(3))
    keep = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    keep[1, ..., 3:] = False
    return graphopt.capture(_MaskedAttention().eval(), (q, k, v, keep), dynamic_shapes=None)


def _additive_sdpa_match(node: fx.Node) -> Match | NoMatch:
    from graphopt.attention.masks import is_boolean

    if len(node.args) < 4 or not is_boolean(node.args[3]):
        return NoMatch("mask", "no boolean mask")
    return Match(root=node, nodes=(node,), bindings={})


def _additive_sdpa_replace(graph: fx.Graph, m: Match) -> fx.Node:
    from graphopt.attention.masks import additive_mask

    q, k, v, keep = m.root.args[:4]
    return emit(graph, m.root.target, (q, k, v, additive_mask(graph, keep, torch.float32)), dict(m.root.kwargs))


def test_a_rule_that_converts_a_boolean_mask_stamps_every_created_node():
    program = _masked_attention_program()
    rule = RewriteRule("additive_mask", frozenset({aten.scaled_dot_product_attention.default}), _additive_sdpa_match, _additive_sdpa_replace)
    stats = apply_rules(program.module, [rule], provenance="masks")
    program.module.recompile()
    # the final sweep sees the new SDPA node, whose mask is additive now: a near miss, not a loop
    assert stats.applied == {"additive_mask": 1} and [m.check for m in stats.near_misses] == ["mask"]
    created = [n for n in program.graph.nodes if n.meta.get("graphopt_created_by") == "masks:additive_mask"]
    assert [n.target for n in created] == [aten.scalar_tensor.default, aten.where.ScalarOther, aten.scaled_dot_product_attention.default]
    assert created[1].meta["val"].dtype == torch.float32 and tuple(created[1].meta["val"].shape) == (2, 1, 5, 5)
    assert torch.equal(program.run()[0], program.reference_outputs[0])


def test_heads_merge_accepts_a_reshape_to_the_same_shape_first():
    from graphopt.attention.analysis import heads_merged_output

    program = _masked_attention_program()
    (sdpa,) = [n for n in program.graph.nodes if n.target is aten.scaled_dot_product_attention.default]
    root, chain = heads_merged_output(sdpa)
    assert [n.target for n in chain] == [aten.reshape.default, aten.transpose.int, aten.contiguous.default, aten.reshape.default]
    assert root is chain[-1] and root.meta["val"].dim() == 3
    reshape = chain[0]
    reshape.args = (reshape.args[0], [2, 5, 3, 4])  # now it really moves data: no longer the pattern
    reshape.meta["val"] = reshape.meta["val"].reshape(2, 5, 3, 4)
    miss = heads_merged_output(sdpa)
    assert isinstance(miss, NoMatch) and miss.check == "head_merge"

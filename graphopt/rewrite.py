"""Rewrite rules as data, and a driver that applies them to a fixpoint.

A :class:`RewriteRule` names the ops that can anchor it, a ``match(node)`` check that
returns a :class:`Match` or a :class:`NoMatch` saying which check failed and why, and a
``replace(graph, match)`` that builds the new sub-graph (inserted just before
``match.root``) and returns the node that takes over ``match.root``'s uses.
:func:`apply_rules` runs the rules over a GraphModule until none applies, erases the
matched nodes left dead, stamps provenance on the nodes it created, and reports counts
per rule and the near-misses (anchors whose match failed) of the final sweep.

Rules are plain functions of fx nodes, in the spirit of tinygrad's ``PatternMatcher``
and the onnxscript rewriter's match tracer; the pass manager is the only pass machinery.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from graphopt.program import module_path
from graphopt.surgery import fake_mode, stamp

log = logging.getLogger(__name__)

aten = torch.ops.aten

# Users that only assert metadata: they do not consume a value, so a node used by one
# of them still counts as single-use, and they die with the node they check.
METADATA_USERS = frozenset({aten._assert_tensor_metadata.default})


@dataclass(frozen=True)
class Match:
    """A successful match: the pattern's nodes, the node to replace, and what ``replace`` needs."""

    root: fx.Node
    nodes: tuple[fx.Node, ...]
    bindings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NoMatch:
    """A failed match: ``check`` is the short name of the failing check, ``reason`` the detail."""

    check: str
    reason: str

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return f"{self.check}: {self.reason}"


@dataclass(frozen=True)
class RewriteRule:
    name: str
    anchors: frozenset  # op targets a match may start from; every such node is a candidate
    match: Callable[[fx.Node], Match | NoMatch]
    replace: Callable[[fx.Graph, Match], fx.Node]


@dataclass(frozen=True)
class NearMiss:
    node: str
    module_path: str
    rule: str
    check: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"node": self.node, "module_path": self.module_path, "rule": self.rule, "check": self.check, "reason": self.reason}


def describe_near_misses(near_misses: list[NearMiss], limit: int, *, with_rule: bool = False) -> str:
    """The first ``limit`` near misses, one clause each, and how many more there were."""
    shown = "; ".join(f"{m.node} ({m.module_path or 'top'}): {f'{m.rule}: ' if with_rule else ''}{m.check}: {m.reason}" for m in near_misses[:limit])
    more = f" and {len(near_misses) - limit} more" if len(near_misses) > limit else ""
    return shown + more


@dataclass
class RewriteStats:
    applied: dict[str, int]
    near_misses: list[NearMiss]
    sweeps: int = 0

    @property
    def total(self) -> int:
        return sum(self.applied.values())


# ---- helpers for rules ----------------------------------------------------------------
def real_users(node: fx.Node) -> list[fx.Node]:
    """The users that consume ``node``'s value (metadata assertions left out)."""
    return [user for user in node.users if user.target not in METADATA_USERS]


def only_user(node: fx.Node) -> fx.Node | NoMatch:
    """``node``'s single consumer, or a NoMatch naming how many it has."""
    users = real_users(node)
    if len(users) == 1:
        return users[0]
    names = ", ".join(u.name for u in users) or "none (a graph output?)"
    return NoMatch("single_user", f"'{node.name}' has {len(users)} users ({names}); its value escapes the pattern")


def fake(node: Any) -> Any:
    """The FakeTensor (``meta['val']``) of a node, or the value itself for non-nodes."""
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def emit(graph: fx.Graph, target: Any, args: tuple = (), kwargs: dict | None = None) -> fx.Node:
    """Add ``target(*args, **kwargs)`` at the insertion point, with its FakeTensor in ``meta['val']``."""
    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    inputs = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, fx.Node)]
    if any(fake(a) is None for a in inputs):
        return node  # an input without a value: nothing to propagate from
    fake_args, fake_kwargs = pytree.tree_map_only(fx.Node, fake, (args, kwargs))
    # A node built from constants alone (scalar_tensor) still needs the graph's fake mode.
    mode = torch._guards.detect_fake_mode(pytree.tree_leaves((fake_args, fake_kwargs))) or fake_mode(graph)
    if mode is not None:
        with mode:
            node.meta["val"] = target(*fake_args, **fake_kwargs)
    return node


# ---- the driver -----------------------------------------------------------------------
def apply_rules(
    graph_module: fx.GraphModule,
    rules: Iterable[RewriteRule],
    *,
    debug: bool = False,
    provenance: str = "rewrite",
    max_sweeps: int = 100,
) -> RewriteStats:
    """Apply ``rules`` to ``graph_module`` in place until none matches.

    New nodes get ``meta['graphopt_created_by'] = f"{provenance}:{rule.name}"`` and the
    module provenance of the node they replace. With ``debug`` every attempt is logged
    and the graph is linted after each rewrite, so a broken rule is caught by name.
    The pass manager (the pass contract) cleans up and recompiles after a changed pass.
    """
    rules = tuple(rules)
    graph = graph_module.graph
    applied = {rule.name: 0 for rule in rules}
    near: dict[tuple[str, str], NearMiss] = {}
    for sweep in range(1, max_sweeps + 1):
        near = {}
        changed = False
        erased: set[fx.Node] = set()
        for node in list(graph.nodes):
            if node in erased or node.op != "call_function":
                continue
            for rule in rules:
                if node.target not in rule.anchors:
                    continue
                result = rule.match(node)
                if log.isEnabledFor(logging.DEBUG) and debug:
                    log.debug("rule %s at %s: %s", rule.name, node.name, "match" if result else result)
                if isinstance(result, NoMatch):
                    near[(node.name, rule.name)] = NearMiss(node.name, module_path(node), rule.name, result.check, result.reason)
                    continue
                erased |= _rewrite(graph, rule, result, provenance)
                applied[rule.name] += 1
                changed = True
                if debug:
                    graph.lint()
                break
        if not changed:
            return RewriteStats(applied, list(near.values()), sweep)
    raise RuntimeError(f"rewrite rules {[r.name for r in rules]} did not reach a fixpoint in {max_sweeps} sweeps")


def _rewrite(graph: fx.Graph, rule: RewriteRule, match: Match, provenance: str) -> set[fx.Node]:
    before = set(graph.nodes)
    with graph.inserting_before(match.root):
        new = rule.replace(graph, match)
    for created in graph.nodes:
        if created not in before:
            stamp(created, f"{provenance}:{rule.name}", match.root)
    match.root.replace_all_uses_with(new)
    erased = set()
    for node in sorted(set(match.nodes), key=_position(graph), reverse=True):
        for user in [u for u in node.users if u.target in METADATA_USERS]:
            graph.erase_node(user)
            erased.add(user)
        if not node.users:
            graph.erase_node(node)
            erased.add(node)
    return erased


def _position(graph: fx.Graph) -> Callable[[fx.Node], int]:
    order = {node: i for i, node in enumerate(graph.nodes)}
    return order.__getitem__

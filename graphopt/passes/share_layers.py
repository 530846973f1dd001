"""Cross-layer parameter sharing (ALBERT-style): layers in a group read one set of weights.

Layers are the repeated blocks of the largest stack (``encoder.layer.3``, ``h.0``,
``layers.11``, ...), found from tensor names as :mod:`graphopt.taps` finds blocks. A
*role* is a tensor's name inside its block (``attention.self.query.weight``); tensors of
one role and shape are comparable across layers. The pass

1. measures the distance between every two layers: the mean over roles in ``scope`` of
   ``‖a − b‖ / ‖a‖`` (0: identical; ~1.4 for unrelated random weights), reported as
   ``distance``;
2. chooses groups: named ones (``groups``), the best partition into ``unique`` runs of
   consecutive layers (least total distance to each group's mean, by dynamic
   programming), or, by default, layers whose distance is at most ``max_distance``
   (0: identical weights only — then the pass is exact);
3. ties each group: every member's ``get_attr`` reads one tensor, the group mean or the
   representative member (the one closest to the others). The shared tensor is one
   attribute: stored once in the program and in ONNX, trained as one tensor by ``distill``.

``scope`` picks which roles are tied: ``block`` (all), ``attention`` (names containing
``attn``/``attention``) or ``ffn`` (the rest). ``tie_embeddings`` also points an LM head
whose weight has the embedding table's shape at that table (input/output sharing).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

import torch
import torch.fx as fx
from pydantic import Field, model_validator

from graphopt.passbase import Pass, PassConfig, PassResult, register_pass
from graphopt.surgery import remove_unused_tensors
from graphopt.program import Program

aten = torch.ops.aten
_LAYER = re.compile(r"^(?P<stack>(?:.*\.)?(?:layer|layers|h|block|blocks))\.(?P<index>\d+)\.(?P<role>.+)$")
_ATTENTION = re.compile(r"attn|attention")


class ShareLayersConfig(PassConfig):
    unique: int | None = Field(None, ge=1, description="target count of unique layers (consecutive groups)")
    groups: tuple[tuple[int, ...], ...] | None = Field(None, description="explicit groups of layer indices")
    max_distance: float = Field(0.0, ge=0, description="without unique/groups: tie layers at most this far apart")
    scope: Literal["block", "attention", "ffn"] = "block"
    tie: Literal["mean", "representative"] = "mean"
    tie_embeddings: bool = Field(False, description="point an LM head of the embedding's shape at the embedding table")

    @model_validator(mode="after")
    def _one_choice(self):
        if self.unique is not None and self.groups is not None:
            raise ValueError("give either unique or groups, not both")
        if self.groups is not None:
            flat = [i for g in self.groups for i in g]
            if len(flat) != len(set(flat)):
                raise ValueError(f"groups overlap: {self.groups}")
        return self


@register_pass
class ShareLayers(Pass):
    """Tie the weights of similar layers (ALBERT-style sharing). Exact when the tied
    layers were identical; lossy otherwise (follow with distill)."""

    name: ClassVar[str] = "share-layers"
    exact: ClassVar[bool] = False
    Config: ClassVar[type[PassConfig]] = ShareLayersConfig

    def run(self, program: Program) -> PassResult:
        cfg = self.config
        gm = program.module
        stack, layers = find_layers(gm, cfg.scope)
        info: dict[str, Any] = {"stack": stack, "layers": len(layers)}
        groups: list[list[int]] = []
        if len(layers) >= 2:
            distance = layer_distances(gm, layers)
            info["distance"] = [[round(d, 4) for d in row] for row in distance.tolist()]
            groups = self._choose(distance, sorted(layers))
        tied = [g for g in groups if len(g) > 1]
        saved = sum(_tie(gm, layers, g, cfg.tie) for g in tied)
        head = tie_lm_head(gm) if cfg.tie_embeddings else None
        info.update({"groups": tied, "unique_layers": len(groups) if groups else len(layers), "bytes_saved": saved, "lm_head_tied": head})
        if not tied and head is None:
            return PassResult(program, False, info)
        info["tensors_removed"] = len(remove_unused_tensors(gm))
        gm.graph.lint()
        gm.recompile()
        return PassResult(program, True, info)

    def _choose(self, distance: torch.Tensor, indices: list[int]) -> list[list[int]]:
        cfg = self.config
        if cfg.groups is not None:
            unknown = sorted(set(i for g in cfg.groups for i in g) - set(indices))
            if unknown:
                raise ValueError(f"share-layers: no layers {unknown} (layers are {indices})")
            named = [list(g) for g in cfg.groups]
            rest = sorted(set(indices) - set(i for g in named for i in g))
            return named + [[i] for i in rest]
        if cfg.unique is not None:
            return consecutive_groups(distance, min(cfg.unique, len(indices)), indices)
        groups: list[list[int]] = []
        for pos, index in enumerate(indices):
            home = next((g for g in groups if all(distance[indices.index(m), pos] <= cfg.max_distance for m in g)), None)
            (home.append(index) if home is not None else groups.append([index]))
        return groups


# ---- analysis ------------------------------------------------------------------------------
def find_layers(gm: fx.GraphModule, scope: str = "block") -> tuple[str, dict[int, dict[str, str]]]:
    """The largest stack of layers: ``{index: {role: tensor name}}`` for roles in ``scope``."""
    stacks: dict[str, dict[int, dict[str, str]]] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        match = _LAYER.match(node.target)
        if not match or not isinstance(_get(gm, node.target), torch.Tensor):
            continue
        role = match["role"]
        if scope != "block" and bool(_ATTENTION.search(role)) != (scope == "attention"):
            continue
        stacks.setdefault(match["stack"], {}).setdefault(int(match["index"]), {})[role] = node.target
    if not stacks:
        return "", {}
    stack = max(stacks, key=lambda s: len(stacks[s]))
    layers = stacks[stack]
    # Only roles every layer has, with one shape, are comparable.
    common = set.intersection(*(set(roles) for roles in layers.values()))
    common = {r for r in common if len({tuple(_get(gm, layers[i][r]).shape) for i in layers}) == 1}
    return stack, {i: {r: layers[i][r] for r in sorted(common)} for i in sorted(layers)}


def layer_distances(gm: fx.GraphModule, layers: dict[int, dict[str, str]]) -> torch.Tensor:
    """[L, L]: mean over roles of ‖a − b‖ / ‖a‖ (row layer a, column layer b)."""
    indices = sorted(layers)
    roles = list(layers[indices[0]])
    size = len(indices)
    total = torch.zeros(size, size)
    for role in roles:
        flat = torch.stack([_get(gm, layers[i][role]).detach().float().reshape(-1) for i in indices])
        norms = flat.norm(dim=1).clamp_min(1e-12)
        total += torch.cdist(flat, flat) / norms[:, None]
    return total / max(len(roles), 1)


def consecutive_groups(distance: torch.Tensor, unique: int, indices: list[int]) -> list[list[int]]:
    """Split layers into ``unique`` runs minimising the summed distance to each run's medoid."""
    n = len(indices)

    def cost(i: int, j: int) -> float:  # layers i..j-1 as one group
        block = distance[i:j, i:j]
        return float(block.sum(dim=0).min())

    best = [[float("inf")] * (unique + 1) for _ in range(n + 1)]
    cut = [[0] * (unique + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for j in range(1, n + 1):
        for g in range(1, min(unique, j) + 1):
            for i in range(g - 1, j):
                value = best[i][g - 1] + cost(i, j)
                if value < best[j][g]:
                    best[j][g], cut[j][g] = value, i
    groups, j = [], n
    for g in range(unique, 0, -1):
        i = cut[j][g]
        groups.append(indices[i:j])
        j = i
    return groups[::-1]


# ---- rewrite -------------------------------------------------------------------------------
def _tie(gm: fx.GraphModule, layers: dict[int, dict[str, str]], group: list[int], how: str) -> int:
    """Point every member's get_attr at the first member's tensor, set to the mean or medoid."""
    keeper = group[0]
    saved = 0
    if how == "representative":
        sub = layer_distances(gm, {i: layers[i] for i in group})
        medoid = group[int(sub.sum(dim=0).argmin())]
    for role, name in layers[keeper].items():
        members = [_get(gm, layers[i][role]) for i in group]
        if how == "mean":
            value = torch.stack([m.detach() for m in members]).mean(dim=0)
        else:
            value = _get(gm, layers[medoid][role]).detach().clone()
        _set(gm, name, value.to(members[0].dtype))
        for i in group[1:]:
            other = layers[i][role]
            saved += members[0].numel() * members[0].element_size()
            for node in gm.graph.nodes:
                if node.op == "get_attr" and node.target == other:
                    node.target = name
    return saved


def tie_lm_head(gm: fx.GraphModule) -> str | None:
    """Point the output projection (a weight shaped like the embedding table, read by a
    linear/matmul) at the embedding table. Returns the head's old name, or None."""
    tables = [n.args[0] for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.embedding.default and n.args[0].op == "get_attr"]
    if not tables:
        return None
    table = tables[0]
    shape = tuple(_get(gm, table.target).shape)
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target == table.target:
            continue
        tensor = _get(gm, node.target)
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
            continue
        if any(u.target in (aten.linear.default, aten.t.default, aten.permute.default, aten.matmul.default) for u in node.users):
            old = node.target
            for other in [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == old]:
                other.target = table.target
            return old
    return None


def _get(gm: torch.nn.Module, name: str) -> Any:
    value = gm
    for part in name.split("."):
        value = getattr(value, part, None)
    return value


def _set(gm: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    old = getattr(owner, attr)
    if isinstance(old, torch.nn.Parameter):
        setattr(owner, attr, torch.nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        owner.register_buffer(attr, value)

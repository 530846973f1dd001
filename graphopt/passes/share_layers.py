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
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import fx

from graphopt.context import PassContext
from graphopt.passbase import Pass, PassConfig, PassInfo, PassResult, register_pass
from graphopt.program import Program
from graphopt.surgery import get_tensor, has_tensor, set_tensor

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

    @property
    def identical_only(self) -> bool:
        """Only layers with equal weights can be tied (and no LM head is re-pointed)."""
        return self.max_distance == 0 and self.unique is None and self.groups is None and not self.tie_embeddings


class ShareLayersInfo(PassInfo):
    stack: str = ""  # the stack of repeated layers, e.g. "encoder.layer"
    layers: int = 0
    distance: list[list[float]] = []  # [L, L] mean relative distance between layers
    groups: list[list[int]] = []  # the tied groups (two or more layers each)
    unique_layers: int = 0
    bytes_saved: int = 0
    lm_head_tied: str | None = None  # the LM head's old tensor name, when tie_embeddings re-pointed it


@register_pass
class ShareLayers(Pass):
    """Tie the weights of similar layers (ALBERT-style sharing). Exact when the tied
    layers were identical; lossy otherwise (follow with distill)."""

    name: ClassVar[str] = "share-layers"
    Config: ClassVar[type[PassConfig]] = ShareLayersConfig
    config: ShareLayersConfig  # the validated options (narrowed from PassConfig for type checkers)
    Info: ClassVar[type[PassInfo]] = ShareLayersInfo

    @classmethod
    def is_exact(cls, config: ShareLayersConfig) -> bool:
        # With max_distance=0 a group holds layers whose weights are equal (torch.equal, not
        # a distance that rounds to 0), and the tie keeps them as they are.
        return config.identical_only

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        cfg = self.config
        gm = program.module
        stack, layers = find_layers(gm, cfg.scope)
        info = ShareLayersInfo(stack=stack, layers=len(layers), unique_layers=len(layers))
        groups: list[list[int]] = []
        if len(layers) >= 2:
            distance = layer_distances(gm, layers)
            info.distance = [[round(d, 4) for d in row] for row in distance.tolist()]
            if cfg.groups is not None:
                unknown = sorted({i for g in cfg.groups for i in g} - set(layers))
                if unknown:
                    return PassResult.skipped(program, f"groups name layers {unknown} the program does not have (layers of '{stack}' are {sorted(layers)})", info)
            groups = self._choose(gm, layers, distance)
        tied = [g for g in groups if len(g) > 1]
        info.bytes_saved = sum(_tie(gm, layers, g, cfg.tie) for g in tied)
        info.lm_head_tied = tie_lm_head(gm) if cfg.tie_embeddings else None
        info.groups, info.unique_layers = tied, (len(groups) if groups else len(layers))
        return PassResult.of(program, bool(tied) or info.lm_head_tied is not None, info, self._why_unchanged(stack, layers))

    def _why_unchanged(self, stack: str, layers: dict) -> str:
        cfg = self.config
        if len(layers) < 2:
            return f"no stack of two or more repeated layers found{f' ({stack!r} has {len(layers)})' if stack else ''}"
        what = "identical" if cfg.max_distance == 0 else f"within max_distance={cfg.max_distance}"
        why = f"no two of the {len(layers)} layers of '{stack}' are {what}" if cfg.unique is None and cfg.groups is None else "every group has one layer"
        return why + ("; no LM head shaped like the embedding table" if cfg.tie_embeddings else "")

    def _choose(self, gm: fx.GraphModule, layers: dict[int, dict[str, str]], distance: torch.Tensor) -> list[list[int]]:
        cfg = self.config
        indices = sorted(layers)
        if cfg.groups is not None:
            named = [list(g) for g in cfg.groups]
            rest = sorted(set(indices) - {i for g in named for i in g})
            return named + [[i] for i in rest]
        if cfg.unique is not None:
            return consecutive_groups(distance, min(cfg.unique, len(indices)), indices)

        def close(a: int, b: int) -> bool:
            if cfg.max_distance == 0:
                return layers_equal(gm, layers, a, b)
            return float(distance[indices.index(a), indices.index(b)]) <= cfg.max_distance

        groups: list[list[int]] = []
        for index in indices:
            home = next((g for g in groups if all(close(m, index) for m in g)), None)
            (home.append(index) if home is not None else groups.append([index]))
        return groups


# ---- analysis ------------------------------------------------------------------------------
def find_layers(gm: fx.GraphModule, scope: str = "block") -> tuple[str, dict[int, dict[str, str]]]:
    """The largest stack of layers: ``{index: {role: tensor name}}`` for roles in ``scope``."""
    stacks: dict[str, dict[int, dict[str, str]]] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        match = _LAYER.match(str(node.target))
        if not match or not has_tensor(gm, str(node.target)) or not isinstance(get_tensor(gm, str(node.target)), torch.Tensor):
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
    common = {r for r in common if len({tuple(get_tensor(gm, layers[i][r]).shape) for i in layers}) == 1}
    return stack, {i: {r: layers[i][r] for r in sorted(common)} for i in sorted(layers)}


def layer_distances(gm: fx.GraphModule, layers: dict[int, dict[str, str]]) -> torch.Tensor:
    """[L, L]: mean over roles of ‖a − b‖ / ‖a‖ (row layer a, column layer b)."""
    indices = sorted(layers)
    roles = list(layers[indices[0]])
    size = len(indices)
    total = torch.zeros(size, size)
    for role in roles:
        flat = torch.stack([get_tensor(gm, layers[i][role]).detach().float().reshape(-1) for i in indices])
        norms = flat.norm(dim=1).clamp_min(1e-12)
        # Direct differences: the matmul form of cdist (used from 25 rows on) cancels and can
        # give 0 for layers that differ or a non-zero distance for identical ones.
        total += torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist") / norms[:, None]
    return total / max(len(roles), 1)


def layers_equal(gm: fx.GraphModule, layers: dict[int, dict[str, str]], a: int, b: int) -> bool:
    """Whether layers ``a`` and ``b`` hold equal tensors in every compared role."""
    return all(torch.equal(get_tensor(gm, layers[a][role]), get_tensor(gm, layers[b][role])) for role in layers[a])


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
    """Point every member's get_attr at the first member's tensor, set to the mean or medoid
    (members that are all equal keep their value as it is: a mean would round it)."""
    keeper = group[0]
    saved = 0
    medoid = keeper
    if how == "representative":
        sub = layer_distances(gm, {i: layers[i] for i in group})
        medoid = group[int(sub.sum(dim=0).argmin())]
    for role, name in layers[keeper].items():
        members = [get_tensor(gm, layers[i][role]) for i in group]
        if all(torch.equal(members[0], m) for m in members[1:]):
            value = members[0].detach().clone()
        elif how == "mean":
            value = torch.stack([m.detach() for m in members]).mean(dim=0)
        else:
            value = get_tensor(gm, layers[medoid][role]).detach().clone()
        set_tensor(gm, name, value.to(members[0].dtype))
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
    tables = [n.args[0] for n in gm.graph.nodes if n.target is aten.embedding.default and isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr"]
    if not tables:
        return None
    table = tables[0]
    shape = tuple(get_tensor(gm, str(table.target)).shape)
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target == table.target or not has_tensor(gm, str(node.target)):
            continue
        tensor = get_tensor(gm, str(node.target))
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
            continue
        if any(u.target in (aten.linear.default, aten.t.default, aten.permute.default, aten.matmul.default) for u in node.users):
            old = str(node.target)
            for other in [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == old]:
                other.target = table.target
            return old
    return None


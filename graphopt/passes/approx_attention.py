"""``aten.scaled_dot_product_attention`` → Nyström, LSH or Hedgehog attention above a length (lossy).

Each chosen SDPA node becomes ``graphopt::nystrom_attention``, ``graphopt::lsh_attention``
or ``graphopt::hedgehog_attention`` (see :mod:`graphopt.attention`), which stay exact at or
below ``threshold`` tokens, at run time, in PyTorch and in ONNX alike. Nyström and LSH are
training-free; Hedgehog (an exact window of ``block`` tokens and ``sinks`` sink tokens,
learned linear attention for the rest) has trainable feature maps, registered as program
parameters at an identity initialisation: ``attention-transfer`` fits them to the exact
attention and ``distill`` fine-tunes the whole, so the pipeline is
``approx-attention{method=hedgehog},attention-transfer,distill``. Hedgehog is exact while
the sequence fits in one block. ``linformer`` (learned sequence projections of keys and
values) and ``nystrom-learned`` (Nyström with learned landmark pooling) learn a
(landmarks x ``max_tokens``) pooling, initialised at segment means (so Linformer is exact
with as many landmarks as tokens, and ``nystrom-learned`` starts as ``nystrom``); they
have no causal form (:mod:`graphopt.attention.pooled`). Choice by layer: ``layers`` lists indices among the
graph's SDPA nodes in order (``None``: all). Approximate attention keeps a key bias only,
so a node's mask must act, on the example inputs, as key padding (or, for LSH, causal plus
key padding); other nodes stay exact and the info says why. Masks are the ones
transformers builds: the additive ``where(mask, 0, finfo.min)`` of eager attention, or the
boolean mask (True = attend) of SDPA attention, whose key row is converted in the graph to
that additive bias (:mod:`graphopt.attention.masks`).

Error accounting: for every candidate layer the pass runs the approximation, forced on
(threshold 0), on that layer's real q, k, v from the example inputs and records the
relative error ‖approx − exact‖ / ‖exact‖ with the sequence length it was measured at.
Layers whose error passes ``max_layer_error`` stay exact. The manager then checks the whole
program against the recipe's budget; a pipeline with one ``approx-attention{layers=[i]}``
per layer lets the budget reject layers one by one.

"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import fx

import graphopt.attention  # noqa: F401  (registers the custom ops, declares their lowerings)
from graphopt.attention import pooled, reference
from graphopt.attention.analysis import (
    SDPA,
    SDPASite,
    classify_mask,
    sdpa_nodes,
    sdpa_values,
)
from graphopt.attention.masks import additive_mask, additive_values, is_boolean
from graphopt.context import PassContext
from graphopt.passbase import Pass, PassConfig, PassInfo, PassResult, register_pass
from graphopt.program import Program
from graphopt.rewrite import Match, NoMatch, RewriteRule, apply_rules, emit, fake
from graphopt.surgery import add_constant, add_parameter

FEATURE_MAP_NAMES = ("wq", "bq", "wk", "bk", "mix")
TRAINED = ("hedgehog", "linformer", "nystrom-learned")  # methods with trainable weights (attention-transfer)
# The learned-pooling methods: their op and the names of its trainable inputs.
POOLED = {
    "linformer": (torch.ops.graphopt.linformer_attention.default, ("proj_k", "proj_v")),
    "nystrom-learned": (torch.ops.graphopt.nystrom_learned_attention.default, ("pool",)),
}


def hedgehog_init(heads: int, head_dim: int, features: int) -> tuple[torch.Tensor, ...]:
    """Initial Hedgehog feature maps (wq, bq, wk, bk, mix): W the identity (padded or cut to
    ``features`` columns), zero biases, mixing weight exp(0) = 1, for every head."""
    eye = torch.eye(head_dim, features).repeat(heads, 1, 1)
    zeros = torch.zeros(heads, 1, features)
    return eye, zeros, eye.clone(), zeros.clone(), torch.zeros(heads)

aten = torch.ops.aten
END = 9223372036854775807  # aten.slice's "to the end"


class ApproxAttentionConfig(PassConfig):
    method: Literal["nystrom", "lsh", "hedgehog", "linformer", "nystrom-learned"] = "nystrom"
    layers: tuple[int, ...] | None = None
    threshold: int | None = Field(None, ge=0, description="exact attention at or below this many tokens (None: 1024 for nystrom and lsh; 0 for the trained methods, which attention-transfer fits at the training length)")
    landmarks: int = Field(64, ge=1)
    iterations: int = Field(6, ge=1, le=50, description="Newton-Schulz steps of the landmark pseudo-inverse")
    buckets: int = Field(8, ge=1)
    rounds: int = Field(2, ge=1)
    chunk: int = Field(128, ge=1)
    seed: int = 0
    block: int = Field(64, ge=1, description="hedgehog: tokens per block; a query attends exactly to its own block and the previous one")
    sinks: int = Field(1, ge=1, description="hedgehog: leading tokens every query attends to exactly (attention sinks, e.g. [CLS])")
    features: int | None = Field(None, ge=1, description="hedgehog: feature-map width per sign (None: the head size); 2x this many features")
    max_tokens: int | None = Field(None, ge=1, description="linformer, nystrom-learned: the longest input the learned (landmarks x tokens) pooling covers")
    max_layer_error: float = Field(math.inf, gt=0, description="layers measured above this relative error stay exact")

    @field_validator("buckets")
    @classmethod
    def _even_buckets(cls, value: int) -> int:
        if value > 1 and value % 2:
            raise ValueError("buckets must be 1 or even (angular LSH takes the argmax over [xR, -xR])")
        return value

    @property
    def limit(self) -> int:
        """The threshold in effect."""
        if self.threshold is not None:
            return self.threshold
        return 0 if self.method in TRAINED else 1024

    @model_validator(mode="after")
    def _sinks_in_first_block(self):
        if self.method == "hedgehog" and self.sinks > self.block:
            raise ValueError(f"sinks ({self.sinks}) must fit in the first block (block={self.block})")
        if self.method in POOLED and self.max_tokens is None:
            raise ValueError(f"method={self.method} learns a pooling over token positions: give max_tokens, the longest input (e.g. 512 for BERT)")
        return self


class LayerRecord(BaseModel):
    """One candidate attention layer: what its mask does, the measured error, the decision."""

    model_config = ConfigDict(extra="forbid")
    layer: int
    node: str
    module_path: str
    method: str
    mask: str = ""  # "none", "key", "causal+key" or "general", on the example inputs
    boolean_mask: bool = False  # an SDPA boolean mask, converted to an additive key bias
    causal: bool = False
    seq: int | None = None  # the example's length, at which rel_error was measured
    rel_error: float | None = None  # ‖approx − exact‖ / ‖exact‖ of the layer, forced on
    active_at_example: bool | None = None  # the example is longer than the threshold
    applied: bool = False
    reason: str = ""  # why the layer stays exact


class ApproxAttentionInfo(PassInfo):
    replaced: int = 0
    attention_layers: int = 0
    threshold: int = 0
    layers: list[LayerRecord] = []
    unknown_layers: list[int] = []  # asked for, but the graph has no such attention layer


@register_pass
class ApproxAttention(Pass):
    """Replace attention above a length threshold by Nyström (low-rank) or LSH (hashing) attention."""

    name: ClassVar[str] = "approx-attention"
    Config: ClassVar[type[PassConfig]] = ApproxAttentionConfig
    Info: ClassVar[type[PassInfo]] = ApproxAttentionInfo
    requires_ir = ("aten",)
    config: ApproxAttentionConfig  # the validated options (narrowed from PassConfig for type checkers)

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        cfg = self.config
        sites = sdpa_nodes(program)
        chosen = [s for s in sites if cfg.layers is None or s.layer in cfg.layers]
        values = sdpa_values(program) if chosen else {}
        records, plans = [], {}
        for site in chosen:
            record, plan = self._plan(site, values.get(site.node.name))
            records.append(record)
            if record.applied:
                plans[site.node] = (site, plan)
        replaced = apply_rules(program.module, [self._rule(program, plans)], provenance=self.name).total if plans else 0
        missing = sorted(set(cfg.layers or ()) - {s.layer for s in sites})
        info = ApproxAttentionInfo(replaced=replaced, attention_layers=len(sites), threshold=cfg.limit, layers=records, unknown_layers=missing)
        return PassResult.of(program, replaced > 0, info, _unchanged_reason(sites, records, missing))

    # ---- analysis -------------------------------------------------------------------------
    def _plan(self, site: SDPASite, values) -> tuple[LayerRecord, dict]:
        record = LayerRecord(layer=site.layer, node=site.node.name, module_path=site.module_path, method=self.config.method, boolean_mask=is_boolean(site.mask))
        why = _unsupported(site)
        if not why and values is None:
            why = "no example values for this node"
        if why:
            return record.model_copy(update={"reason": why}), {}
        q_val, k_val, v_val, mask_val = values
        kind = classify_mask(mask_val, q_val.shape[-2], k_val.shape[-2])
        causal = site.is_causal or kind.kind == "causal+key"
        record = record.model_copy(update={"mask": kind.kind, "causal": causal})
        if kind.kind == "general":
            return record.model_copy(update={"reason": kind.reason}), {}
        if causal and self.config.method in ("nystrom", *POOLED):  # hedgehog and lsh have causal forms
            return record.model_copy(update={"reason": f"causal attention: {self.config.method}'s landmarks mix past and future (use method=hedgehog or lsh)"}), {}
        mask_val = additive_values(mask_val, q_val.dtype)
        key_bias = None if mask_val is None else mask_val[:, :1, -1:, :]
        scale = site.scale()
        rotations = reference.lsh_rotations(q_val.shape[-1], self.config.buckets, self.config.rounds, self.config.seed + site.layer)
        feature_maps = self._initial_weights(q_val.shape[1], q_val.shape[-1])
        with torch.no_grad():
            exact = reference.exact_attention(q_val, k_val, v_val, key_bias, scale, causal)
            approx = self._approximate(q_val, k_val, v_val, key_bias, scale, causal, rotations, feature_maps, threshold=0)
        error = reference.relative_error(approx, exact)
        seq = int(q_val.shape[-2])
        record = record.model_copy(update={"seq": seq, "rel_error": error, "active_at_example": seq > self.config.limit})
        if error > self.config.max_layer_error:
            return record.model_copy(update={"reason": f"relative error {error:.3g} > max_layer_error {self.config.max_layer_error:g}"}), {}
        return record.model_copy(update={"applied": True}), {"causal": causal, "rotations": rotations, "feature_maps": feature_maps}

    def _initial_weights(self, heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
        """The trainable weights the method starts from (none for the training-free ones)."""
        cfg = self.config
        if cfg.method == "hedgehog":
            return hedgehog_init(heads, head_dim, cfg.features or head_dim)
        if cfg.method == "linformer":
            return (pooled.linformer_init(cfg.landmarks, cfg.max_tokens or 0), pooled.linformer_init(cfg.landmarks, cfg.max_tokens or 0))
        if cfg.method == "nystrom-learned":
            return (pooled.nystrom_learned_init(cfg.landmarks, cfg.max_tokens or 0),)
        return ()

    def _approximate(self, q, k, v, key_bias, scale, causal, rotations, feature_maps, threshold):
        cfg = self.config
        if cfg.method == "linformer":
            return pooled.linformer_reference(q, k, v, key_bias, *feature_maps, scale, threshold)
        if cfg.method == "nystrom-learned":
            return pooled.nystrom_learned_reference(q, k, v, key_bias, *feature_maps, scale, cfg.iterations, threshold)
        if cfg.method == "nystrom":
            return reference.nystrom_attention(q, k, v, key_bias, scale, cfg.landmarks, cfg.iterations, threshold)
        if cfg.method == "hedgehog":
            return reference.hedgehog_attention(q, k, v, key_bias, *feature_maps, scale, cfg.block, cfg.sinks, causal, threshold)
        return reference.lsh_attention(q, k, v, key_bias, rotations, scale, cfg.chunk, causal, threshold)

    # ---- rewrite --------------------------------------------------------------------------
    def _rule(self, program: Program, plans: dict[fx.Node, tuple[SDPASite, dict]]) -> RewriteRule:
        """SDPA nodes the plan approximates -> the method's op, with the mask as a key bias."""
        gm, cfg = program.module, self.config

        def match(node: fx.Node) -> Match | NoMatch:
            if node not in plans:
                return NoMatch("plan", f"'{node.name}' stays exact (not chosen, or its layer record says why)")
            site, plan = plans[node]
            return Match(root=node, nodes=(node,), bindings={"site": site, **plan})

        def replace(graph: fx.Graph, m: Match) -> fx.Node:
            site, node = m.bindings["site"], m.bindings["site"].node
            q, k, v = node.args[:3]
            dtype = fake(q).dtype
            if site.mask is None:
                key_bias = add_constant(gm, f"approx_attention_zero_bias_{site.layer}", torch.zeros(1, 1, 1, 1, dtype=dtype))
            else:  # the mask acts as key padding: keep its last query row of its first head
                row = emit(graph, aten.slice.Tensor, (emit(graph, aten.slice.Tensor, (site.mask, 1, 0, 1)), 2, -1, END))
                key_bias = additive_mask(graph, row, dtype)
            if cfg.method == "nystrom":
                args: tuple[object, ...] = (q, k, v, key_bias, site.scale(), cfg.landmarks, cfg.iterations, cfg.limit)
                return emit(graph, torch.ops.graphopt.nystrom_attention.default, args)
            if cfg.method in POOLED:
                op, names = POOLED[cfg.method]
                weights = [add_parameter(gm, f"{cfg.method.replace('-', '_')}_{site.layer}_{name}", t) for name, t in zip(names, m.bindings["feature_maps"])]
                extra = (cfg.iterations,) if cfg.method == "nystrom-learned" else ()
                return emit(graph, op, (q, k, v, key_bias, *weights, site.scale(), *extra, cfg.limit))
            if cfg.method == "hedgehog":
                weights = [add_parameter(gm, f"hedgehog_{site.layer}_{name}", t) for name, t in zip(FEATURE_MAP_NAMES, m.bindings["feature_maps"])]
                args = (q, k, v, key_bias, *weights, site.scale(), cfg.block, cfg.sinks, bool(m.bindings["causal"]), cfg.limit)
                return emit(graph, torch.ops.graphopt.hedgehog_attention.default, args)
            rotations = add_constant(gm, f"approx_attention_rotations_{site.layer}", m.bindings["rotations"])
            args = (q, k, v, key_bias, rotations, site.scale(), cfg.chunk, bool(m.bindings["causal"]), cfg.limit)
            return emit(graph, torch.ops.graphopt.lsh_attention.default, args)

        return RewriteRule(cfg.method, frozenset({SDPA}), match, replace)


def _unsupported(site: SDPASite) -> str:
    q, k, v = (fake(a) for a in site.node.args[:3])
    if any(t is None for t in (q, k, v)):
        return "q, k or v has no FakeTensor value"
    if site.dropout:
        return f"dropout_p={site.dropout}"
    if site.enable_gqa:
        return "enable_gqa (grouped-query attention)"
    if not (q.dim() == k.dim() == v.dim() == 4) or not (q.dtype == k.dtype == v.dtype == torch.float32):
        return "not 4-D float32 q, k, v"
    if str(q.shape[-2]) != str(k.shape[-2]) or q.shape[:2] != k.shape[:2] or k.shape[:-1] != v.shape[:-1]:
        return f"not self-attention over one sequence: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if site.is_causal and site.mask is not None:
        return "both a mask and is_causal"
    mask = fake(site.mask) if site.mask is not None else None
    if mask is not None and mask.dtype not in (q.dtype, torch.bool):
        return f"a {mask.dtype} mask, neither additive {q.dtype} nor boolean"
    return ""


def _unchanged_reason(sites: list[SDPASite], records: list[LayerRecord], missing: list[int]) -> str:
    if not sites:
        return "no scaled_dot_product_attention in the graph (run the sdpa pass first on eager attention)"
    if not records:
        return f"none of the layers asked for ({', '.join(map(str, missing))}) is among the graph's {len(sites)} attention layers"
    shown = "; ".join(f"layer {r.layer} ({r.module_path or r.node}): {r.reason}" for r in records[:4])
    more = f" and {len(records) - 4} more" if len(records) > 4 else ""
    return f"every candidate layer stays exact: {shown}{more}"

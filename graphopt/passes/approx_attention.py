"""``aten.scaled_dot_product_attention`` → Nyström or LSH attention above a length (lossy).

Each chosen SDPA node becomes ``graphopt::nystrom_attention`` or ``graphopt::lsh_attention``
(see :mod:`graphopt.attention`), which stay exact at or below ``threshold`` tokens, at run
time, in PyTorch and in ONNX alike. Choice by layer: ``layers`` lists indices among the
graph's SDPA nodes in order (``None``: all). Approximate attention keeps a key bias only,
so a node's mask must act, on the example inputs, as key padding (or, for LSH, causal plus
key padding); other nodes stay exact and the info says why.

Error accounting: for every candidate layer the pass runs the approximation, forced on
(threshold 0), on that layer's real q, k, v from the example inputs and records the
relative error ‖approx − exact‖ / ‖exact‖ with the sequence length it was measured at.
Layers whose error passes ``max_layer_error`` stay exact. The manager then checks the whole
program against the recipe's budget; a pipeline with one ``approx-attention{layers=[i]}``
per layer lets the budget reject layers one by one.

Linformer-style learned projections need the distillation stage and are not offered here.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.fx as fx
from pydantic import Field, field_validator

import graphopt.attention  # noqa: F401  (registers the custom ops and their lowerings)
from graphopt.attention import reference
from graphopt.attention.analysis import SDPASite, classify_mask, sdpa_nodes, sdpa_values
from graphopt.passbase import Pass, PassConfig, PassResult, register_pass
from graphopt.program import Program
from graphopt.rewrite import emit, fake

aten = torch.ops.aten


class ApproxAttentionConfig(PassConfig):
    method: Literal["nystrom", "lsh"] = "nystrom"
    layers: tuple[int, ...] | None = None
    threshold: int = Field(1024, ge=0, description="exact attention at or below this many tokens")
    landmarks: int = Field(64, ge=1)
    iterations: int = Field(6, ge=1, le=50, description="Newton-Schulz steps of the landmark pseudo-inverse")
    buckets: int = Field(8, ge=1)
    rounds: int = Field(2, ge=1)
    chunk: int = Field(128, ge=1)
    seed: int = 0
    max_layer_error: float = Field(math.inf, gt=0, description="layers measured above this relative error stay exact")

    @field_validator("buckets")
    @classmethod
    def _even_buckets(cls, value: int) -> int:
        if value > 1 and value % 2:
            raise ValueError("buckets must be 1 or even (angular LSH takes the argmax over [xR, -xR])")
        return value


@register_pass
class ApproxAttention(Pass):
    """Replace attention above a length threshold by Nyström (low-rank) or LSH (hashing) attention."""

    name: ClassVar[str] = "approx-attention"
    exact: ClassVar[bool] = False
    Config: ClassVar[type[PassConfig]] = ApproxAttentionConfig
    requires_ir = ("aten",)

    def run(self, program: Program) -> PassResult:
        cfg = self.config
        sites = sdpa_nodes(program)
        chosen = [s for s in sites if cfg.layers is None or s.layer in cfg.layers]
        values = sdpa_values(program) if chosen else {}
        layers, replaced = [], 0
        for site in chosen:
            record = {"layer": site.layer, "node": site.node.name, "module_path": site.module_path, "method": cfg.method}
            plan = self._plan(site, values.get(site.node.name))
            record.update({k: v for k, v in plan.items() if not k.startswith("_")})
            if not plan.get("reason") and plan["rel_error"] > cfg.max_layer_error:
                record["reason"] = f"relative error {plan['rel_error']:.3g} > max_layer_error {cfg.max_layer_error:g}"
            record["applied"] = not record.get("reason")
            if record["applied"]:
                self._replace(program, site, plan)
                replaced += 1
            layers.append(record)
        if replaced:
            program.graph.eliminate_dead_code()
            program.graph.lint()
            program.module.recompile()
        missing = sorted(set(cfg.layers or ()) - {s.layer for s in sites})
        info = {"replaced": replaced, "attention_layers": len(sites), "layers": layers, "threshold": cfg.threshold}
        if missing:
            info["unknown_layers"] = missing
        return PassResult(program, replaced > 0, info)

    # ---- analysis -------------------------------------------------------------------------
    def _plan(self, site: SDPASite, values) -> dict:
        q, k, v = (fake(a) for a in site.node.args[:3])
        why = _unsupported(site, q, k, v)
        if why:
            return {"reason": why}
        if values is None:
            return {"reason": "no example values for this node"}
        q_val, k_val, v_val, mask_val = values
        kind = classify_mask(mask_val, q_val.shape[-2], k_val.shape[-2])
        causal = site.is_causal or kind.kind == "causal+key"
        if kind.kind == "general":
            return {"reason": kind.reason, "mask": kind.kind}
        if causal and self.config.method == "nystrom":
            return {"reason": "causal attention: Nyström landmarks mix past and future (use method=lsh)", "mask": kind.kind}
        key_bias = None if mask_val is None else mask_val[:, :1, -1:, :]
        scale = site.scale()
        rotations = reference.lsh_rotations(q.shape[-1], self.config.buckets, self.config.rounds, self.config.seed + site.layer)
        with torch.no_grad():
            exact = reference.exact_attention(q_val, k_val, v_val, key_bias, scale, causal)
            approx = self._approximate(q_val, k_val, v_val, key_bias, scale, causal, rotations, threshold=0)
        return {
            "mask": kind.kind,
            "causal": causal,
            "seq": int(q_val.shape[-2]),
            "rel_error": reference.relative_error(approx, exact),
            "active_at_example": int(q_val.shape[-2]) > self.config.threshold,
            "_rotations": rotations,
        }

    def _approximate(self, q, k, v, key_bias, scale, causal, rotations, threshold):
        cfg = self.config
        if cfg.method == "nystrom":
            return reference.nystrom_attention(q, k, v, key_bias, scale, cfg.landmarks, cfg.iterations, threshold)
        return reference.lsh_attention(q, k, v, key_bias, rotations, scale, cfg.chunk, causal, threshold)

    # ---- rewrite --------------------------------------------------------------------------
    def _replace(self, program: Program, site: SDPASite, plan: dict) -> None:
        graph, node, cfg = program.graph, site.node, self.config
        q, k, v = node.args[:3]
        with graph.inserting_before(node):
            if site.mask is None:
                key_bias = _constant(program, f"approx_attention_zero_bias_{site.layer}", torch.zeros(1, 1, 1, 1, dtype=fake(q).dtype), node)
            else:  # the mask acts as key padding: keep its last query row of its first head
                key_bias = emit(graph, aten.slice.Tensor, (emit(graph, aten.slice.Tensor, (site.mask, 1, 0, 1)), 2, -1, 9223372036854775807))
            if cfg.method == "nystrom":
                args = (q, k, v, key_bias, site.scale(), cfg.landmarks, cfg.iterations, cfg.threshold)
                new = emit(graph, torch.ops.graphopt.nystrom_attention.default, args)
            else:
                rotations = _constant(program, f"approx_attention_rotations_{site.layer}", plan["_rotations"], node)
                args = (q, k, v, key_bias, rotations, site.scale(), cfg.chunk, bool(plan["causal"]), cfg.threshold)
                new = emit(graph, torch.ops.graphopt.lsh_attention.default, args)
        new.meta.update({key: node.meta[key] for key in ("nn_module_stack", "graphopt_module_path", "stack_trace") if key in node.meta})
        new.meta["graphopt_created_by"] = f"{self.name}:{cfg.method}"
        node.replace_all_uses_with(new)
        graph.erase_node(node)


def _unsupported(site: SDPASite, q, k, v) -> str:
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
    return ""


def _constant(program: Program, name: str, tensor: torch.Tensor, near: fx.Node) -> fx.Node:
    """A buffer on the module, read by a get_attr node with its FakeTensor."""
    base, index = name, 0
    while hasattr(program.module, name):
        index += 1
        name = f"{base}_{index}"
    program.module.register_buffer(name, tensor)
    node = program.graph.get_attr(name)
    mode = fake(near.args[0]).fake_mode if hasattr(fake(near.args[0]), "fake_mode") else None
    if mode is not None:
        node.meta["val"] = mode.from_tensor(tensor, static_shapes=True)
    return node

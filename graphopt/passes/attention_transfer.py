"""``attention-transfer``: train approximate attention to imitate the exact attention, layer by layer.

Runs after ``approx-attention{method=hedgehog}`` (or ``linformer``, ``nystrom-learned``: any
op in :data:`graphopt.attention.transfer.TRAINABLE`) and before ``distill``: each approximate layer's
own parameters are fitted, on training text, to reproduce the exact attention output of
that layer's real queries, keys and values (:mod:`graphopt.attention.transfer`); nothing
else changes. Text models train on ``samples`` texts of ``ctx.training_texts`` tokenized
to ``max_length`` with ``ctx.tokenizer``; others on ``ctx.calibration``.

The info reports every layer's relative error ‖approx − exact‖ / ‖exact‖ on the
*verification* batches (never trained on) before and after. Hybrid placement, chosen by
measurement: a layer still above ``max_layer_error`` after training goes back to exact
attention, and with ``min_cosine`` the layers are put back worst first until the
program's outputs are within that cosine of the original's (``ctx.teacher``) on the
verification batches, keeping at least ``min_layers`` approximate (the cosine then stays
below, and the info says so). A put-back layer is an ordinary
``scaled_dot_product_attention`` again, which ``fused-attention`` can fuse.
"""

from __future__ import annotations

import time
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import fx

from graphopt.attention.transfer import Site, capture, describe, fit, sample_error, trainable_sites
from graphopt.context import PassContext
from graphopt.errors import GraphoptError
from graphopt.passbase import Pass, PassConfig, PassInfo, PassResult, register_pass
from graphopt.program import Program
from graphopt.verify import drift_many, real_positions

aten = torch.ops.aten


class TransferConfig(PassConfig):
    steps: int = Field(300, ge=1, description="optimizer steps per layer (one batch each)")
    lr: float = Field(1e-2, gt=0)
    samples: int = Field(64, ge=1, description="training texts (or calibration batches' rows) to fit on")
    batch_size: int = Field(4, ge=1)
    max_length: int = Field(512, ge=8, description="tokens per training text")
    seed: int = 0
    max_layer_error: float | None = Field(None, gt=0, description="layers above this relative error after training go back to exact attention")
    min_cosine: float | None = Field(None, ge=-1, le=1, description="put layers back (worst first) until the outputs are within this cosine of the original's")
    min_layers: int = Field(0, ge=0, description="keep at least this many layers approximate when placing by min_cosine")


class LayerTransfer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layer: int
    node: str
    module_path: str
    error_before: float
    error_after: float
    train_loss: float
    seconds: float
    kept: bool = True
    reason: str = ""  # why the layer went back to exact attention


class TransferInfo(PassInfo):
    data: str = ""
    verification: str = ""
    layers: list[LayerTransfer] = []
    approximate_layers: int = 0
    exact_layers: int = 0
    cosine: float | None = None  # outputs vs the original's on verification, after placement
    wall_s: float = 0.0


class TransferError(GraphoptError):
    """Attention transfer cannot run (no trainable attention, no data)."""


@register_pass
class AttentionTransfer(Pass):
    """Fit each approximate attention layer to its exact attention (layer by layer, frozen
    elsewhere), then keep approximate only the layers the error and cosine limits allow."""

    name: ClassVar[str] = "attention-transfer"
    Config: ClassVar[type[PassConfig]] = TransferConfig
    Info: ClassVar[type[PassInfo]] = TransferInfo
    requires_ir = ("aten",)
    config: TransferConfig

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        cfg, start = self.config, time.perf_counter()
        sites = trainable_sites(program)
        if not sites:
            return PassResult.unchanged(program, TransferInfo(), "no trainable approximate attention in the graph (run approx-attention{method=hedgehog}, linformer or nystrom-learned first)")
        batches, described = self._training_batches(program, ctx)
        checks = list(ctx.verification) or [(program.args, program.kwargs)]
        checked = (ctx.verification_source or f"{len(checks)} verification batches") if ctx.verification else "the example inputs (the context has no verification batches)"
        train = capture(program, sites, batches)
        held = capture(program, sites, checks)
        records = []
        for site in sites:
            t0 = time.perf_counter()
            before = sample_error(site, held[site.node.name])
            try:
                loss = fit(site, train[site.node.name], steps=cfg.steps, lr=cfg.lr, seed=cfg.seed + site.layer)
            except ValueError as exc:
                raise TransferError(str(exc)) from None
            after = sample_error(site, held[site.node.name])
            records.append(LayerTransfer(layer=site.layer, node=site.node.name, module_path=describe(site), error_before=before, error_after=after,
                                         train_loss=loss ** 0.5, seconds=round(time.perf_counter() - t0, 1)))
        cosine = self._place(program, ctx, sites, records, checks)
        kept = sum(r.kept for r in records)
        info = TransferInfo(data=described, verification=checked, layers=records, approximate_layers=kept, exact_layers=len(records) - kept,
                            cosine=cosine, wall_s=round(time.perf_counter() - start, 1))
        return PassResult.applied(program, info)

    # ---- data ---------------------------------------------------------------------------
    def _training_batches(self, program: Program, ctx: PassContext) -> tuple[list, str]:
        cfg = self.config
        if ctx.tokenizer is not None and ctx.training_texts:
            from graphopt.data import sample, tokenize

            texts = sample(list(ctx.training_texts), cfg.samples, cfg.seed)
            names = list(program.kwargs)
            batches = []
            for i in range(0, len(texts), cfg.batch_size):
                tensors = tokenize(ctx.tokenizer, texts[i : i + cfg.batch_size], max_length=cfg.max_length)
                batches.append(((), {name: tensors[name] for name in names if name in tensors}))
            return batches, f"{len(texts)} training texts of the context, at most {cfg.max_length} tokens"
        if ctx.calibration:
            return list(ctx.calibration), f"{len(ctx.calibration)} calibration batches ({ctx.calibration_source or 'given'})"
        raise TransferError("attention-transfer needs training data: the context has neither training texts with a tokenizer nor calibration batches")

    # ---- hybrid placement ----------------------------------------------------------------
    def _place(self, program: Program, ctx: PassContext, sites: list[Site], records: list[LayerTransfer], checks: list) -> float | None:
        cfg = self.config
        by_layer = {s.layer: s for s in sites}
        for record in records:
            if cfg.max_layer_error is not None and record.error_after > cfg.max_layer_error:
                _to_exact(program, by_layer[record.layer])
                record.kept, record.reason = False, f"relative error {record.error_after:.3g} > max_layer_error {cfg.max_layer_error:g} after transfer"
        if cfg.min_cosine is None:
            return None
        if ctx.teacher is None:
            raise TransferError("attention-transfer{min_cosine=...} compares with the original program, ctx.teacher, and the context has none (graphopt.optimize sets it)")
        references = [ctx.teacher.run(args, kwargs) for args, kwargs in checks]
        valids = [real_positions(kwargs) for _, kwargs in checks]

        def cosine() -> float:
            program.module.recompile()
            return drift_many(references, [program.run(args, kwargs) for args, kwargs in checks], valids).cosine

        current = cosine()
        for record in sorted((r for r in records if r.kept), key=lambda r: -r.error_after):
            if current >= cfg.min_cosine or sum(r.kept for r in records) <= cfg.min_layers:
                break
            _to_exact(program, by_layer[record.layer])
            record.kept, record.reason = False, f"put back for min_cosine {cfg.min_cosine:g} (outputs at cosine {current:.6f} with it approximate)"
            current = cosine()
        return current


def _to_exact(program: Program, site: Site) -> None:
    """The site's node becomes exact ``scaled_dot_product_attention`` again (same q, k, v,
    its key bias as the mask)."""
    node, graph = site.node, program.graph
    q, k, v, key_bias = node.args[:4]
    kwargs: dict = {"scale": site.scale}
    with graph.inserting_before(node):
        if site.causal:
            if not _is_zero_bias(program, key_bias):
                raise TransferError(f"{describe(site)}: a causal layer with a key-padding bias cannot go back to one scaled_dot_product_attention")
            exact = graph.call_function(aten.scaled_dot_product_attention.default, (q, k, v), {"is_causal": True, **kwargs})
        else:
            exact = graph.call_function(aten.scaled_dot_product_attention.default, (q, k, v, key_bias), kwargs)
    exact.meta.update({key: value for key, value in node.meta.items() if key in ("val", "nn_module_stack", "stack_trace", "source_fn_stack")})
    node.replace_all_uses_with(exact)
    graph.erase_node(node)


def _is_zero_bias(program: Program, node) -> bool:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return False
    value = program.module.get_buffer(str(node.target))
    return bool((value == 0).all())

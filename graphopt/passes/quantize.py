"""The quantize pass: linear layers -> graphopt's quantized-linear ops (lossy).

Every linear layer (``aten.linear``, GPT-2's ``addmm``, a matmul by a stored weight) the
target filter selects becomes one ``torch.ops.graphopt`` op whose eager reference follows
the ORT kernel it lowers to (see graphopt.quant.ops / lowering):

* ``mode=dynamic`` (default): int8 per-channel symmetric weights, activations quantized per
  tensor at run time -> ``DynamicQuantizeMatMul``. Weights use the full ±127 range on CPUs
  whose integer GEMM cannot saturate (VNNI, ARM) and ±63 elsewhere (``weight_range=auto``).
* ``mode=weight_only``: 4- or 8-bit group-wise weights -> ``MatMulNBits``
  (``group_size``, ``symmetric``, ``accuracy_level``: 4 = int8 compute, 0 = fp32).
* ``mode=static``: activation ranges calibrated ahead of time (``calibration_method``:
  min-max, percentiles, or the clipping with the least round-trip error) -> QuantizeLinear /
  DequantizeLinear, which ORT fuses into an integer matmul.

Mixed precision: with ``sensitivity=true`` each layer's drift when quantized alone is
measured on the calibration data and reported; ``target_cosine`` keeps the fewest most
sensitive layers at the ``fallback`` precision such that the calibration outputs keep that
mean per-sample cosine; ``keep=k`` keeps the k most sensitive ones regardless.

``bias_correction=true`` folds each quantized layer's mean output shift on calibration data
into its bias (graphopt.quant.bias_correction). It is an option of this pass, not a pass of
its own, because the shift is measured against the fp32 layer this pass replaces: after it,
the program holds only the rounded weights (and a ``smooth`` before it changed the weights,
so the original model's are not the reference either).

Calibration data (static ranges, GPTQ, sensitivity, bias correction) is the context's
(``PassContext.calibration_batches``); without any, the program's example inputs are used
and ``info.calibration`` says so. The fusions that follow quantization are passes of their
own that a recipe orders after this one: ``int8-attention`` (Q/K/V + SDPA -> one int8 GEMM
+ MultiHeadAttention) and ``bias-gelu`` (which handles the quantized linears too).
"""

from __future__ import annotations

import functools
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import fx

from graphopt.analysis.interpret import run_calibration
from graphopt.analysis.linear import LINEAR_ANCHORS, LinearSite, NotLinear, filtered_out, find_linear_sites
from graphopt.context import Batch, PassContext
from graphopt.passbase import Pass, PassConfig, PassInfo, PassResult, register_pass
from graphopt.program import Program, module_path
from graphopt.quant.bias_correction import bias_corrections, corrected
from graphopt.quant.calibration import ActivationRange, calibrated_range
from graphopt.quant.cpu import CpuInt8Support, cpu_int8_support, weight_qmax
from graphopt.quant.packing import NBITS, quantize_nbits
from graphopt.quant.schemes import QuantizedLinear, Scheme, quantize_embedding, quantize_linear
from graphopt.quant.sensitivity import PlanProbe, Simulator, layer_sensitivity, plan_mixed_precision
from graphopt.rewrite import Match, NoMatch, RewriteRule, apply_rules, emit
from graphopt.surgery import add_constant, get_tensor

aten = torch.ops.aten
_KIND_OF_MODE = {"dynamic": "int8_dynamic", "static": "int8_static", "weight_only": "nbits"}
# Each sensitivity probe is one run over the calibration data: more batches than this
# cost time without moving the plan.
MAX_CALIBRATION_BATCHES = 32


class QuantizeConfig(PassConfig):
    version: ClassVar[int] = 2  # 2: fuse_gelu / fuse_attention became the bias-gelu and int8-attention passes

    mode: Literal["dynamic", "weight_only", "static"] = "dynamic"
    bits: int = Field(8, description="8 for dynamic/static; 2, 4 or 8 for weight_only")
    group_size: int = Field(128, description="weight_only: input rows per scale (power of two, 16..256)")
    symmetric: bool = Field(False, description="weight_only: fixed zero point (int8 modes are always symmetric)")
    accuracy_level: int = Field(4, ge=0, le=4, description="weight_only: MatMulNBits compute type (4 = int8, 0 = fp32)")
    weight_range: Literal["auto", "full", "reduced"] = Field("auto", description="int8 weights: ±127, ±63, or by CPU")
    include: tuple[str, ...] = Field((), description="fnmatch patterns on module paths to quantize (empty: all)")
    exclude: tuple[str, ...] = Field((), description="fnmatch patterns on module paths to leave in fp32")
    embeddings: bool = Field(False, description="also quantize embedding tables (not tied to another reader)")
    embedding_bits: Literal[4, 8] = Field(8, description="embedding tables: 8 (per-row scales) or 4 (groups of group_size along a row)")
    sensitivity: bool = Field(False, description="measure each layer's drift alone on the calibration data")
    target_cosine: float | None = Field(None, gt=0, le=1, description="mixed precision: calibration mean cosine to keep")
    keep: int = Field(0, ge=0, description="keep this many of the most sensitive layers at the fallback precision")
    fallback: Literal["fp32", "int8_weight_only"] = "fp32"
    gptq: bool = Field(False, description="weight_only: GPTQ rounding (error compensation on calibration inputs)")
    calibration_method: Literal["minmax", "percentile", "mse"] = Field("minmax", description="static: activation range from the observed extremes, percentiles, or the least round-trip error")
    percentile: float = Field(99.99, gt=50, le=100, description="static with calibration_method=percentile: the upper percentile (the lower is 100 minus it)")
    bias_correction: bool = Field(False, description="fold each quantized layer's mean output shift on calibration data into its bias")

    @model_validator(mode="after")
    def _consistent(self):
        if self.mode in ("dynamic", "static") and self.bits != 8:
            raise ValueError(f"mode={self.mode} quantizes to 8 bits, got bits={self.bits} (4 bits: mode=weight_only)")
        if self.mode == "weight_only" and self.bits not in NBITS:
            raise ValueError(f"weight_only supports bits 2, 4 or 8 (MatMulNBits), got bits={self.bits}")
        if self.mode == "weight_only" and self.bits == 2 and self.accuracy_level == 4 and self.group_size < 32:
            raise ValueError("2-bit blocks of 16 run in fp32 on ORT 1.32's CPU kernel, whatever accuracy_level asks: "
                             "use group_size >= 32 for int8 compute, or accuracy_level=0")
        if self.calibration_method != "minmax" and self.mode != "static":
            raise ValueError(f"calibration_method applies to mode=static (calibrated activation ranges), not mode={self.mode}")
        if self.gptq and self.mode != "weight_only":
            raise ValueError(f"gptq applies to mode=weight_only, not mode={self.mode}")
        if not 16 <= self.group_size <= 256 or self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size must be a power of two from 16 to 256, got {self.group_size}")
        return self

    @property
    def needs_calibration(self) -> bool:
        return self.mode == "static" or self.gptq or self.bias_correction or self.plans_precision

    @property
    def plans_precision(self) -> bool:
        return self.sensitivity or self.target_cosine is not None or self.keep > 0


# ---- the report ------------------------------------------------------------------------------
class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SkippedSite(_Record):
    """A linear layer or embedding left as it was (``kept``: the precision it stays at)."""

    node: str
    module_path: str
    reason: str
    kept: str = "fp32"


class LayerRecord(_Record):
    node: str
    module_path: str
    shape: list[int]  # [out, in]
    scheme: str  # the scheme's label, or "fp32"
    padded_input_rows: int = 0  # rows added to fill the last n-bit block
    sensitivity: float | None = None  # 1 - mean cosine with this layer alone quantized


class CpuRecord(_Record):
    capability: str
    vnni: bool
    x86: bool
    saturates_u8s8: bool


class KeptLayer(_Record):
    node: str
    module_path: str
    sensitivity: float


class PlanProbeRecord(_Record):
    kept: int
    mean_cosine: float
    min_cosine: float


class MixedPrecisionPlan(_Record):
    target_cosine: float | None
    kept_at_fallback: list[KeptLayer]
    fallback: str
    probes: list[PlanProbeRecord]
    calibration_mean_cosine: float | None


class QuantizeInfo(PassInfo):
    replaced: int = 0
    mode: str = "dynamic"
    scheme: str = ""
    cpu: CpuRecord | None = None
    layers: list[LayerRecord] = []
    skipped: list[SkippedSite] = []
    embeddings_replaced: int = 0
    calibration: str | None = None  # where the calibration batches came from, when used
    plan: MixedPrecisionPlan | None = None
    bias_corrected: int = 0  # layers whose bias absorbed their mean output shift (bias_correction)
    bias_shift: float | None = None  # mean |correction| / mean |bias| over those layers


# ---- the pass --------------------------------------------------------------------------------
@register_pass
class Quantize(Pass):
    """Replace linear layers (and embeddings) by int8 / int4 quantized ops: dynamic, weight-only or static."""

    name: ClassVar[str] = "quantize"
    Config: ClassVar[type[PassConfig]] = QuantizeConfig
    config: QuantizeConfig  # the validated options (narrowed from PassConfig for type checkers)
    Info: ClassVar[type[PassInfo]] = QuantizeInfo
    requires_ir = ("aten",)

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        cfg = self.config
        gm = program.module
        sites, rejected = program.analysis("linear_sites", find_linear_sites)
        skipped = [SkippedSite(node=r.node, module_path=r.module_path, reason=r.reason) for r in rejected]
        chosen = []
        for site in sites:
            why = filtered_out(site, self.config.include, self.config.exclude)
            if why:
                skipped.append(SkippedSite(node=site.node, module_path=site.module_path, reason=why))
            else:
                chosen.append(site)

        support = cpu_int8_support()
        scheme = self._scheme(cfg.mode, cfg.bits, support)
        batches, source = ctx.calibration_batches(program, MAX_CALIBRATION_BATCHES) if cfg.needs_calibration and chosen else ([], None)
        layers, schemes, plan, sensitivity = self._plan(gm, chosen, scheme, support, batches)
        shift = None
        if cfg.bias_correction and layers:
            layers, shift = _bias_correct(gm, layers, {s.node: s for s in chosen}, batches)

        rule = quantized_linear_rule({s.node: (s, layers[s.node]) for s in chosen if s.node in layers}, gm)
        replaced = apply_rules(gm, [rule], provenance=self.name).applied[rule.name]
        embedded = 0
        if cfg.embeddings:
            stats = apply_rules(gm, [embedding_rule(gm, cfg.embedding_bits, cfg.group_size, stored_int8=skipped)], provenance=self.name)
            embedded = stats.total
            skipped += [SkippedSite(node=m.node, module_path=m.module_path, reason=m.reason) for m in stats.near_misses]

        info = QuantizeInfo(
            replaced=replaced,
            mode=cfg.mode,
            scheme=scheme.label(),
            cpu=CpuRecord(**support.to_dict()),
            layers=[_layer_record(site, schemes, layers, sensitivity) for site in sites],
            skipped=skipped,
            embeddings_replaced=embedded,
            calibration=source,
            plan=plan,
            bias_corrected=len(layers) if shift is not None else 0,
            bias_shift=shift,
        )
        return PassResult.of(program, replaced > 0 or embedded > 0, info, self._why_unchanged(sites, rejected, chosen, layers))

    # ---- choices --------------------------------------------------------------------------

    def _why_unchanged(self, sites: list[LinearSite], rejected: list[NotLinear], chosen: list[LinearSite], layers: dict) -> str:
        cfg = self.config
        if not sites:
            found = f"{len(rejected)} matmul-like nodes, none by a stored float32 weight (first: {rejected[0].reason})" if rejected else "no linear/addmm/mm/matmul node"
            why = f"no linear layer found ({found})"
        elif not chosen:
            why = f"every one of the {len(sites)} linear layers was filtered out (include={list(cfg.include)}, exclude={list(cfg.exclude)})"
        elif not layers:
            why = f"the mixed-precision plan kept all {len(chosen)} selected layers at fp32"
        else:
            why = "no planned layer was rewritten"
        return why + ("; no embedding table could be quantized (see info.skipped)" if cfg.embeddings else "")

    def _scheme(self, mode: str, bits: int, support: CpuInt8Support) -> Scheme:
        cfg = self.config
        return Scheme(
            kind=_KIND_OF_MODE[mode],
            bits=bits,
            block_size=cfg.group_size,
            accuracy_level=cfg.accuracy_level,
            symmetric=cfg.symmetric,
            weight_qmax=weight_qmax(cfg.weight_range, support),
        )

    def _plan(self, gm: fx.GraphModule, chosen: list[LinearSite], scheme: Scheme, support: CpuInt8Support, batches: list[Batch]):
        """(quantized layers by node, scheme by node, the mixed-precision plan, sensitivity by node)."""
        cfg = self.config
        observed = observe_activation_ranges(gm, chosen, batches, keep_samples=cfg.calibration_method != "minmax") if cfg.mode == "static" and chosen else {}
        ranges = {name: calibrated_range(r, cfg.calibration_method, cfg.percentile) for name, r in observed.items()}
        hessians = observe_hessians(gm, chosen, batches) if cfg.gptq and chosen else {}
        cache: dict[tuple, QuantizedLinear] = {}

        def quantize(site: LinearSite, s: Scheme) -> QuantizedLinear:
            return _quantize(gm, site, s, ranges.get(site.node), hessians.get(site.node), cache)

        layers = {site.node: quantize(site, scheme) for site in chosen}
        schemes = {site.node: scheme for site in chosen}
        if not (batches and cfg.plans_precision):
            return layers, schemes, None, {}
        schemes, plan, sensitivity = self._mixed_precision(gm, chosen, layers, batches, scheme, support)
        layers = {site.node: quantize(site, schemes[site.node]) for site in chosen if schemes[site.node].kind != "fp32"}
        return layers, schemes, plan, sensitivity

    def _mixed_precision(self, gm, chosen: list[LinearSite], layers, batches: list[Batch], scheme: Scheme, support: CpuInt8Support):
        cfg = self.config
        bias_after = {s.node: s.bias_node is not None for s in chosen}
        simulator = Simulator(gm, batches, layers, bias_after)
        names = [s.node for s in chosen]
        sensitivity = layer_sensitivity(simulator, names)
        order = sorted(names, key=lambda n: -sensitivity[n])
        kept = cfg.keep
        probes: list[PlanProbe] = []
        if cfg.target_cosine is not None:
            planned, probes = plan_mixed_precision(simulator, order, cfg.target_cosine)
            kept = max(kept, planned)
        kept = min(kept, len(order))
        fallback = Scheme("fp32") if cfg.fallback == "fp32" else self._scheme("weight_only", 8, support)
        schemes = {name: (fallback if name in order[:kept] else scheme) for name in names}
        final = simulator.cosines([n for n in names if schemes[n].kind != "fp32"]) if kept and cfg.fallback == "fp32" else None
        paths = {s.node: s.module_path for s in chosen}
        plan = MixedPrecisionPlan(
            target_cosine=cfg.target_cosine,
            kept_at_fallback=[KeptLayer(node=n, module_path=paths[n], sensitivity=sensitivity[n]) for n in order[:kept]],
            fallback=fallback.label(),
            probes=[PlanProbeRecord(**p.to_dict()) for p in probes],
            calibration_mean_cosine=round(float(final.mean()), 6) if final is not None else (probes[-1].mean_cosine if probes else None),
        )
        return schemes, plan, dict(sensitivity)



def _quantize(gm, site: LinearSite, scheme: Scheme, act_range: tuple[float, float] | None, hessian: torch.Tensor | None, cache: dict) -> QuantizedLinear:
    act = act_range if scheme.kind == "int8_static" else None
    hessian = hessian if scheme.kind == "nbits" else None
    key = (site.weight_name, site.transposed, site.bias_name, scheme, act, site.node if hessian is not None else None)
    if key not in cache:  # layers reading one weight (and range) share one quantized copy
        cache[key] = quantize_linear(site.weight(gm), site.bias(gm), scheme, act, hessian)
    return cache[key]


def _bias_correct(gm, layers: dict[str, QuantizedLinear], sites: dict[str, LinearSite], batches: list[Batch]) -> tuple[dict[str, QuantizedLinear], float]:
    """Every planned layer with its mean output shift on the calibration batches folded into its
    bias, and the mean |correction| relative to the mean |bias| (how much there was to fold)."""
    corrections = bias_corrections(gm, batches, layers, sites)
    moved = sum(float(c.abs().mean()) for c in corrections.values())
    scale = sum(float(layers[n].tensors["bias"].abs().mean()) for n in corrections)
    return {name: corrected(layer, corrections[name]) for name, layer in layers.items()}, round(moved / max(scale, 1e-12), 6)


def _layer_record(site: LinearSite, schemes: dict[str, Scheme], layers: dict[str, QuantizedLinear], sensitivity: dict[str, float]) -> LayerRecord:
    scheme = schemes.get(site.node)
    layer = layers.get(site.node)
    return LayerRecord(
        node=site.node,
        module_path=site.module_path,
        shape=[site.out_features, site.in_features],
        scheme=scheme.label() if scheme is not None and layer is not None else "fp32",
        padded_input_rows=layer.padded if layer is not None else 0,
        sensitivity=sensitivity.get(site.node),
    )


def observe_hessians(gm: fx.GraphModule, sites: list[LinearSite], batches: list[Batch]) -> dict[str, torch.Tensor]:
    from graphopt.quant.gptq import HessianObserver

    observers = {site.node: HessianObserver() for site in sites}
    run_calibration(gm, batches, observe={name: o.update for name, o in observers.items()})
    return {name: o.hessian for name, o in observers.items() if o.hessian is not None}


def observe_activation_ranges(gm: fx.GraphModule, sites: list[LinearSite], batches: list[Batch], keep_samples: bool = False) -> dict[str, ActivationRange]:
    ranges = {site.node: ActivationRange() for site in sites}
    run_calibration(gm, batches, observe={name: functools.partial(r.update, keep_samples=keep_samples) for name, r in ranges.items()})
    return ranges


# ---- the rewrites ----------------------------------------------------------------------------
def quantized_linear_rule(plan: dict[str, tuple[LinearSite, QuantizedLinear]], gm: fx.GraphModule) -> RewriteRule:
    """A rule that replaces the planned linear nodes by their quantized op."""
    registered: dict[int, str] = {}  # id(tensor) -> buffer name, so shared weights stay shared

    def match(node: fx.Node) -> Match | NoMatch:
        if node.name not in plan:
            return NoMatch("plan", f"'{node.name}' is not planned for quantization (see info.skipped / info.layers)")
        site, layer = plan[node.name]
        return Match(root=node, nodes=(node,), bindings={"site": site, "layer": layer})

    def replace(graph: fx.Graph, m: Match) -> fx.Node:
        site, layer = m.bindings["site"], m.bindings["layer"]
        root = m.root
        x = root.args[1] if root.target is aten.addmm.default else root.args[0]
        inputs = [add_constant(gm, f"quant_{site.node}_{key}", tensor, registered=registered) for key, tensor in layer.tensors.items()]
        out = emit(graph, layer.op, (x, *inputs, *layer.attributes))
        if site.bias_node is not None:
            out = emit(graph, aten.add.Tensor, (out, root.args[0]))
        return out

    return RewriteRule("quantized_linear", LINEAR_ANCHORS, match, replace)


def embedding_rule(gm: fx.GraphModule, bits: int = 8, group_size: int = 32, stored_int8: list[SkippedSite] | None = None) -> RewriteRule:
    """``aten.embedding(W, ids)`` with a stored table read by nothing else -> int8 rows with one
    scale per row, or 4-bit groups of ``group_size``. A table whose width the group does not
    divide is stored int8 instead, and appended to ``stored_int8`` with the reason."""
    registered: dict[int, str] = {}

    def match(node: fx.Node) -> Match | NoMatch:
        table = node.args[0]
        if not (isinstance(table, fx.Node) and table.op == "get_attr"):
            return NoMatch("stored_table", "the table is not a stored tensor")
        readers = [u for u in table.users if u is not node]
        others = [n for n in node.graph.nodes if n.op == "get_attr" and n.target == table.target and n is not table]
        if readers or any(o.users for o in others):
            return NoMatch("tied", "the table is also read elsewhere (tied weights); int8 would store it twice")
        weight = get_tensor(gm, str(table.target))
        if weight.dtype != torch.float32 or weight.dim() != 2:
            return NoMatch("dtype", f"table is {weight.dtype} {tuple(weight.shape)}")
        return Match(root=node, nodes=(node,), bindings={"weight": weight})

    def replace(graph: fx.Graph, m: Match) -> fx.Node:
        weight, owner, ids = m.bindings["weight"], m.root.name, m.root.args[1]
        if bits == 4 and weight.shape[1] % group_size == 0:
            q = quantize_nbits(weight, 4, group_size)
            tensors = {"table": q.packed.reshape(q.N, -1), "scales": q.scales, "zero_points": q.zero_points}
            inputs = [add_constant(gm, f"quant_{owner}_{key}", t, registered=registered) for key, t in tensors.items()]
            return emit(graph, torch.ops.graphopt.embedding_nbits.default, (*inputs, ids, group_size, 4))
        if bits == 4 and stored_int8 is not None:
            reason = f"width {weight.shape[1]} is not a multiple of group_size {group_size}"
            stored_int8.append(SkippedSite(node=owner, module_path=module_path(m.root), reason=reason, kept="int8"))
        codes, scales = quantize_embedding(weight)
        inputs = [add_constant(gm, f"quant_{owner}_{key}", t, registered=registered) for key, t in (("table", codes), ("scales", scales))]
        return emit(graph, torch.ops.graphopt.embedding_int8.default, (*inputs, ids))

    return RewriteRule("quantized_embedding", frozenset({aten.embedding.default}), match, replace)

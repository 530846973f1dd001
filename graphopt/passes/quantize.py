"""The quantize pass: linear layers -> graphopt's quantized-linear ops (lossy).

Every linear layer (``aten.linear``, GPT-2's ``addmm``, a matmul by a stored weight) the
target filter selects becomes one ``torch.ops.graphopt`` op whose eager reference follows
the ORT kernel it lowers to (see graphopt.quant.ops / lowering):

* ``mode=dynamic`` (default): int8 per-channel symmetric weights, activations quantized per
  tensor at run time -> ``DynamicQuantizeMatMul``. Weights use the full ±127 range on CPUs
  whose integer GEMM cannot saturate (VNNI, ARM) and ±63 elsewhere (``weight_range=auto``).
* ``mode=weight_only``: 4- or 8-bit group-wise weights -> ``MatMulNBits``
  (``group_size``, ``symmetric``, ``accuracy_level``: 4 = int8 compute, 0 = fp32).
* ``mode=static``: activation ranges calibrated ahead of time -> QuantizeLinear /
  DequantizeLinear, which ORT fuses into an integer matmul.

Mixed precision: with ``sensitivity=true`` each layer's drift when quantized alone is
measured on the calibration data and reported; ``target_cosine`` keeps the fewest most
sensitive layers at the ``fallback`` precision such that the calibration outputs keep that
mean per-sample cosine; ``keep=k`` keeps the k most sensitive ones regardless.

Calibration data is given to the constructor (``Quantize(calibration=CalibrationSet...)``);
without it the program's example inputs are used, and ``info['calibration']`` says so.
"""

from __future__ import annotations

import fnmatch
from typing import Any, ClassVar, Literal

import torch
import torch.fx as fx
from pydantic import Field, model_validator

from graphopt.passbase import Pass, PassConfig, PassResult, register_pass
from graphopt.surgery import remove_unused_tensors
from graphopt.program import Program, module_path
from graphopt.quant.calibration import ActivationRange, CalibrationSet, run_calibration
from graphopt.quant.cpu import cpu_int8_support, weight_qmax
from graphopt.quant.packing import quantize_nbits
from graphopt.quant.schemes import QuantizedLinear, Scheme, quantize_embedding, quantize_linear
from graphopt.quant.sensitivity import Simulator, layer_sensitivity, plan_mixed_precision
from graphopt.passes.bias_gelu import bias_gelu_rule
from graphopt.quant.attention import fused_attention_rule
from graphopt.quant.constants import constant_node as _constant_node
from graphopt.quant.sites import LINEAR_ANCHORS, LinearSite, find_linear_sites, get_tensor
from graphopt.rewrite import Match, NoMatch, RewriteRule, apply_rules, emit

aten = torch.ops.aten
_KIND_OF_MODE = {"dynamic": "int8_dynamic", "static": "int8_static", "weight_only": "nbits"}


class QuantizeConfig(PassConfig):
    mode: Literal["dynamic", "weight_only", "static"] = "dynamic"
    bits: int = Field(8, description="8 for dynamic/static; 4 or 8 for weight_only")
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
    fuse_gelu: bool = Field(True, description="quantized linear + GELU -> zero-bias op + one BiasGelu kernel (exact)")
    fuse_attention: bool = Field(True, description="dynamic int8: Q/K/V projections + SDPA -> one int8 GEMM + MultiHeadAttention")

    @model_validator(mode="after")
    def _consistent(self):
        if self.mode in ("dynamic", "static") and self.bits != 8:
            raise ValueError(f"mode={self.mode} quantizes to 8 bits, got bits={self.bits} (4 bits: mode=weight_only)")
        if self.mode == "weight_only" and self.bits not in (4, 8):
            raise ValueError(f"weight_only supports bits 4 or 8 (MatMulNBits), got bits={self.bits}")
        if self.gptq and self.mode != "weight_only":
            raise ValueError(f"gptq applies to mode=weight_only, not mode={self.mode}")
        if not 16 <= self.group_size <= 256 or self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size must be a power of two from 16 to 256, got {self.group_size}")
        return self


@register_pass
class Quantize(Pass):
    """Replace linear layers (and embeddings) by int8 / int4 quantized ops: dynamic, weight-only or static."""

    name: ClassVar[str] = "quantize"
    exact: ClassVar[bool] = False
    Config: ClassVar[type[PassConfig]] = QuantizeConfig
    requires_ir = ("aten",)

    def __init__(self, config: QuantizeConfig | None = None, *, calibration: CalibrationSet | None = None, **options: Any):
        super().__init__(config, **options)
        if calibration is not None and not isinstance(calibration, CalibrationSet):
            raise TypeError(f"calibration must be a graphopt.quant.CalibrationSet, got {type(calibration).__name__}")
        self.calibration = calibration

    def run(self, program: Program) -> PassResult:
        cfg = self.config
        gm = program.module
        sites, rejected = program.analysis("quantize.linear_sites", find_linear_sites)
        skipped = [dict(r, kept="fp32") for r in rejected]
        chosen = []
        for site in sites:
            why = self._filtered_out(site)
            if why:
                skipped.append({"node": site.node, "module_path": site.module_path, "reason": why, "kept": "fp32"})
            else:
                chosen.append(site)

        support = cpu_int8_support()
        scheme = self._scheme(cfg.mode, cfg.bits, support)
        needs_data = cfg.mode == "static" or cfg.sensitivity or cfg.target_cosine is not None or cfg.keep > 0 or cfg.gptq
        data = (self.calibration or CalibrationSet.from_program(program)) if needs_data and chosen else None
        ranges = observe_activation_ranges(gm, chosen, data) if cfg.mode == "static" and chosen else {}
        self._hessians = observe_hessians(gm, chosen, data) if cfg.gptq and chosen else {}
        cache: dict[tuple, QuantizedLinear] = {}
        layers = {site.node: self._quantize(gm, site, scheme, ranges.get(site.node), cache) for site in chosen}

        plan_info: dict[str, Any] = {}
        schemes = {site.node: scheme for site in chosen}
        if data is not None and (cfg.sensitivity or cfg.target_cosine is not None or cfg.keep > 0):
            schemes, plan_info = self._mixed_precision(gm, chosen, layers, data, scheme, support, ranges, cache)
            layers = {name: self._quantize(gm, site, schemes[name], ranges.get(name), cache) for site in chosen if (name := site.node) and schemes[name].kind != "fp32"}

        rule = quantized_linear_rule({s.node: (s, layers[s.node]) for s in chosen if s.node in layers}, gm)
        stats = apply_rules(gm, [rule], provenance=self.name)
        gelus = apply_rules(gm, [bias_gelu_rule(gm)], provenance=self.name).total if cfg.fuse_gelu and stats.total else 0
        fusable = cfg.fuse_attention and cfg.mode == "dynamic" and stats.total
        attention = apply_rules(gm, [fused_attention_rule(gm)], provenance=self.name) if fusable else None
        embedded = quantize_embeddings(gm, cfg.embedding_bits, cfg.group_size) if cfg.embeddings else {"replaced": 0, "skipped": []}
        replaced = stats.applied[rule.name]
        modified = replaced > 0 or embedded["replaced"] > 0
        removed = []
        if modified:
            gm.graph.eliminate_dead_code()  # the fp32 weights' get_attr nodes, now unread
            removed = remove_unused_tensors(gm)
            gm.graph.lint()
            gm.recompile()

        layer_rows = []
        for site in sites:
            s = schemes.get(site.node)
            row = {"node": site.node, "module_path": site.module_path, "shape": [site.out_features, site.in_features]}
            row["scheme"] = s.label() if s is not None and site.node in layers else "fp32"
            if site.node in layers and layers[site.node].padded:
                row["padded_input_rows"] = layers[site.node].padded
            if site.node in plan_info.get("sensitivity", {}):
                row["sensitivity"] = plan_info["sensitivity"][site.node]
            layer_rows.append(row)
        info = {
            "replaced": replaced,
            "mode": cfg.mode,
            "scheme": scheme.label(),
            "cpu": support.to_dict(),
            "layers": layer_rows,
            "skipped": skipped + embedded["skipped"],
            "embeddings_replaced": embedded["replaced"],
            "gelu_fused": gelus,
            "attention_fused": attention.total if attention else 0,
            "attention_near_misses": [m.to_dict() for m in attention.near_misses] if attention else [],
            "tensors_removed": len(removed),
            "calibration": data.source if data is not None else None,
            **{k: v for k, v in plan_info.items() if k != "sensitivity"},
        }
        return PassResult(program, modified, info)

    # ---- choices --------------------------------------------------------------------------
    def _filtered_out(self, site: LinearSite) -> str:
        path = site.module_path or site.node
        if self.config.include and not any(_matches(path, p) for p in self.config.include):
            return f"not selected by include={list(self.config.include)}"
        for pattern in self.config.exclude:
            if _matches(path, pattern):
                return f"excluded by pattern {pattern!r}"
        return ""

    def _scheme(self, mode: str, bits: int, support) -> Scheme:
        cfg = self.config
        return Scheme(
            kind=_KIND_OF_MODE[mode],
            bits=bits,
            block_size=cfg.group_size,
            accuracy_level=cfg.accuracy_level,
            symmetric=cfg.symmetric,
            weight_qmax=weight_qmax(cfg.weight_range, support),
        )

    def _quantize(self, gm, site: LinearSite, scheme: Scheme, act_range, cache) -> QuantizedLinear:
        act = (act_range.low, act_range.high) if act_range is not None and scheme.kind == "int8_static" else None
        hessian = self._hessians.get(site.node) if scheme.kind == "nbits" else None
        key = (site.weight_name, site.transposed, site.bias_name, scheme, act, site.node if hessian is not None else None)
        if key not in cache:
            cache[key] = quantize_linear(site.weight(gm), site.bias(gm), scheme, act, hessian)
        return cache[key]

    def _mixed_precision(self, gm, chosen, layers, data, scheme, support, ranges, cache):
        cfg = self.config
        bias_after = {s.node: s.bias_node is not None for s in chosen}
        simulator = Simulator(gm, data, layers, bias_after)
        names = [s.node for s in chosen]
        sensitivity = layer_sensitivity(simulator, names)
        order = sorted(names, key=lambda n: -sensitivity[n])
        kept, probes = cfg.keep, []
        if cfg.target_cosine is not None:
            planned, probes = plan_mixed_precision(simulator, order, cfg.target_cosine)
            kept = max(kept, planned)
        kept = min(kept, len(order))
        fallback = Scheme("fp32") if cfg.fallback == "fp32" else self._scheme("weight_only", 8, support)
        schemes = {name: (fallback if name in order[:kept] else scheme) for name in names}
        final = simulator.cosines([n for n in names if schemes[n].kind != "fp32"]) if kept and cfg.fallback == "fp32" else None
        plan = {
            "sensitivity": dict(sensitivity),
            "plan": {
                "target_cosine": cfg.target_cosine,
                "kept_at_fallback": [{"node": n, "module_path": module_path_of(gm, n), "sensitivity": sensitivity[n]} for n in order[:kept]],
                "fallback": fallback.label(),
                "probes": [p.to_dict() for p in probes],
                "calibration_mean_cosine": round(float(final.mean()), 6) if final is not None else (probes[-1].mean_cosine if probes else None),
            },
        }
        return schemes, plan


def _matches(path: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, f"*.{pattern}") or path == pattern


def module_path_of(gm: fx.GraphModule, node_name: str) -> str:
    for node in gm.graph.nodes:
        if node.name == node_name:
            return module_path(node)
    return ""


def observe_hessians(gm: fx.GraphModule, sites: list[LinearSite], data: CalibrationSet) -> dict[str, torch.Tensor]:
    from graphopt.quant.gptq import HessianObserver

    observers = {site.node: HessianObserver() for site in sites}
    run_calibration(gm, data, observe={name: o.update for name, o in observers.items()})
    return {name: o.hessian for name, o in observers.items() if o.hessian is not None}


def observe_activation_ranges(gm: fx.GraphModule, sites: list[LinearSite], data: CalibrationSet) -> dict[str, ActivationRange]:
    ranges = {site.node: ActivationRange() for site in sites}
    run_calibration(gm, data, observe={name: r.update for name, r in ranges.items()})
    return ranges


# ---- the rewrite ------------------------------------------------------------------------------
def quantized_linear_rule(plan: dict[str, tuple[LinearSite, QuantizedLinear]], gm: fx.GraphModule) -> RewriteRule:
    """A rule that replaces the planned linear nodes by their quantized op."""
    registered: dict[int, str] = {}  # id(tensor) -> buffer name, so shared weights stay shared

    def match(node: fx.Node) -> Match | NoMatch:
        if node.name not in plan:
            return NoMatch("plan", f"'{node.name}' is not planned for quantization (see info['skipped'] / info['layers'])")
        site, layer = plan[node.name]
        return Match(root=node, nodes=(node,), bindings={"site": site, "layer": layer})

    def replace(graph: fx.Graph, m: Match) -> fx.Node:
        site, layer = m.bindings["site"], m.bindings["layer"]
        root = m.root
        x = root.args[1] if root.target is aten.addmm.default else root.args[0]
        inputs = [_constant_node(graph, gm, site.node, key, tensor, registered) for key, tensor in layer.tensors.items()]
        out = emit(graph, layer.op, (x, *inputs, *layer.attributes))
        if site.bias_node is not None:
            out = emit(graph, aten.add.Tensor, (out, root.args[0]))
        return out

    return RewriteRule("quantized_linear", LINEAR_ANCHORS, match, replace)


# ---- embeddings ----------------------------------------------------------------------------
def quantize_embeddings(gm: fx.GraphModule, bits: int = 8, group_size: int = 32) -> dict[str, Any]:
    """``aten.embedding(W, ids)`` with a stored table read by nothing else -> int8 rows with one
    scale per row, or 4-bit groups of ``group_size`` (a width the group does not divide stays int8)."""
    replaced, skipped = 0, []
    graph = gm.graph
    registered: dict[int, str] = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.embedding.default:
            continue
        table = node.args[0]
        if not (isinstance(table, fx.Node) and table.op == "get_attr"):
            skipped.append({"node": node.name, "module_path": module_path(node), "reason": "the table is not a stored tensor", "kept": "fp32"})
            continue
        readers = [u for u in table.users if u is not node]
        others = [n for n in graph.nodes if n.op == "get_attr" and n.target == table.target and n is not table]
        if readers or any(o.users for o in others):
            skipped.append({"node": node.name, "module_path": module_path(node), "reason": "the table is also read elsewhere (tied weights); int8 would store it twice", "kept": "fp32"})
            continue
        weight = get_tensor(gm, table.target)
        if weight.dtype != torch.float32 or weight.dim() != 2:
            skipped.append({"node": node.name, "module_path": module_path(node), "reason": f"table is {weight.dtype} {tuple(weight.shape)}", "kept": "fp32"})
            continue
        with graph.inserting_before(node):
            if bits == 4 and weight.shape[1] % group_size == 0:
                q = quantize_nbits(weight, 4, group_size)
                tensors = (("table", q.packed.reshape(q.N, -1)), ("scales", q.scales), ("zero_points", q.zero_points))
                inputs = [_constant_node(graph, gm, node.name, key, t, registered) for key, t in tensors]
                new = emit(graph, torch.ops.graphopt.embedding_nbits.default, (*inputs, node.args[1], group_size, 4))
            else:
                if bits == 4:
                    skipped.append({"node": node.name, "module_path": module_path(node), "reason": f"width {weight.shape[1]} is not a multiple of group_size {group_size}", "kept": "int8"})
                codes, scales = quantize_embedding(weight)
                inputs = [_constant_node(graph, gm, node.name, key, t, registered) for key, t in (("table", codes), ("scales", scales))]
                new = emit(graph, torch.ops.graphopt.embedding_int8.default, (*inputs, node.args[1]))
        new.meta.update({k: node.meta[k] for k in ("nn_module_stack", "graphopt_module_path") if k in node.meta})
        new.meta["graphopt_created_by"] = "quantize:embedding_int8"
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        replaced += 1
    return {"replaced": replaced, "skipped": skipped}

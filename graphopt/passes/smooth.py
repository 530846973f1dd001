"""The smooth pass: per-channel scales that make the quantization after it cheaper, an exact rewrite before ``quantize``.

Linear layers are grouped by the activation they read (Q, K and V read one LayerNorm
output). For each group, calibration activations choose a strength ``α``
(graphopt.quant.smoothing: the candidate with the least simulated quantization error, or none),
and the group's weight columns are multiplied by ``s`` while its input is divided by it.
``scheme`` says which quantization the search simulates, and so which scales it tries:

* ``dynamic`` / ``static``: int8 with per-tensor activations, at run time (the int8 preset's)
  or calibrated once; SmoothQuant's ``s = max|x|^α / max|W|^(1-α)`` migrates activation
  outliers into the weights.
* ``weight_only``: n-bit weights in groups (``bits``, ``group_size``, ``symmetric``: set them as
  ``quantize`` will); AWQ's ``s = mean|x|^α`` gives the weight columns that meet large
  activations more of the rounding grid. Follow it with ``quantize{mode=weight_only}``.

Where the division goes:

* ``value-projection``: the input of an attention output projection is SDPA's output, which
  is linear in V channel by channel; V's weight rows and bias are divided by ``s`` (free);
* ``layer-norm``: a LayerNorm read by nothing but the group gets ``γ / s`` and ``β / s`` (free);
* ``norm-gain``: an RMSNorm's gain (a stored vector multiplying the group's input, read by
  that multiply alone) gets ``w / s`` (free);
* ``up-projection``: a gated MLP's down projection reads ``act(gate(x)) * up(x)``; the up
  projection's weight rows (and bias) are divided by ``s`` (free);
* ``multiply``: otherwise one elementwise ``x * (1 / s)`` before the group (``insert_mul``).
  Post-LN encoders (BERT) need it for Q/K/V and the FFN: their LayerNorm output is also the
  residual, which must not be scaled.
  (Static int8 could absorb it in a per-axis ``QuantizeLinear`` scale, but ORT 1.32's CPU
  kernel for that takes 926 µs on a [1, 128, 384] input against 12 µs for Mul + per-tensor
  QuantizeLinear: the multiply stays.)

The rewrite is exact in real arithmetic (the manager checks it as it checks every exact
pass); what it buys shows once ``quantize`` follows.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import fx

from graphopt.analysis.interpret import run_calibration
from graphopt.analysis.linear import LinearSite, filtered_out, find_linear_sites
from graphopt.context import PassContext
from graphopt.passbase import Pass, PassConfig, PassInfo, PassResult, register_pass
from graphopt.program import Program, module_path
from graphopt.quant.cpu import cpu_int8_support, weight_qmax
from graphopt.quant.smoothing import (
    AWQ_ALPHAS,
    DEFAULT_ALPHAS,
    ActivationSample,
    AlphaChoice,
    activation_scales,
    choose_alpha,
    choose_awq,
    int8_error,
    mean_abs,
    nbits_error_fn,
    smoothing_scales,
)
from graphopt.rewrite import emit, fake
from graphopt.surgery import add_constant, arg_int, arg_ints, arg_node, get_tensor

aten = torch.ops.aten
_LAYOUT = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int, aten.permute.default, aten.contiguous.default, aten.clone.default})


class SmoothConfig(PassConfig):
    alpha: float | None = Field(None, gt=0, lt=1, description="one migration strength for every group (None: chosen per group on calibration data)")
    alphas: tuple[float, ...] | None = Field(None, description="the candidates the per-group search tries (None: the scheme's, 0.3..0.9 for int8, 0.05..0.95 for weight_only)")
    scheme: Literal["dynamic", "static", "weight_only"] = Field("dynamic", description="the quantization that follows (what the search simulates): int8 with per-tensor activations at run time or calibrated, or weight-only n-bit (AWQ's activation-aware scales)")
    bits: Literal[4, 8] = Field(4, description="weight_only: the weights' bits (as quantize's)")
    group_size: int = Field(32, description="weight_only: input rows per scale (as quantize's)")
    symmetric: bool = Field(False, description="weight_only: fixed zero point (as quantize's)")
    weight_range: Literal["auto", "full", "reduced"] = Field("auto", description="int8 weights the search simulates: ±127, ±63, or by CPU (as quantize)")
    include: tuple[str, ...] = Field((), description="fnmatch patterns on module paths of the layers to smooth (empty: all)")
    exclude: tuple[str, ...] = Field((), description="fnmatch patterns on module paths to leave alone")
    insert_mul: bool = Field(True, description="smooth groups whose producer cannot absorb the scales, with one multiply before them")
    min_gain: float = Field(0.05, ge=0, lt=1, description="relative drop of the simulated quantization error a group must gain to be smoothed")
    max_batches: int = Field(8, ge=1, description="calibration batches to observe")

    @model_validator(mode="after")
    def _consistent(self):
        if not 16 <= self.group_size <= 256 or self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size must be a power of two from 16 to 256, got {self.group_size}")
        return self


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SmoothedGroup(_Record):
    layers: list[str]  # module paths (node names where a layer has none)
    fold: str  # value-projection | layer-norm | norm-gain | up-projection | multiply
    alpha: float
    error_before: float  # simulated (int8 or n-bit) relative squared error of the group's outputs
    error_after: float
    max_scale: float
    min_scale: float


class LeftGroup(_Record):
    layers: list[str]
    reason: str
    errors: dict[str, float] = {}


class SmoothInfo(PassInfo):
    smoothed: int = 0
    multiplies_inserted: int = 0
    scheme: str = "dynamic"
    groups: list[SmoothedGroup] = []
    left: list[LeftGroup] = []
    calibration: str | None = None


@register_pass
class Smooth(Pass):
    """Migrate activation outliers into the weights (SmoothQuant) before int8 quantization; exact."""

    name: ClassVar[str] = "smooth"
    Config: ClassVar[type[PassConfig]] = SmoothConfig
    config: SmoothConfig
    Info: ClassVar[type[PassInfo]] = SmoothInfo
    requires_ir = ("aten",)

    @classmethod
    def is_exact(cls, config: SmoothConfig) -> bool:
        return True

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        cfg = self.config
        gm = program.module
        sites, _rejected = program.analysis("linear_sites", find_linear_sites)
        nodes = {n.name: n for n in gm.graph.nodes}
        left: list[LeftGroup] = []
        groups: dict[fx.Node, list[LinearSite]] = {}
        for site in sites:
            node = nodes[site.node]
            why = filtered_out(site, self.config.include, self.config.exclude) or ("" if node.target is aten.linear.default and site.transposed and site.bias_node is None else "only aten.linear layers with a stored weight are smoothed")
            if why:
                left.append(LeftGroup(layers=[_label(site)], reason=why))
                continue
            x = node.args[0]  # aten.linear(x, W, b)
            assert isinstance(x, fx.Node)
            groups.setdefault(x, []).append(site)

        plans: list[tuple[fx.Node, list[LinearSite], str, fx.Node | None]] = []
        for x, members in groups.items():
            fold, producer = _fold_of(gm, x, members, nodes)
            if fold == "multiply" and not cfg.insert_mul:
                left.append(LeftGroup(layers=[_label(s) for s in members], reason="nothing before it can absorb the scales (its input is read elsewhere too, or no stored weight produces it) and insert_mul=false"))
                continue
            plans.append((x, members, fold, producer))
        if not plans:
            return PassResult.unchanged(program, SmoothInfo(left=left), "no group of linear layers to smooth" + _first_reason(left))

        batches, source = ctx.calibration_batches(program, cfg.max_batches)
        samples = {x.name: ActivationSample() for x, *_ in plans}
        first_site = {members[0].node: samples[x.name] for x, members, *_ in plans}
        run_calibration(gm, batches, observe={name: sample.update for name, sample in first_site.items()})

        qmax = weight_qmax(cfg.weight_range, cpu_int8_support())
        static = cfg.scheme == "static"
        done: list[SmoothedGroup] = []
        multiplies = 0
        for x, members, fold, producer in plans:
            weights = [_stored(gm, nodes[s.node].args[1]) for s in members]
            sample = samples[x.name]
            choice = self._choose(sample, weights, static, qmax)
            if choice.scales is None:
                left.append(LeftGroup(layers=[_label(s) for s in members], reason=f"no α lowers the simulated {_what(cfg)} error by {cfg.min_gain:.0%}", errors=_rounded(choice.errors)))
                continue
            s = choice.scales
            for site, weight in zip(members, weights):
                _set_weight(gm, nodes[site.node], weight * s[None, :], f"smooth_{site.node}_weight")
            _divide_input(gm, x, fold, producer, [nodes[m.node] for m in members], s)
            multiplies += fold == "multiply"
            done.append(SmoothedGroup(
                layers=[_label(m) for m in members], fold=fold, alpha=float(choice.alpha or 0.0), error_before=round(choice.error_before, 6),
                error_after=round(choice.error_after, 6), max_scale=round(float(s.max()), 4), min_scale=round(float(s.min()), 6),
            ))
        info = SmoothInfo(smoothed=len(done), multiplies_inserted=multiplies, scheme=cfg.scheme, groups=done, left=left, calibration=source)
        return PassResult.of(program, bool(done), info, f"no group's simulated {_what(cfg)} error drops enough with smoothing" + _first_reason(left))

    def _choose(self, sample: ActivationSample, weights: list[torch.Tensor], static: bool, qmax: int) -> AlphaChoice:
        cfg = self.config
        if cfg.alpha is None:  # searched per group
            if cfg.scheme == "weight_only":
                return choose_awq(sample, weights, cfg.alphas or AWQ_ALPHAS, bits=cfg.bits, block_size=cfg.group_size, symmetric=cfg.symmetric, min_gain=cfg.min_gain)
            return choose_alpha(sample, weights, cfg.alphas or DEFAULT_ALPHAS, static=static, weight_qmax=qmax, min_gain=cfg.min_gain)
        if cfg.scheme == "weight_only":
            error = nbits_error_fn(sample, weights, cfg.bits, cfg.group_size, cfg.symmetric)
            s = activation_scales(mean_abs(sample), cfg.alpha)
        else:
            def error(s: torch.Tensor | None) -> float:
                return int8_error(sample, weights, s, static, qmax)

            weight_absmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(0)
            s = smoothing_scales(sample.absmax, weight_absmax, cfg.alpha)
        before, after = error(None), error(s)
        return AlphaChoice(cfg.alpha, before, after, {"none": before, f"{cfg.alpha:g}": after}, s)


def _what(cfg: SmoothConfig) -> str:
    return f"{cfg.bits}-bit weight-only" if cfg.scheme == "weight_only" else "int8"


def _label(site: LinearSite) -> str:
    return site.module_path or site.node


def _first_reason(left: list[LeftGroup]) -> str:
    return f" (e.g. {left[0].layers[0]}: {left[0].reason})" if left else ""


def _rounded(errors: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 6) for k, v in errors.items()}


def _stored(gm: fx.GraphModule, node) -> torch.Tensor:
    assert isinstance(node, fx.Node) and node.op == "get_attr"
    return get_tensor(gm, str(node.target)).detach().float()


# ---- where the division by s can go ------------------------------------------------------------
def _fold_of(gm: fx.GraphModule, x: fx.Node, members: list[LinearSite], nodes: dict[str, fx.Node]) -> tuple[str, fx.Node | None]:
    group = {nodes[m.node] for m in members}
    if len(members) == 1:
        value = _value_projection(x)
        if value is not None:
            return "value-projection", value
    if x.op == "call_function" and x.target is aten.layer_norm.default and set(x.users) <= group:
        weight, bias = (x.args[2] if len(x.args) > 2 else None), (x.args[3] if len(x.args) > 3 else None)
        if all(isinstance(t, fx.Node) and t.op == "get_attr" for t in (weight, bias)):
            return "layer-norm", None
    if x.op == "call_function" and x.target is aten.mul.Tensor and set(x.users) <= group:
        gain = _stored_vector(gm, x)
        if gain is not None:
            return "norm-gain", gain
        up = _up_projection(x)
        if up is not None:
            return "up-projection", up
    return "multiply", None


def _stored_vector(gm: fx.GraphModule, mul: fx.Node) -> fx.Node | None:
    """The stored 1-D factor of ``mul`` (an RMSNorm's gain: ``w * x_normalised``) along the
    last dim, read by this multiply alone; else None."""
    out = fake(mul)
    if out is None:
        return None
    for arg in mul.args[:2]:
        if isinstance(arg, fx.Node) and arg.op == "get_attr" and len(arg.users) == 1:
            value = get_tensor(gm, str(arg.target))
            if value.dim() == 1 and value.shape[0] == out.shape[-1]:
                return arg
    return None


def _up_projection(mul: fx.Node) -> fx.Node | None:
    """In a gated MLP's ``act(gate(x)) * up(x)``, the ``up`` factor: an ``aten.linear`` with a
    stored weight (and bias, if any) read by this multiply alone, whose output channels are the
    product's. Dividing its rows by ``s`` divides the product's channels by ``s``."""
    a, b = mul.args[:2]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    out, shapes = fake(mul), [fake(a), fake(b)]
    if out is None or any(v is None or tuple(v.shape) != tuple(out.shape) for v in shapes):
        return None  # a broadcast factor would divide other channels too
    for node in (b, a):
        if node.op == "call_function" and node.target is aten.linear.default and len(node.users) == 1 and isinstance(node.args[1], fx.Node) and node.args[1].op == "get_attr":
            bias = node.args[2] if len(node.args) > 2 else None
            if bias is None or (isinstance(bias, fx.Node) and bias.op == "get_attr"):
                return node
    return None


def _value_projection(x: fx.Node) -> fx.Node | None:
    """The V projection (an ``aten.linear`` with a stored weight) whose output channels reach
    ``x`` unpermuted through SDPA and layout ops alone, each read once; else None."""
    node = x
    while node.op == "call_function" and node.target in _LAYOUT:
        node = arg_node(node, 0)
    if not (node.op == "call_function" and node.target is aten.scaled_dot_product_attention.default and len(node.args) > 2):
        return None
    v = node.args[2]
    while isinstance(v, fx.Node) and v.op == "call_function" and v.target in _LAYOUT:
        v = v.args[0]
    if not (isinstance(v, fx.Node) and v.target is aten.linear.default and isinstance(v.args[1], fx.Node) and v.args[1].op == "get_attr"):
        return None
    bias = v.args[2] if len(v.args) > 2 else v.kwargs.get("bias")
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return None
    return v if _channels_reach(v, x) else None


def _channels_reach(start: fx.Node, end: fx.Node) -> bool:
    """Whether ``start``'s last-dim channels arrive at ``end``'s last dim in the same order,
    following single users through view/reshape (split ``c -> (h, d)`` or merge back),
    transposes, permutes, copies and SDPA's value input."""
    val = fake(start)
    if val is None:
        return False
    labels = ["*"] * (val.dim() - 1) + ["c"]
    node = start
    while node is not end:
        if len(node.users) != 1:
            return False
        user = next(iter(user for user in node.users))
        if user.target is aten.scaled_dot_product_attention.default:
            if len(user.args) < 3 or user.args[2] is not node or node in user.args[:2] or labels[-1] != "d":
                return False
        elif user.target in _LAYOUT and user.args[0] is node:
            relabelled = _relabel(user, labels)
            if relabelled is None:
                return False
            labels = relabelled
        else:
            return False
        node = user
    return labels[-1] == "c" and "h" not in labels and "d" not in labels


def _relabel(node: fx.Node, labels: list[str]) -> list[str] | None:
    source, result = fake(node.args[0]), fake(node)
    if source is None or result is None:
        return None
    src, out = [str(d) for d in source.shape], [str(d) for d in result.shape]
    if node.target in (aten.contiguous.default, aten.clone.default):
        return labels
    if node.target is aten.transpose.int:
        a, b = arg_int(node, 1) % len(labels), arg_int(node, 2) % len(labels)
        labels = list(labels)
        labels[a], labels[b] = labels[b], labels[a]
        return labels
    if node.target is aten.permute.default:
        return [labels[i % len(labels)] for i in arg_ints(node, 1)]
    # view / reshape: keep, split the last dim into two, or merge the last two back
    if src == out:
        return labels
    if len(out) == len(src) + 1 and out[:-2] == src[:-1] and labels[-1] == "c":
        return [*labels[:-1], "h", "d"]
    if len(src) == len(out) + 1 and src[:-2] == out[:-1] and labels[-2:] == ["h", "d"]:
        return [*labels[:-2], "c"]
    return None


# ---- the rewrite --------------------------------------------------------------------------------
def _divide_input(gm: fx.GraphModule, x: fx.Node, fold: str, producer: fx.Node | None, readers: list[fx.Node], s: torch.Tensor) -> None:
    """Divide the group's input ``x`` by ``s`` where ``fold`` says (see the module docstring)."""
    if fold in ("value-projection", "up-projection"):
        assert producer is not None
        # the producer's weight as it is now: the group that reads its input may have scaled its columns already
        _set_weight(gm, producer, _stored(gm, producer.args[1]) / s[:, None], f"smooth_{producer.name}_weight")
        bias = producer.args[2] if len(producer.args) > 2 else None
        if isinstance(bias, fx.Node):
            _set_bias(gm, producer, _stored(gm, bias) / s, f"smooth_{producer.name}_bias")
    elif fold == "layer-norm":
        _scale_layer_norm(gm, x, 1.0 / s)
    elif fold == "norm-gain":
        assert producer is not None
        _set_arg(gm, x, x.args.index(producer), _stored(gm, producer) / s, f"smooth_{x.name}_gain")
    else:
        _insert_multiply(gm, x, readers, 1.0 / s)


def _stamp(new: fx.Node, like: fx.Node) -> None:
    new.meta["graphopt_created_by"] = "smooth"
    path = module_path(like)
    if path:
        new.meta["graphopt_module_path"] = path


def _set_weight(gm: fx.GraphModule, linear: fx.Node, weight: torch.Tensor, name: str) -> None:
    with gm.graph.inserting_before(linear):
        const = add_constant(gm, name, weight.contiguous())
    _stamp(const, linear)
    linear.update_arg(1, const)


def _set_bias(gm: fx.GraphModule, linear: fx.Node, bias: torch.Tensor, name: str) -> None:
    with gm.graph.inserting_before(linear):
        const = add_constant(gm, name, bias.contiguous())
    _stamp(const, linear)
    linear.update_arg(2, const)


def _set_arg(gm: fx.GraphModule, node: fx.Node, index: int, value: torch.Tensor, name: str) -> None:
    with gm.graph.inserting_before(node):
        const = add_constant(gm, name, value.contiguous())
    _stamp(const, node)
    node.update_arg(index, const)


def _scale_layer_norm(gm: fx.GraphModule, norm: fx.Node, factor: torch.Tensor) -> None:
    for index in (2, 3):
        stored = norm.args[index]
        assert isinstance(stored, fx.Node)
        with gm.graph.inserting_before(norm):
            const = add_constant(gm, f"smooth_{norm.name}_{'weight' if index == 2 else 'bias'}", get_tensor(gm, str(stored.target)).detach().float() * factor)
        _stamp(const, norm)
        norm.update_arg(index, const)


def _insert_multiply(gm: fx.GraphModule, x: fx.Node, readers: list[fx.Node], factor: torch.Tensor) -> None:
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    first = min(readers, key=order.__getitem__)
    with gm.graph.inserting_before(first):
        const = add_constant(gm, f"smooth_{x.name}_inverse_scale", factor.contiguous())
        product = emit(gm.graph, aten.mul.Tensor, (x, const))
    for node in (const, product):
        _stamp(node, first)
    for reader in readers:
        reader.update_arg(0, product)

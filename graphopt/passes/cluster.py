"""Weight clustering: k-means codebooks per tensor or per row, stored as packed codes.

Each chosen tensor becomes ``clustered_weight(codes, codebook, shape, bits)``: ``codes`` are
``bits``-bit indices packed into uint8, ``codebook`` holds ``2**bits`` centroids per row
(or one set for the tensor). The program stays runnable and trainable (distillation moves
the centroids); the ONNX file stores the packed form and ONNX Runtime decodes it once at
session load, so inference runs at dense speed.

Combinable with quantization: run it *after* ``quantize`` and it clusters the int8 weight
codes themselves (integer centroids), which the int8 kernels then read as usual.
Embedding tables (``aten.embedding`` / int8 embedding inputs) get their own bit width and,
by default, one codebook per table (a codebook per vocabulary row would cost more than it saves).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import fx

from graphopt.analysis.interpret import run_calibration
from graphopt.analysis.linear import find_linear_sites
from graphopt.cluster import Clustering, kmeans_1d, pack_codes
from graphopt.cluster.kmeans import assign_with_error_feedback
from graphopt.context import Batch, PassContext
from graphopt.passbase import Pass, PassConfig, PassInfo, PassResult, register_pass
from graphopt.program import Program, module_path
from graphopt.surgery import free_attr_name, get_tensor, replace_node, tensor_readers

aten = torch.ops.aten
Granularity = Literal["row", "tensor"]
# Input statistics settle after a few batches; more only cost interpreter runs.
MAX_CALIBRATION_BATCHES = 16


class ClusterConfig(PassConfig):
    bits: int = Field(4, ge=2, le=8, description="code width: 2**bits centroids (4 to 256)")
    granularity: Granularity = Field("row", description="one codebook per output row, or per tensor")
    embedding_bits: int | None = Field(None, ge=2, le=8, description="code width for embedding tables (default: bits)")
    embedding_granularity: Granularity = "tensor"
    include: tuple[str, ...] = Field((), description="fnmatch patterns on tensor names to cluster (empty: all)")
    exclude: tuple[str, ...] = Field((), description="fnmatch patterns on tensor names to keep dense")
    min_numel: int = Field(4096, ge=1, description="leave smaller tensors (biases, norms) dense")
    iterations: int = Field(20, ge=1, description="Lloyd iterations")
    codebook_dtype: Literal["float32", "float16"] = Field("float32", description="storage of float codebooks")
    weighting: Literal["uniform", "activations", "hessian"] = Field(
        "uniform",
        description="calibration-aware coding of linear weights: activations = error weighted by each input's mean "
        "square; hessian = codes chosen column by column with GPTQ's error feedback on E[x xᵀ]",
    )


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SkippedTensor(_Record):
    """A tensor of at least ``min_numel`` elements left dense, and why."""

    tensor: str  # the tensor's name (what include / exclude match)
    node: str  # the first get_attr node reading it
    module_path: str  # the module of the first node that uses it
    reason: str
    kept: str = "dense"


class ClusteredTensor(_Record):
    bits: int
    codebooks: int
    relative_error: float  # ‖decoded - original‖ / ‖original‖
    bytes_before: int
    bytes_after: int
    tied_to: str | None = None  # another name of the same tensor: it reads that one's codes
    weighting: str | None = None  # calibration-aware coding used, if any


class ClusterInfo(PassInfo):
    clustered: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    tensors: dict[str, ClusteredTensor] = {}
    skipped: list[SkippedTensor] = []
    calibration: str | None = None  # where the input statistics came from, when weighted


@dataclass(frozen=True)
class _Coding:
    """How one tensor is coded: what the config says for it."""

    bits: int
    granularity: str
    iterations: int
    codebook_dtype: str


@register_pass
class Cluster(Pass):
    """Replace weights by k-means codebooks + packed codes. Lossy; exact when a tensor has
    no more distinct values than centroids."""

    name: ClassVar[str] = "cluster"
    Config: ClassVar[type[PassConfig]] = ClusterConfig
    config: ClusterConfig  # the validated options (narrowed from PassConfig for type checkers)
    Info: ClassVar[type[PassInfo]] = ClusterInfo

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        cfg = self.config
        gm = program.module
        readers = tensor_readers(gm)
        tables = embedding_tables(gm)
        importance: dict[str, tuple[str, torch.Tensor, bool]] = {}
        source = None
        if cfg.weighting != "uniform":
            batches, source = ctx.calibration_batches(program, MAX_CALIBRATION_BATCHES)
            importance = input_statistics(program, batches, cfg.weighting)

        done: dict[str, ClusteredTensor] = {}
        skipped: list[SkippedTensor] = []
        shared: dict[tuple, tuple[str, str, str]] = {}  # storage -> (codes name, codebook name, first tensor name)
        for name in sorted(readers):
            nodes = readers[name]
            if not any(node.users for node in nodes):
                continue  # read by nothing (torch.export keeps a dead get_attr for a tied name)
            tensor = get_tensor(gm, name)
            why = self._unsuitable(name, tensor, nodes)
            if why:
                if isinstance(tensor, torch.Tensor) and tensor.numel() >= cfg.min_numel:
                    skipped.append(SkippedTensor(tensor=name, node=nodes[0].name, module_path=_user_path(nodes), reason=why))
                continue
            storage = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
            if storage in shared:  # another name for a tensor already clustered: read the same codes
                codes_name, book_name, first = shared[storage]
                _read_clustered(gm, nodes, codes_name, book_name, list(tensor.shape), done[first].bits)
                done[name] = done[first].model_copy(update={"bytes_before": 0, "bytes_after": 0, "tied_to": first})
                continue
            shared[storage] = (*_cluster_names(gm, name), name)
            coding = self._coding(name in tables)
            done[name] = _cluster_attr(gm, shared[storage][:2], tensor, nodes, coding, importance.get(name))
            if name in importance:
                done[name] = done[name].model_copy(update={"weighting": cfg.weighting})
        info = ClusterInfo(
            clustered=len(done),
            bytes_before=sum(d.bytes_before for d in done.values()),
            bytes_after=sum(d.bytes_after for d in done.values()),
            tensors=done,
            skipped=skipped,
            calibration=source,
        )
        return PassResult.of(program, bool(done), info, _why_unchanged(readers, skipped, cfg))

    def _coding(self, is_table: bool) -> _Coding:
        cfg = self.config
        bits = (cfg.embedding_bits or cfg.bits) if is_table else cfg.bits
        return _Coding(bits, cfg.embedding_granularity if is_table else cfg.granularity, cfg.iterations, cfg.codebook_dtype)

    def _unsuitable(self, name: str, tensor: Any, nodes: list[fx.Node]) -> str | None:
        cfg = self.config
        if not isinstance(tensor, torch.Tensor):
            return "not a tensor"
        if any(user.target is torch.ops.graphopt.clustered_weight.default for node in nodes for user in node.users):
            return "already clustered (codes or codebook)"
        if not (tensor.is_floating_point() or tensor.dtype == torch.int8):
            return f"dtype {tensor.dtype}"
        if tensor.numel() < cfg.min_numel:
            return "smaller than min_numel"
        if cfg.include and not any(fnmatch.fnmatchcase(name, p) for p in cfg.include):
            return f"not selected by include={list(cfg.include)}"
        if any(fnmatch.fnmatchcase(name, p) for p in cfg.exclude):
            return "excluded by exclude"
        return None


def _why_unchanged(readers: dict[str, list[fx.Node]], skipped: list[SkippedTensor], cfg: ClusterConfig) -> str:
    if not skipped:
        return f"no stored tensor of at least min_numel={cfg.min_numel} elements ({len(readers)} tensors read)"
    return f"none of the {len(skipped)} tensors of at least min_numel={cfg.min_numel} elements could be clustered (first: {skipped[0].tensor}: {skipped[0].reason})"


def _user_path(nodes: list[fx.Node]) -> str:
    for node in nodes:
        for user in node.users:
            return module_path(user)
    return ""


def embedding_tables(gm: fx.GraphModule) -> set[str]:
    """Names of tensors used as lookup tables (float or int8 embeddings)."""
    lookups = {aten.embedding.default}
    int8_lookup = getattr(getattr(torch.ops, "graphopt", None), "embedding_int8", None)
    names: set[str] = set()
    for node in gm.graph.nodes:
        is_lookup = node.target in lookups or (int8_lookup is not None and node.target == int8_lookup.default)
        if node.op == "call_function" and is_lookup and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr":
            names.add(str(node.args[0].target))
    return names


def input_statistics(program: Program, batches: list[Batch], kind: str) -> dict[str, tuple[str, torch.Tensor, bool]]:
    """Per linear weight (by tensor name): (kind, statistic, stored transposed). ``activations``:
    the mean square of each input channel [K]; ``hessian``: E[x xᵀ] [K, K]."""
    sites, _ = program.analysis("linear_sites", find_linear_sites)
    if not sites:
        return {}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def observer(site_node: str):
        def observe(x: torch.Tensor) -> None:
            flat = x.detach().float().reshape(-1, x.shape[-1])
            moment = flat.T @ flat if kind == "hessian" else flat.square().sum(dim=0)
            sums[site_node] = sums.get(site_node, 0) + moment
            counts[site_node] = counts.get(site_node, 0) + flat.shape[0]

        return observe

    run_calibration(program.module, batches, observe={s.node: observer(s.node) for s in sites})
    out: dict[str, tuple[str, torch.Tensor, bool]] = {}
    for site in sites:
        if site.node not in sums:
            continue
        moment = sums[site.node] / counts[site.node]
        previous = out.get(site.weight_name)  # a weight read by several linears: add their needs
        out[site.weight_name] = (kind, moment if previous is None else previous[1] + moment, site.transposed)
    return out


def _cluster_attr(
    gm: fx.GraphModule,
    names: tuple[str, str],
    tensor: torch.Tensor,
    nodes: list[fx.Node],
    coding: _Coding,
    statistics: tuple[str, torch.Tensor, bool] | None,
) -> ClusteredTensor:
    data = tensor.detach()
    transposed = True if statistics is None else statistics[2]
    rows = data.shape[0] if coding.granularity == "row" and data.dim() >= 2 else 1
    importance = None
    if statistics is not None and data.dim() == 2:
        # statistics are per input channel K: dim 1 of an [N, K] weight (nn.Linear), dim 0 of [K, N]
        diagonal = statistics[1] if statistics[0] == "activations" else torch.diagonal(statistics[1])
        diagonal = diagonal / diagonal.mean().clamp_min(1e-30) + 1e-3  # scale-free, never zero
        importance = (diagonal[None, :] if transposed else diagonal[:, None]).expand(data.shape).reshape(rows, -1)
    clustering = kmeans_1d(data.reshape(rows, -1), 1 << coding.bits, iterations=coding.iterations, importance=importance)
    # Error feedback needs one codebook per output row (or one per tensor): an [N, K] weight
    # coded per row, or any weight coded per tensor.
    if statistics is not None and statistics[0] == "hessian" and data.dim() == 2 and data.is_floating_point() and (rows == 1 or transposed):
        matrix = data if transposed else data.T  # [N, K]
        codes = assign_with_error_feedback(matrix, clustering.codebook, statistics[1])
        clustering = Clustering(clustering.codebook, (codes if transposed else codes.T).reshape(rows, -1))
    codes = pack_codes(clustering.codes, coding.bits)
    codebook = clustering.codebook.contiguous()
    if coding.codebook_dtype == "float16" and codebook.is_floating_point():
        codebook = codebook.half()
        clustering = Clustering(codebook.float(), clustering.codes)
    codes_name, book_name = names
    gm.register_buffer(codes_name, codes)
    if codebook.is_floating_point():
        # A parameter, not a buffer: distillation trains the centroids (surgery.add_constant
        # makes buffers only).
        gm.register_parameter(book_name, torch.nn.Parameter(codebook, requires_grad=tensor.requires_grad))
    else:
        gm.register_buffer(book_name, codebook)
    _read_clustered(gm, nodes, codes_name, book_name, list(data.shape), coding.bits)
    decoded = clustering.decode().reshape(data.shape).float()
    reference = data.float()
    error = ((decoded - reference).norm() / reference.norm().clamp_min(1e-12)).item()
    return ClusteredTensor(
        bits=coding.bits,
        codebooks=rows,
        relative_error=round(error, 5),
        bytes_before=tensor.numel() * tensor.element_size(),
        bytes_after=codes.numel() + codebook.numel() * codebook.element_size(),
    )


def _cluster_names(gm: torch.nn.Module, name: str) -> tuple[str, str]:
    return free_attr_name(gm, f"cluster_{name}_codes"), free_attr_name(gm, f"cluster_{name}_codebook")


def _read_clustered(gm: fx.GraphModule, nodes: list[fx.Node], codes_name: str, book_name: str, shape: list[int], bits: int) -> None:
    """Replace each get_attr in ``nodes`` by ``clustered_weight(codes, codebook, shape, bits)``.

    A loop rather than a rewrite rule: the anchors are ``get_attr`` nodes, which rules
    (anchored on ``call_function`` targets) do not visit."""
    graph = gm.graph
    for node in nodes:
        with graph.inserting_before(node):
            codes_node, book_node = graph.get_attr(codes_name), graph.get_attr(book_name)
            dense = graph.call_function(torch.ops.graphopt.clustered_weight.default, (codes_node, book_node, shape, bits))
        dense.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta")})
        replace_node(node, dense, "cluster:clustered_weight")

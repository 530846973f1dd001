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
import re
from typing import Any, ClassVar, Literal

import torch
import torch.fx as fx
from pydantic import Field

from graphopt.cluster import Clustering, kmeans_1d, pack_codes
from graphopt.cluster.kmeans import assign_with_error_feedback
from graphopt.passbase import Pass, PassConfig, PassResult, register_pass
from graphopt.surgery import remove_unused_tensors
from graphopt.program import Program
from graphopt.quant.calibration import CalibrationSet, run_calibration
from graphopt.quant.constants import free_attr_name

aten = torch.ops.aten
Granularity = Literal["row", "tensor"]


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


@register_pass
class Cluster(Pass):
    """Replace weights by k-means codebooks + packed codes. Lossy; exact when a tensor has
    no more distinct values than centroids."""

    name: ClassVar[str] = "cluster"
    exact: ClassVar[bool] = False
    Config: ClassVar[type[PassConfig]] = ClusterConfig

    def __init__(self, config: ClusterConfig | None = None, *, calibration: CalibrationSet | None = None, **options: Any):
        super().__init__(config, **options)
        self.calibration = calibration

    def run(self, program: Program) -> PassResult:
        cfg = self.config
        gm = program.module
        readers: dict[str, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                readers.setdefault(node.target, []).append(node)
        tables = embedding_tables(gm)
        importance = input_statistics(program, self.calibration, cfg.weighting) if cfg.weighting != "uniform" else {}

        done: dict[str, dict[str, Any]] = {}
        skipped: dict[str, str] = {}
        decoder = torch.ops.graphopt.clustered_weight.default
        shared: dict[tuple, tuple] = {}
        for name in sorted(readers):
            tensor = _get(gm, name)
            why = self._unsuitable(name, tensor)
            if any(user.target is decoder for node in readers[name] for user in node.users):
                why = "already clustered (codes or codebook)"
            if not any(node.users for node in readers[name]):
                continue  # read by nothing (torch.export keeps a dead get_attr for a tied name)
            if why:
                if isinstance(tensor, torch.Tensor) and tensor.numel() >= cfg.min_numel:
                    skipped[name] = why
                continue
            is_table = name in tables
            bits = (cfg.embedding_bits or cfg.bits) if is_table else cfg.bits
            granularity = cfg.embedding_granularity if is_table else cfg.granularity
            storage = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
            if storage in shared:  # another name for a tensor already clustered: read the same codes
                codes_name, book_name, first = shared[storage]
                _read_clustered(gm, readers[name], codes_name, book_name, list(tensor.shape), done[first]["bits"])
                done[name] = {**done[first], "bytes_before": 0, "bytes_after": 0, "tied_to": first}
                continue
            shared[storage] = (*_cluster_names(gm, name), name)
            done[name] = _cluster_attr(gm, shared[storage][:2], tensor, readers[name], bits, granularity, cfg.iterations, importance.get(name), cfg.codebook_dtype)
            if name in importance:
                done[name]["weighting"] = cfg.weighting
        if not done:
            return PassResult(program, False, {"clustered": 0, "skipped": skipped})
        remove_unused_tensors(gm)
        gm.graph.lint()
        gm.recompile()
        before = sum(d["bytes_before"] for d in done.values())
        after = sum(d["bytes_after"] for d in done.values())
        return PassResult(
            program,
            True,
            {"clustered": len(done), "bytes_before": before, "bytes_after": after, "tensors": done, "skipped": skipped},
        )

    def _unsuitable(self, name: str, tensor: Any) -> str | None:
        cfg = self.config
        if not isinstance(tensor, torch.Tensor):
            return "not a tensor"
        if not (tensor.is_floating_point() or tensor.dtype == torch.int8):
            return f"dtype {tensor.dtype}"
        if tensor.numel() < cfg.min_numel:
            return "smaller than min_numel"
        if cfg.include and not any(fnmatch.fnmatchcase(name, p) for p in cfg.include):
            return "not in include"
        if any(fnmatch.fnmatchcase(name, p) for p in cfg.exclude):
            return "excluded"
        return None


def embedding_tables(gm: fx.GraphModule) -> set[str]:
    """Names of tensors used as lookup tables (float or int8 embeddings)."""
    lookups = {aten.embedding.default}
    int8_lookup = getattr(getattr(torch.ops, "graphopt", None), "embedding_int8", None)
    names = set()
    for node in gm.graph.nodes:
        is_lookup = node.target in lookups or (int8_lookup is not None and node.target == int8_lookup.default)
        if node.op == "call_function" and is_lookup and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr":
            names.add(node.args[0].target)
    return names


def input_statistics(program: Program, calibration: CalibrationSet | None, kind: str) -> dict[str, tuple[str, torch.Tensor, bool]]:
    """Per linear weight (by tensor name): (kind, statistic, stored transposed). ``activations``:
    the mean square of each input channel [K]; ``hessian``: E[x xᵀ] [K, K]."""
    from graphopt.quant.sites import find_linear_sites

    sites, _ = find_linear_sites(program)
    if not sites:
        return {}
    data = calibration or _default_calibration(program)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def observer(site_node: str):
        def observe(x: torch.Tensor) -> None:
            flat = x.detach().float().reshape(-1, x.shape[-1])
            moment = flat.T @ flat if kind == "hessian" else flat.square().sum(dim=0)
            sums[site_node] = sums.get(site_node, 0) + moment
            counts[site_node] = counts.get(site_node, 0) + flat.shape[0]
        return observe

    run_calibration(program.module, data, observe={s.node: observer(s.node) for s in sites})
    out: dict[str, tuple[str, torch.Tensor, bool]] = {}
    for site in sites:
        if site.node not in sums:
            continue
        moment = sums[site.node] / counts[site.node]
        previous = out.get(site.weight_name)  # a weight read by several linears: add their needs
        out[site.weight_name] = (kind, moment if previous is None else previous[1] + moment, site.transposed)
    return out


def _default_calibration(program: Program) -> CalibrationSet:
    tokenizer = program.meta.get("tokenizer")
    if tokenizer is None:
        return CalibrationSet.from_program(program)
    from graphopt.data import train_sentences

    return CalibrationSet.from_sentences(tokenizer, train_sentences(64), input_names=list(program.kwargs) or None)


def _cluster_attr(
    gm: fx.GraphModule,
    names: tuple[str, str],
    tensor: torch.Tensor,
    nodes: list[fx.Node],
    bits: int,
    granularity: str,
    iterations: int,
    statistics: tuple[str, torch.Tensor, bool] | None,
    codebook_dtype: str = "float32",
) -> dict[str, Any]:
    data = tensor.detach()
    transposed = True if statistics is None else statistics[2]
    rows = data.shape[0] if granularity == "row" and data.dim() >= 2 else 1
    importance = None
    if statistics is not None and data.dim() == 2:
        # statistics are per input channel K: dim 1 of an [N, K] weight (nn.Linear), dim 0 of [K, N]
        diagonal = statistics[1] if statistics[0] == "activations" else torch.diagonal(statistics[1])
        diagonal = diagonal / diagonal.mean().clamp_min(1e-30) + 1e-3  # scale-free, never zero
        importance = (diagonal[None, :] if transposed else diagonal[:, None]).expand(data.shape).reshape(rows, -1)
    clustering = kmeans_1d(data.reshape(rows, -1), 1 << bits, iterations=iterations, importance=importance)
    # Error feedback needs one codebook per output row (or one per tensor): an [N, K] weight
    # coded per row, or any weight coded per tensor.
    if statistics is not None and statistics[0] == "hessian" and data.dim() == 2 and data.is_floating_point() and (rows == 1 or transposed):
        matrix = data if transposed else data.T  # [N, K]
        codes = assign_with_error_feedback(matrix, clustering.codebook, statistics[1])
        clustering = Clustering(clustering.codebook, (codes if transposed else codes.T).reshape(rows, -1))
    codes = pack_codes(clustering.codes, bits)
    codebook = clustering.codebook.contiguous()
    if codebook_dtype == "float16" and codebook.is_floating_point():
        codebook = codebook.half()
        clustering = Clustering(codebook.float(), clustering.codes)
    codes_name, book_name = names
    gm.register_buffer(codes_name, codes)
    if codebook.is_floating_point():
        gm.register_parameter(book_name, torch.nn.Parameter(codebook, requires_grad=tensor.requires_grad))
    else:
        gm.register_buffer(book_name, codebook)
    _read_clustered(gm, nodes, codes_name, book_name, list(data.shape), bits=bits)
    decoded = clustering.decode().reshape(data.shape).float()
    reference = data.float()
    error = ((decoded - reference).norm() / reference.norm().clamp_min(1e-12)).item()
    return {
        "bits": bits,
        "codebooks": rows,
        "relative_error": round(error, 5),
        "bytes_before": tensor.numel() * tensor.element_size(),
        "bytes_after": codes.numel() + codebook.numel() * codebook.element_size(),
    }


def _cluster_names(gm: torch.nn.Module, name: str) -> tuple[str, str]:
    base = "cluster_" + re.sub(r"[^0-9A-Za-z_]", "_", name)
    return free_attr_name(gm, f"{base}_codes"), free_attr_name(gm, f"{base}_codebook")


def _read_clustered(gm: fx.GraphModule, nodes: list[fx.Node], codes_name: str, book_name: str, shape: list[int], bits: int) -> None:
    """Replace each get_attr in ``nodes`` by ``clustered_weight(codes, codebook, shape, bits)``."""
    graph = gm.graph
    for node in nodes:
        with graph.inserting_before(node):
            codes_node, book_node = graph.get_attr(codes_name), graph.get_attr(book_name)
            dense = graph.call_function(torch.ops.graphopt.clustered_weight.default, (codes_node, book_node, shape, bits))
        dense.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "graphopt_module_path")})
        node.replace_all_uses_with(dense)
        graph.erase_node(node)


def _get(gm: torch.nn.Module, name: str) -> Any:
    value = gm
    for part in name.split("."):
        value = getattr(value, part, None)
    return value

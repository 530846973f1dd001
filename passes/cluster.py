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

from graphopt.cluster import kmeans_1d, pack_codes
from graphopt.passbase import Pass, PassConfig, PassResult, register_pass
from graphopt.passes.dce import remove_unused_tensors
from graphopt.program import Program

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


@register_pass
class Cluster(Pass):
    """Replace weights by k-means codebooks + packed codes. Lossy; exact when a tensor has
    no more distinct values than centroids."""

    name: ClassVar[str] = "cluster"
    exact: ClassVar[bool] = False
    Config: ClassVar[type[PassConfig]] = ClusterConfig

    def run(self, program: Program) -> PassResult:
        cfg = self.config
        gm = program.module
        readers: dict[str, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                readers.setdefault(node.target, []).append(node)
        tables = embedding_tables(gm)

        done: dict[str, dict[str, Any]] = {}
        skipped: dict[str, str] = {}
        for name in sorted(readers):
            tensor = _get(gm, name)
            why = self._unsuitable(name, tensor)
            if why:
                if isinstance(tensor, torch.Tensor) and tensor.numel() >= cfg.min_numel:
                    skipped[name] = why
                continue
            is_table = name in tables
            bits = (cfg.embedding_bits or cfg.bits) if is_table else cfg.bits
            granularity = cfg.embedding_granularity if is_table else cfg.granularity
            done[name] = _cluster_attr(gm, name, tensor, readers[name], bits, granularity, cfg.iterations)
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


def _cluster_attr(gm: fx.GraphModule, name: str, tensor: torch.Tensor, nodes: list[fx.Node], bits: int, granularity: str, iterations: int) -> dict[str, Any]:
    data = tensor.detach()
    rows = data.shape[0] if granularity == "row" and data.dim() >= 2 else 1
    clustering = kmeans_1d(data.reshape(rows, -1), 1 << bits, iterations=iterations)
    codes = pack_codes(clustering.codes, bits)
    codebook = clustering.codebook.contiguous()
    base = "cluster_" + re.sub(r"[^0-9A-Za-z_]", "_", name)
    codes_name, book_name = _free_name(gm, f"{base}_codes"), _free_name(gm, f"{base}_codebook")
    gm.register_buffer(codes_name, codes)
    if codebook.is_floating_point():
        gm.register_parameter(book_name, torch.nn.Parameter(codebook, requires_grad=tensor.requires_grad))
    else:
        gm.register_buffer(book_name, codebook)
    shape = list(data.shape)
    graph = gm.graph
    for node in nodes:
        with graph.inserting_before(node):
            codes_node, book_node = graph.get_attr(codes_name), graph.get_attr(book_name)
            dense = graph.call_function(torch.ops.graphopt.clustered_weight.default, (codes_node, book_node, shape, bits))
        dense.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "graphopt_module_path")})
        node.replace_all_uses_with(dense)
        graph.erase_node(node)
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


def _get(gm: torch.nn.Module, name: str) -> Any:
    value = gm
    for part in name.split("."):
        value = getattr(value, part, None)
    return value


def _free_name(gm: torch.nn.Module, base: str) -> str:
    name, suffix = base, 1
    while hasattr(gm, name):
        name, suffix = f"{base}_{suffix}", suffix + 1
    return name

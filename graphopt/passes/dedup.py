"""Weight de-duplication: tensors with identical contents are stored once.

Every ``get_attr`` that reads a duplicate is pointed at one canonical tensor and the
duplicates are deleted, so the program, and the ONNX file exported from it, hold one copy.
Tied weights (two names for one tensor) are the degenerate case: already one storage,
now also one name, which keeps them tied through export.

Exact, but note that it ties tensors that merely happen to be equal (e.g. freshly
initialised LayerNorm weights): run it after any pass that trains the weights.
"""

from __future__ import annotations

import hashlib
from typing import ClassVar

import torch
from pydantic import Field

from graphopt.passbase import Pass, PassConfig, PassResult, register_pass
from graphopt.passes.dce import remove_unused_tensors
from graphopt.program import Program


class DedupConfig(PassConfig):
    min_numel: int = Field(1, ge=1, description="ignore tensors smaller than this many elements")


def _content_key(tensor: torch.Tensor) -> tuple:
    data = tensor.detach().contiguous().cpu()
    digest = hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    return (str(tensor.dtype), tuple(tensor.shape), digest)


@register_pass
class Deduplicate(Pass):
    """Store identical tensors once: redirect every reader to one canonical tensor and
    delete the copies. Exact."""

    name: ClassVar[str] = "dedup"
    exact: ClassVar[bool] = True
    Config: ClassVar[type[PassConfig]] = DedupConfig

    def run(self, program: Program) -> PassResult:
        gm = program.module
        readers: dict[str, list] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                readers.setdefault(node.target, []).append(node)

        groups: dict[tuple, list[str]] = {}
        for name in sorted(readers):
            try:
                value = _get_attr(gm, name)
            except AttributeError:
                continue
            if not isinstance(value, torch.Tensor) or value.numel() < self.config.min_numel:
                continue
            groups.setdefault(_content_key(value), []).append(name)

        merged: dict[str, str] = {}
        saved_bytes = 0
        for key, names in groups.items():
            if len(names) < 2:
                continue
            canonical = names[0]
            keep = _get_attr(gm, canonical)
            for name in names[1:]:
                other = _get_attr(gm, name)
                if other.untyped_storage().data_ptr() != keep.untyped_storage().data_ptr():
                    saved_bytes += other.numel() * other.element_size()
                for node in readers[name]:
                    node.target = canonical
                merged[name] = canonical

        if not merged:
            return PassResult(program, False, {"groups": 0})
        removed = remove_unused_tensors(gm)
        gm.graph.lint()
        gm.recompile()
        return PassResult(
            program,
            True,
            {"groups": sum(1 for names in groups.values() if len(names) > 1), "tensors_merged": len(merged), "bytes_saved": saved_bytes, "merged": merged, "removed": removed},
        )


def _get_attr(gm: torch.nn.Module, name: str):
    value = gm
    for part in name.split("."):
        value = getattr(value, part)
    return value

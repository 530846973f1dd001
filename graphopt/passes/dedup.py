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

from graphopt.context import PassContext
from graphopt.passbase import Pass, PassConfig, PassInfo, PassResult, register_pass
from graphopt.program import Program
from graphopt.surgery import get_tensor, tensor_readers


class DedupConfig(PassConfig):
    min_numel: int = Field(1, ge=1, description="ignore tensors smaller than this many elements")


class DedupInfo(PassInfo):
    groups: int = 0
    tensors_merged: int = 0
    bytes_saved: int = 0
    merged: dict[str, str] = {}  # duplicate name -> the canonical name its readers now read


def _content_key(tensor: torch.Tensor) -> tuple:
    data = tensor.detach().contiguous().cpu()
    digest = hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    return (str(tensor.dtype), tuple(tensor.shape), digest)


@register_pass
class Deduplicate(Pass):
    """Store identical tensors once: every reader of a copy reads one canonical tensor."""

    name: ClassVar[str] = "dedup"
    Config: ClassVar[type[PassConfig]] = DedupConfig
    Info: ClassVar[type[PassInfo]] = DedupInfo
    config: DedupConfig  # the validated options (narrowed from PassConfig for type checkers)

    @classmethod
    def is_exact(cls, config: DedupConfig) -> bool:
        return True

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        gm = program.module
        readers = tensor_readers(gm)
        groups: dict[tuple, list[str]] = {}
        for name in sorted(readers):
            try:
                value = get_tensor(gm, name)
            except AttributeError:
                continue
            if isinstance(value, torch.Tensor) and value.numel() >= self.config.min_numel:
                groups.setdefault(_content_key(value), []).append(name)

        merged: dict[str, str] = {}
        saved_bytes = 0
        for names in groups.values():
            canonical, keep = names[0], get_tensor(gm, names[0])
            for name in names[1:]:
                other = get_tensor(gm, name)
                if other.untyped_storage().data_ptr() != keep.untyped_storage().data_ptr():
                    saved_bytes += other.numel() * other.element_size()
                for node in readers[name]:
                    node.target = canonical
                merged[name] = canonical
        info = DedupInfo(groups=sum(1 for names in groups.values() if len(names) > 1), tensors_merged=len(merged), bytes_saved=saved_bytes, merged=merged)
        return PassResult.of(program, bool(merged), info, f"no two of the {sum(map(len, groups.values()))} tensors hold equal contents")

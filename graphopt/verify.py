"""Numerical drift between two sets of outputs, and the budget lossy passes are held to."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

# Exact passes may move outputs by at most this much, relative to the outputs' magnitude
# (max |a - b| / max |b|): fp32 reassociation (e.g. fused attention) stays far below it.
EXACT_RTOL = 1e-5


@dataclass(frozen=True)
class Drift:
    """How far ``candidate`` outputs are from ``reference`` ones (worst over all outputs)."""

    max_abs: float
    max_rel: float  # max |a - b| / max |b|, per output, worst output
    cosine: float  # cosine of the flattened outputs, worst output
    shape_mismatch: str = ""

    def to_dict(self) -> dict:
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in asdict(self).items()}

    def __str__(self) -> str:
        if self.shape_mismatch:
            return self.shape_mismatch
        return f"max_abs={self.max_abs:.3g} max_rel={self.max_rel:.3g} cosine={self.cosine:.6f}"


def real_positions(kwargs: dict | None) -> torch.Tensor | None:
    """Real (non-padding) positions of a batch, ``[batch, seq]`` bool, from a 2-D integer
    ``attention_mask`` keyword input; ``None`` when there is none (every position counts)."""
    mask = kwargs.get("attention_mask") if kwargs else None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not mask.is_floating_point():
        return mask.bool()
    return None


def drift(reference: tuple[torch.Tensor, ...], candidate: tuple[torch.Tensor, ...], valid: torch.Tensor | None = None) -> Drift:
    """Worst-output drift of ``candidate`` from ``reference``.

    ``valid``: a ``[batch, seq]`` boolean mask of real (not padding) positions; outputs of
    shape ``[batch, seq, ...]`` are then compared on those positions only. A padded
    position's output is not used by anything downstream, and under quantization it can
    drift far more than the real tokens (MiniLM int8: cosine 0.91 over all positions of
    its padded example batch, 0.991 over the real ones).
    """
    if len(reference) != len(candidate):
        return Drift(math.inf, math.inf, -1.0, f"{len(candidate)} outputs, expected {len(reference)}")
    max_abs = max_rel = 0.0
    cosine = 1.0
    for i, (ref, got) in enumerate(zip(reference, candidate)):
        if ref.shape != got.shape:
            return Drift(math.inf, math.inf, -1.0, f"output {i} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
        if valid is not None and ref.dim() >= 3 and tuple(ref.shape[:2]) == tuple(valid.shape):
            ref, got = ref[valid], got[valid]
        ref64 = ref.detach().double().flatten()
        got64 = got.detach().double().flatten()
        if ref64.numel() == 0:
            continue
        if not torch.isfinite(got64).all() and torch.isfinite(ref64).all():
            return Drift(math.inf, math.inf, -1.0, f"output {i} has non-finite values")
        diff = (ref64 - got64).abs().max().item()
        scale = ref64.abs().max().item()
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf))
        denom = ref64.norm() * got64.norm()
        cos = (ref64 @ got64 / denom).item() if denom > 0 else (1.0 if diff == 0 else 0.0)
        cosine = min(cosine, cos)
    return Drift(max_abs, max_rel, cosine)


class Budget(BaseModel):
    """How far lossy passes may move the outputs from the original model's, in total."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_cosine: float = Field(0.99, ge=-1.0, le=1.0, description="worst-output cosine to the original outputs")
    max_rel: float = Field(math.inf, gt=0, description="max |a-b| / max |ref| over outputs")
    exact_rtol: float = Field(EXACT_RTOL, gt=0, description="tolerance of passes that declare themselves exact")

    def check(self, total: Drift) -> str:
        """Empty string when within budget, else why not."""
        if total.shape_mismatch:
            return total.shape_mismatch
        if total.cosine < self.min_cosine:
            return f"cosine {total.cosine:.6f} < budget min_cosine {self.min_cosine}"
        if total.max_rel > self.max_rel:
            return f"max_rel {total.max_rel:.3g} > budget max_rel {self.max_rel}"
        return ""

    def check_exact(self, step: Drift) -> str:
        if step.shape_mismatch:
            return step.shape_mismatch
        if step.max_rel > self.exact_rtol:
            return f"exact pass moved the outputs: max_rel {step.max_rel:.3g} > {self.exact_rtol:g} ({step})"
        return ""

"""Numerical drift between two sets of outputs, and the budget lossy passes are held to.

Drift is measured over one or several input batches at once (the verification set), output
by output, and reported for the worst output. It is NaN- and inf-aware: a value that is not
finite in one set and finite (or a different non-finite value) in the other is a failure
with its count, never a number that ``max``/``min`` silently skip; positions where both
sides hold the same non-finite value (a ``-inf`` mask row in both) agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

# Exact passes may move outputs by at most this much, relative to the outputs' magnitude
# (max |a - b| / max |b|), or by EXACT_FLOOR_FACTOR times the program's own rounding floor
# when that is larger: the drift a 1-ulp move of every fp32 weight causes on the same data.
# Measured on MiniLM over 32 training sentences and every position (padding included): the
# floor is 5e-6 to 8e-6, SDPA instead of eager attention moves the outputs by 9e-6 (8.8e-7 on
# the real positions alone); a rewrite that is wrong moves them by 1e-3 and more.
EXACT_RTOL = 1e-5
EXACT_FLOOR_FACTOR = 4.0
EXACT_RTOL_CAP = 1e-4  # however chaotic a model, "exact" never means more than this

Outputs = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Drift:
    """How far ``candidate`` outputs are from ``reference`` ones (worst over all outputs)."""

    max_abs: float
    max_rel: float  # max |a - b| / max |b| over all compared values, worst output
    cosine: float  # cosine of all compared values of an output flattened together, worst output
    min_sample_cosine: float = 1.0  # worst cosine of one sample (a batch row's compared values)
    samples: int = 0  # batch rows compared
    problem: str = ""  # outputs that cannot be compared: count, shape or non-finite mismatch

    @property
    def ok(self) -> bool:
        return not self.problem

    def to_dict(self) -> dict:
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in asdict(self).items()}

    def __str__(self) -> str:
        if self.problem:
            return self.problem
        return f"max_abs={self.max_abs:.3g} max_rel={self.max_rel:.3g} cosine={self.cosine:.6f} min_sample_cosine={self.min_sample_cosine:.6f}"


def failed(problem: str) -> Drift:
    return Drift(math.inf, math.inf, -1.0, -1.0, 0, problem)


def real_positions(kwargs: dict | None) -> torch.Tensor | None:
    """Real (non-padding) positions of a batch, ``[batch, seq]`` bool, from a 2-D integer
    ``attention_mask`` keyword input; ``None`` when there is none (every position counts)."""
    mask = kwargs.get("attention_mask") if kwargs else None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not mask.is_floating_point():
        return mask.bool()
    return None


def decoder_unread(kwargs: dict | None, outputs: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """Per output of a decoder step (logits, then the presents), the values no later step can
    read: the logits of padding positions (left padding) and the cache entries of padding
    slots, which every later step masks out; ``None`` where every value counts.

    A fused cache kernel may leave other numbers there than the graph it replaced (ORT's
    GroupQueryAttention writes 0 for a query row that sees only padding, SDPA with an
    additive mask averages its values), so comparisons settle them (:func:`settle`); a value
    that is NaN or inf there still counts.
    """
    mask = kwargs.get("attention_mask") if kwargs else None
    none: list[torch.Tensor | None] = [None] * len(outputs)
    if not (isinstance(mask, torch.Tensor) and mask.dim() == 2) or bool(mask.bool().all()):
        return none
    pad = ~mask.bool()
    batch, total = pad.shape
    unread = list(none)
    for index, out in enumerate(outputs):
        shape = tuple(out.shape)
        if index == 0 and len(shape) == 3 and shape[0] == batch and shape[1] <= total:
            unread[index] = pad[:, total - shape[1]:, None].expand(shape)
        elif index > 0 and len(shape) == 4 and shape[0] == batch and shape[2] == total:
            unread[index] = pad[:, None, :, None].expand(shape)
    return unread


def settle(reference: torch.Tensor, candidate: torch.Tensor, unread: torch.Tensor | None) -> torch.Tensor:
    """``candidate`` with its unread values (:func:`decoder_unread`) taken from ``reference``
    where they are finite."""
    if unread is None or reference.shape != candidate.shape:
        return candidate
    return torch.where(unread & torch.isfinite(candidate), reference, candidate)


def drift(reference: Outputs, candidate: Outputs, valid: torch.Tensor | None = None) -> Drift:
    """Worst-output drift of ``candidate`` from ``reference`` on one batch.

    ``valid``: a ``[batch, seq]`` boolean mask of real (not padding) positions; outputs of
    shape ``[batch, seq, ...]`` are then compared on those positions only. A padded
    position's output is not used by anything downstream, and under quantization it can
    drift far more than the real tokens (MiniLM int8: cosine 0.91 over all positions of
    its padded example batch, 0.991 over the real ones).
    """
    return drift_many([reference], [candidate], [valid])


def drift_many(references: Sequence[Outputs], candidates: Sequence[Outputs], valids: Sequence[torch.Tensor | None] | None = None,
               unread: Sequence[Sequence[torch.Tensor | None] | None] | None = None) -> Drift:
    """Drift over several batches: figures pooled over every batch (cosine over all values of
    an output together, per-sample cosine per batch row), worst output reported. ``unread``:
    per batch, per output, the values that do not count (:func:`decoder_unread`)."""
    if len(references) != len(candidates):
        return failed(f"{len(candidates)} batches of outputs, expected {len(references)}")
    if unread is not None:
        candidates = [got if masks is None else tuple(settle(r, g, m) for r, g, m in zip(ref, got, masks))
                      for ref, got, masks in zip(references, candidates, unread)]
    valids = list(valids) if valids is not None else [None] * len(references)
    count = {len(r) for r in references} | {len(c) for c in candidates}
    if len(count) > 1:
        return failed(f"the outputs number {sorted(count)} across batches and programs, expected one count")
    worst = Drift(0.0, 0.0, 1.0, 1.0, 0)
    for index in range(next(iter(count), 0)):
        pairs = [(ref[index], got[index], valid) for ref, got, valid in zip(references, candidates, valids)]
        one = _output_drift(index, pairs)
        if one.problem:
            return one
        worst = Drift(
            max(worst.max_abs, one.max_abs),
            max(worst.max_rel, one.max_rel),
            min(worst.cosine, one.cosine),
            min(worst.min_sample_cosine, one.min_sample_cosine),
            max(worst.samples, one.samples),
        )
    return worst


def _output_drift(index: int, pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> Drift:
    max_abs = scale = dot = ref_sq = got_sq = 0.0
    sample_cos = 1.0
    samples = 0
    for ref, got, valid in pairs:
        if ref.shape != got.shape:
            return failed(f"output {index} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
        rows_ref, rows_got = _samples(ref.detach(), got.detach(), valid)
        for r, g in zip(rows_ref, rows_got):
            r, g = r.double().flatten(), g.double().flatten()
            bad = _nonfinite_mismatch(r, g)
            if bad:
                return failed(f"output {index}: {bad}")
            both = torch.isfinite(r) & torch.isfinite(g)
            r, g = r[both], g[both]
            samples += 1
            if r.numel() == 0:
                continue
            max_abs = max(max_abs, (r - g).abs().max().item())
            scale = max(scale, r.abs().max().item())
            d, rr, gg = (r @ g).item(), (r @ r).item(), (g @ g).item()
            dot, ref_sq, got_sq = dot + d, ref_sq + rr, got_sq + gg
            sample_cos = min(sample_cos, _cosine(d, rr, gg))
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    return Drift(max_abs, max_rel, _cosine(dot, ref_sq, got_sq), sample_cos, samples)


def _samples(ref: torch.Tensor, got: torch.Tensor, valid: torch.Tensor | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The compared values of each batch row (its real positions when ``valid`` applies)."""
    if ref.dim() == 0:
        return [ref], [got]
    if valid is not None and ref.dim() >= 2 and tuple(ref.shape[:2]) == tuple(valid.shape):
        return [ref[b][valid[b]] for b in range(ref.shape[0])], [got[b][valid[b]] for b in range(ref.shape[0])]
    return list(ref.unbind(0)), list(got.unbind(0))


def _nonfinite_mismatch(ref: torch.Tensor, got: torch.Tensor) -> str:
    ref_bad, got_bad = ~torch.isfinite(ref), ~torch.isfinite(got)
    if not (ref_bad.any() or got_bad.any()):
        return ""
    same = (ref_bad & got_bad) & ((ref == got) | (torch.isnan(ref) & torch.isnan(got)))
    mismatched = (ref_bad | got_bad) & ~same
    if not mismatched.any():
        return ""
    return f"{int(mismatched.sum())} non-finite values that the reference does not have at those positions (NaN/inf: {int(got_bad.sum())} here, {int(ref_bad.sum())} in the reference)"


def _cosine(dot: float, ref_sq: float, got_sq: float) -> float:
    denominator = math.sqrt(ref_sq) * math.sqrt(got_sq)
    if denominator == 0:
        return 1.0 if ref_sq == got_sq else 0.0
    return max(-1.0, min(1.0, dot / denominator))


class Budget(BaseModel):
    """How far lossy passes may move the outputs from the original model's, in total,
    measured on the verification data (real positions only)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_cosine: float = Field(0.99, ge=-1.0, le=1.0, description="worst-output cosine to the original outputs, over the whole verification set")
    min_sample_cosine: float | None = Field(None, ge=-1.0, le=1.0, description="worst cosine of any one verification sample")
    max_rel: float = Field(math.inf, gt=0, description="max |a-b| / max |ref| over outputs")
    exact_rtol: float = Field(EXACT_RTOL, gt=0, description="tolerance of passes that declare themselves exact")
    exact_floor_factor: float = Field(EXACT_FLOOR_FACTOR, ge=0, description="exact passes may also move the outputs by this many rounding floors")

    def check(self, total: Drift) -> str:
        """Empty string when within budget, else why not."""
        if total.problem:
            return total.problem
        if total.cosine < self.min_cosine:
            return f"cosine {total.cosine:.6f} < budget min_cosine {self.min_cosine}"
        if self.min_sample_cosine is not None and total.min_sample_cosine < self.min_sample_cosine:
            return f"a verification sample's cosine {total.min_sample_cosine:.6f} < budget min_sample_cosine {self.min_sample_cosine}"
        if total.max_rel > self.max_rel:
            return f"max_rel {total.max_rel:.3g} > budget max_rel {self.max_rel}"
        return ""

    def exact_tolerance(self, floor: float = 0.0) -> float:
        """The max_rel an exact pass may cause given the program's measured rounding floor."""
        return max(self.exact_rtol, min(self.exact_floor_factor * floor, EXACT_RTOL_CAP))

    def check_exact(self, step: Drift, floor: float = 0.0) -> str:
        if step.problem:
            return step.problem
        tolerance = self.exact_tolerance(floor)
        if step.max_rel > tolerance:
            because = f" ({self.exact_floor_factor:g} x the rounding floor {floor:.3g})" if tolerance > self.exact_rtol else ""
            return f"exact pass moved the outputs: max_rel {step.max_rel:.3g} > {tolerance:.3g}{because} ({step})"
        return ""


def perturbed(program, seed: int, relative: float = 2.0**-23):
    """A copy whose floating-point tensors each moved by +-``relative`` (1 ulp of fp32 by
    default): the rounding noise any reassociation of the program's arithmetic brings."""
    copy = program.clone()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in copy.tensors().values():
            if tensor.is_floating_point():
                signs = torch.randint(0, 2, tensor.shape, generator=generator).to(tensor.dtype) * 2 - 1
                tensor.mul_(1 + relative * signs)
    return copy

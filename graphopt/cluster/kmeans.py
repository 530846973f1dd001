"""1-D k-means over a tensor's values, one codebook per tensor or per row."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Fitting on more than this many values per codebook gains nothing measurable; the
# assignment afterwards still covers every value.
_FIT_SAMPLE = 1 << 20


@dataclass
class Clustering:
    codebook: torch.Tensor  # [rows, k], the tensor's dtype
    codes: torch.Tensor  # [rows, n / rows], int64 in [0, k)

    def decode(self) -> torch.Tensor:
        return torch.gather(self.codebook, 1, self.codes)


def kmeans_1d(values: torch.Tensor, k: int, iterations: int = 20, seed: int = 0) -> Clustering:
    """Cluster each row of ``values`` [rows, n] into ``k`` centroids (Lloyd, quantile start).

    Exact when the whole tensor holds at most ``k`` distinct values: those values become
    the codebook. Integer tensors (quantized weights) get integer centroids.
    """
    if values.dim() != 2:
        raise ValueError(f"kmeans_1d expects [rows, n], got shape {tuple(values.shape)}")
    distinct = torch.unique(values)
    if distinct.numel() <= k:
        book = torch.cat([distinct, distinct[-1:].expand(k - distinct.numel())])
        codebook = book.expand(values.shape[0], k).contiguous()
        codes = torch.bucketize(values, distinct).clamp_max(distinct.numel() - 1)
        return Clustering(codebook, codes)

    data = values.detach().float()
    rows, n = data.shape
    fit = data
    if n > _FIT_SAMPLE:
        generator = torch.Generator().manual_seed(seed)
        fit = data[:, torch.randint(n, (_FIT_SAMPLE,), generator=generator)]
    levels = (torch.arange(k, dtype=torch.float32) + 0.5) / k
    centroids = torch.quantile(fit, levels, dim=1).T.contiguous()  # [rows, k]
    for _ in range(iterations):
        codes = _assign(fit, centroids)
        sums = torch.zeros_like(centroids).scatter_add_(1, codes, fit)
        counts = torch.zeros_like(centroids).scatter_add_(1, codes, torch.ones_like(fit))
        updated = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        if torch.equal(updated, centroids):
            break
        centroids = updated.sort(dim=1).values
    if not values.is_floating_point():
        info = torch.iinfo(values.dtype)
        centroids = centroids.round().clamp(info.min, info.max).sort(dim=1).values
    codes = _assign(data, centroids)
    return Clustering(centroids.to(values.dtype), codes)


def _assign(data: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid per value: centroids are sorted, so the midpoints split the line."""
    bounds = ((centroids[:, 1:] + centroids[:, :-1]) / 2).contiguous()
    return torch.searchsorted(bounds, data.contiguous())

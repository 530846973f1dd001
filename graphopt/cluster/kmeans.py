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


def kmeans_1d(values: torch.Tensor, k: int, iterations: int = 20, seed: int = 0, importance: torch.Tensor | None = None) -> Clustering:
    """Cluster each row of ``values`` [rows, n] into ``k`` centroids (Lloyd, two starts).

    ``importance`` (broadcastable to ``values``, e.g. the mean square of the activation
    each weight multiplies) weights the squared error: centroids become weighted means.
    Assignment is unchanged (in 1-D the nearest centroid minimises any positive weight
    times the squared distance).
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
    _rows, n = data.shape
    weight = torch.ones_like(data) if importance is None else importance.float().expand_as(data)
    fit, fit_weight = data, weight
    if n > _FIT_SAMPLE:
        generator = torch.Generator().manual_seed(seed)
        sample = torch.randint(n, (_FIT_SAMPLE,), generator=generator)
        fit, fit_weight = data[:, sample], weight[:, sample]
    # Two starts, the better kept per row: quantiles (dense where the values are) and an even
    # spread from min to max (reaches the tails, where the few large weights live).
    levels = (torch.arange(k, dtype=torch.float32) + 0.5) / k
    by_quantile = torch.quantile(fit, levels, dim=1).T.contiguous()  # [rows, k]
    low, high = fit.min(dim=1, keepdim=True).values, fit.max(dim=1, keepdim=True).values
    by_range = low + (high - low) * levels
    best: torch.Tensor | None = None
    best_error: torch.Tensor | None = None
    for start in (by_quantile, by_range):
        centroids = _lloyd(fit, fit_weight, start, iterations)
        codes = _assign(fit, centroids)
        error = (fit_weight * (fit - torch.gather(centroids, 1, codes)).square()).sum(dim=1)
        if best is None or best_error is None:  # the first start
            best, best_error = centroids, error
        else:
            better = error < best_error
            best = torch.where(better[:, None], centroids, best)
            best_error = torch.minimum(error, best_error)
    assert best is not None  # the loop above ran over two starts
    centroids = best
    if not values.is_floating_point():
        info = torch.iinfo(values.dtype)
        centroids = centroids.round().clamp(info.min, info.max).sort(dim=1).values
    codes = _assign(data, centroids)
    return Clustering(centroids.to(values.dtype), codes)


def _assign(data: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid per value: centroids are sorted, so the midpoints split the line."""
    bounds = ((centroids[:, 1:] + centroids[:, :-1]) / 2).contiguous()
    return torch.searchsorted(bounds, data.contiguous())


def _lloyd(fit: torch.Tensor, weight: torch.Tensor, centroids: torch.Tensor, iterations: int) -> torch.Tensor:
    for _ in range(iterations):
        codes = _assign(fit, centroids)
        sums = torch.zeros_like(centroids).scatter_add_(1, codes, fit * weight)
        counts = torch.zeros_like(centroids).scatter_add_(1, codes, weight)
        updated = torch.where(counts > 0, sums / counts.clamp_min(1e-30), centroids).sort(dim=1).values
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids


def assign_with_error_feedback(weight: torch.Tensor, codebook: torch.Tensor, hessian: torch.Tensor, damping: float = 0.01) -> torch.Tensor:
    """Codes for ``weight`` [N, K] (one codebook row per weight row, or one for all) that
    minimise the error of ``x @ W.T`` rather than of ``W``: columns are coded in order and
    each column's coding error is pushed onto the columns not yet coded, in proportion to
    the inverse of the input second moment ``hessian`` = E[x xᵀ] [K, K] (GPTQ's update,
    with a nearest-centroid quantizer instead of a uniform grid)."""
    w = weight.detach().float().clone()
    rows, cols = w.shape
    book = codebook.float().expand(rows, -1).contiguous()
    bounds = ((book[:, 1:] + book[:, :-1]) / 2).contiguous()
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damping * torch.diag(h).mean() * torch.eye(cols, dtype=h.dtype)
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    codes = torch.empty(rows, cols, dtype=torch.int64)
    for j in range(cols):
        column = w[:, j : j + 1].contiguous()
        code = torch.searchsorted(bounds, column)
        codes[:, j] = code[:, 0]
        error = (column[:, 0] - torch.gather(book, 1, code)[:, 0]) / inverse[j, j]
        w[:, j + 1 :] -= error[:, None] * inverse[j, j + 1 :][None, :]
    return codes

"""Trainable pooled-landmark attention: Linformer and learned-pooling Nyström, as custom ops::

    graphopt::linformer_attention(q, k, v, key_bias, proj_k, proj_v, *, scale, threshold)
    graphopt::nystrom_learned_attention(q, k, v, key_bias, pool, *, scale, iterations, threshold)

Both compress the sequence with a learned (landmarks m, n_max) matrix, shared by the heads,
which is a trainable parameter of the program (an ordinary tensor input of the op), so the
ops have a backward: it recomputes the eager reference under autograd (one extra forward,
no saved intermediates), as :mod:`graphopt.attention.hedgehog` does. Both start from
segment means (:func:`linformer_init`, :func:`nystrom_learned_init`), so before training
they are the training-free forms. The ONNX lowerings, in standard ops, are in
:mod:`graphopt.attention.pooled_lowering`.

Pooling a sequence of ``n`` tokens (:func:`pooling_matrix`): the first ``n`` columns of the
learned matrix, the columns of padded keys zeroed, and every row divided by the L1 norm
(sum of absolute values) of what is left. Why L1: learned weights may be negative, so the
signed row sum can be zero or change sign (dividing by it would blow up, or flip a row);
the L1 norm is zero only when the row has no weight on a valid token, which is exactly the
empty landmark, and it never depends on padded tokens, so a sequence padded at the end
pools exactly as the same sequence unpadded. For non-negative weights (the segment-means
initialisation) the L1 norm is the row sum, so each row is the mean of its segment's valid
tokens: at initialisation the pooling is the segment means of
:func:`graphopt.attention.reference.segment_means_matrix`. (Normalising by a fixed row
sum of the initial pattern instead would tie a trained row to its initial segment, and
a row whose learned weights moved off its segment would be neither empty nor normalised.)
A landmark with an empty row takes no part: it gets a -inf-like bias in every softmax
over landmarks (and, for Nyström, a zero row in the landmark kernel), as Nyström's
``landmark_bias`` does.

Neither op has a causal form: every landmark mixes tokens of the whole sequence, so a
query would see keys after it (the attention pass refuses causal layers).
"""

from __future__ import annotations

import torch

from graphopt.attention import reference
from graphopt.attention.autograd import recompute_backward


def _init(landmarks: int, n_max: int) -> torch.Tensor:
    return reference.segment_means_matrix(n_max, landmarks, None, torch.float32)[0][0, 0].clone()


def linformer_init(landmarks: int, n_max: int) -> torch.Tensor:
    """Initial projection (min(landmarks, n_max), n_max): segment means of ``n_max`` tokens.

    With ``landmarks >= n_max`` it is the identity (one token per landmark): Linformer is
    then exact attention."""
    return _init(landmarks, n_max)


def nystrom_learned_init(landmarks: int, n_max: int) -> torch.Tensor:
    """Initial pooling (min(landmarks, n_max), n_max): segment means of ``n_max`` tokens, so
    that at ``n = n_max`` the op is :func:`graphopt.attention.reference.nystrom_attention`."""
    return _init(landmarks, n_max)


def pooling_matrix(weight: torch.Tensor, key_bias: torch.Tensor | None, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooling (b or 1, 1, m, n), landmark presence (b or 1, 1, m, 1)) for ``n`` tokens.

    ``weight`` (m, n_max) with ``n <= n_max``: its first ``n`` columns, padded keys (bias
    below :data:`~graphopt.attention.reference.PADDING_BIAS`) zeroed, each row divided by
    its L1 norm (see the module docstring). A landmark is present when its row keeps some
    non-zero weight; an absent landmark's row is all zeros.
    """
    if n > weight.shape[-1]:
        raise ValueError(f"sequence length {n} exceeds the learned pooling's n_max = {weight.shape[-1]} (its (landmarks, n_max) weight is {tuple(weight.shape)})")
    weights = weight[:, :n].to(dtype)[None, None]  # (1, 1, m, n)
    if key_bias is not None:
        weights = weights * (key_bias.reshape(key_bias.shape[0], 1, 1, -1) > reference.PADDING_BIAS).to(dtype)  # (b, 1, m, n)
    norm = weights.abs().sum(-1, keepdim=True)
    present = norm > 0
    return weights / torch.where(present, norm, torch.ones_like(norm)), present.to(dtype)


def _landmark_bias(present: torch.Tensor) -> torch.Tensor:
    """(b, 1, 1, m): 0 for a present landmark, finfo.min for an absent one."""
    return torch.zeros_like(present).masked_fill(present == 0, torch.finfo(present.dtype).min).transpose(-1, -2)


def linformer_reference(q, k, v, key_bias, proj_k, proj_v, scale: float = 1.0, threshold: int = 0) -> torch.Tensor:
    """Linformer (Wang et al. 2020): softmax(q (P_k k)ᵀ · scale + landmark bias) (P_v v).

    ``P_k``, ``P_v`` are the learned (m, n_max) projections ``proj_k``, ``proj_v`` pooled
    for the run-time length by :func:`pooling_matrix`; a landmark is present when both its
    key row and its value row are (an empty key row would score 0, an empty value row
    would add a zero value: either would take softmax mass). Exact attention when the
    sequence is at most ``threshold`` long, or when attention is not square. A longer
    sequence than ``n_max`` raises ``ValueError`` (only where the projection is used).
    Non-causal only.
    """
    n = q.shape[-2]
    if n <= threshold or k.shape[-2] != n:
        return reference.exact_attention(q, k, v, key_bias, scale)
    pool_k, present_k = pooling_matrix(proj_k, key_bias, n, q.dtype)
    pool_v, present_v = pooling_matrix(proj_v, key_bias, n, q.dtype)
    if pool_k.shape[-2] != pool_v.shape[-2]:
        raise ValueError(f"proj_k and proj_v must have the same number of landmarks, got {tuple(proj_k.shape)} and {tuple(proj_v.shape)}")
    k_l, v_l = pool_k @ k, pool_v @ v  # (b, h, m, d)
    scores = q @ k_l.transpose(-1, -2) * scale + _landmark_bias(present_k * present_v)
    return torch.softmax(scores, -1) @ v_l


def nystrom_learned_reference(q, k, v, key_bias, pool, scale: float = 1.0, iterations: int = 6, threshold: int = 0) -> torch.Tensor:
    """Nyström attention with learned landmarks: :func:`graphopt.attention.reference.nystrom_attention`
    with ``q_l = P q``, ``k_l = P k`` for the learned pooling ``P`` of :func:`pooling_matrix`
    (from the (m, n_max) ``pool``) in place of segment means. Absent landmarks get the
    landmark bias and a zero row of the landmark kernel; the pseudo-inverse is
    Newton–Schulz with ``iterations``. Exact attention at most ``threshold`` tokens or when
    attention is not square; longer than ``n_max`` raises ``ValueError``. Non-causal only.
    """
    n = q.shape[-2]
    if n <= threshold or k.shape[-2] != n:
        return reference.exact_attention(q, k, v, key_bias, scale)
    average, present = pooling_matrix(pool, key_bias, n, q.dtype)
    return reference.nystrom_from_landmarks(q, k, v, key_bias, average, _landmark_bias(present), present, scale, iterations)


# ---- the ops ---------------------------------------------------------------------------------
@torch.library.custom_op("graphopt::linformer_attention", mutates_args=())
def linformer_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor, proj_k: torch.Tensor, proj_v: torch.Tensor, scale: float, threshold: int
) -> torch.Tensor:
    return linformer_reference(q, k, v, key_bias, proj_k, proj_v, scale, threshold)


@linformer_attention.register_fake
def _(q, k, v, key_bias, proj_k, proj_v, scale, threshold):
    return torch.empty_like(q)


recompute_backward(linformer_attention, linformer_reference, 6)  # q, k, v, key_bias, proj_k, proj_v


@torch.library.custom_op("graphopt::nystrom_learned_attention", mutates_args=())
def nystrom_learned_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor, pool: torch.Tensor, scale: float, iterations: int, threshold: int
) -> torch.Tensor:
    return nystrom_learned_reference(q, k, v, key_bias, pool, scale, iterations, threshold)


@nystrom_learned_attention.register_fake
def _(q, k, v, key_bias, pool, scale, iterations, threshold):
    return torch.empty_like(q)


recompute_backward(nystrom_learned_attention, nystrom_learned_reference, 5)  # q, k, v, key_bias, pool

"""Eager reference implementations of exact, Nyström, LSH and Hedgehog (learned linear) attention.

Every function takes ``q, k, v`` shaped ``(batch, heads, seq, head_dim)`` and an optional
additive ``key_bias`` that broadcasts to ``(batch, 1, 1, key_seq)`` (a key-padding mask:
0 for kept keys, a large negative number for padded ones). These are the numerical
definitions the custom ops run in PyTorch, and what the ONNX lowerings must reproduce.
"""

from __future__ import annotations

import torch

# A key whose bias is below this is padding: it takes no part in landmark means or hashing.
PADDING_BIAS = -1e4


def exact_attention(q, k, v, key_bias=None, scale: float = 1.0, causal: bool = False) -> torch.Tensor:
    mask = key_bias
    if causal:
        n, m = q.shape[-2], k.shape[-2]
        keep = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
        causal_bias = torch.zeros(n, m, dtype=q.dtype, device=q.device).masked_fill(~keep, torch.finfo(q.dtype).min)
        mask = causal_bias if mask is None else mask + causal_bias
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# ---- Nyström --------------------------------------------------------------------------------
def segment_means_matrix(n: int, landmarks: int, valid: torch.Tensor | None, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(averaging matrix (b, 1, m, n), landmark bias (b, 1, 1, m), landmark validity (b, 1, m, 1)).

    m = min(landmarks, n). Landmark i averages the valid tokens in [floor(i n / m),
    floor((i + 1) n / m)); a landmark whose segment is all padding gets a -inf-like bias so
    no softmax uses it, and its row of the landmark kernel is zeroed so the pseudo-inverse
    ignores it. With m = n every landmark is one token: the Nyström form is then exact.
    """
    m = min(landmarks, n)
    bounds = torch.div(torch.arange(m + 1) * n, m, rounding_mode="floor")
    position = torch.arange(n)
    member = (position[None, :] >= bounds[:-1, None]) & (position[None, :] < bounds[1:, None])  # (m, n)
    weights = member.to(dtype)[None, None]  # (1, 1, m, n)
    if valid is not None:
        weights = weights * valid.to(dtype)[:, None, None, :]  # (batch, 1, m, n)
    counts = weights.sum(-1, keepdim=True)  # (b, 1, m, 1)
    average = weights / counts.clamp(min=1.0)
    landmark_bias = torch.where(counts > 0, 0.0, torch.finfo(dtype).min).to(dtype).transpose(-1, -2)  # (b, 1, 1, m)
    return average, landmark_bias, (counts > 0).to(dtype)


def newton_pinv(a: torch.Tensor, iterations: int) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of the last two dims by Nyströmformer's cubic iteration.

    Starts from ``aᵀ / (‖a‖₁ ‖a‖∞)`` (per matrix), which converges for every ``a``.
    """
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    norm = a.abs().sum(-2).amax(-1) * a.abs().sum(-1).amax(-1)
    z = a.transpose(-1, -2) / norm[..., None, None]
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def nystrom_attention(q, k, v, key_bias=None, scale: float = 1.0, landmarks: int = 64, iterations: int = 6, threshold: int = 0) -> torch.Tensor:
    """Nyström (landmark) attention: softmax(q k_lᵀ) pinv(softmax(q_l k_lᵀ)) softmax(q_l kᵀ) v.

    Landmarks are segment means of queries and keys (Nyströmformer, training-free). Exact
    attention when the sequence is at most ``threshold`` long, or when self-attention is
    not square (the landmarks are shared by queries and keys).
    """
    n = q.shape[-2]
    if n <= threshold or k.shape[-2] != n:
        return exact_attention(q, k, v, key_bias, scale)
    valid = None if key_bias is None else key_bias.reshape(key_bias.shape[0], -1) > PADDING_BIAS
    average, landmark_bias, landmark_valid = segment_means_matrix(n, landmarks, valid, q.dtype)
    return nystrom_from_landmarks(q, k, v, key_bias, average, landmark_bias, landmark_valid, scale, iterations)


def nystrom_from_landmarks(q, k, v, key_bias, average, landmark_bias, landmark_valid, scale: float, iterations: int) -> torch.Tensor:
    """The Nyström form given the landmark pooling ``average`` (b or 1, 1, m, n), the landmarks'
    bias (b or 1, 1, 1, m; -inf-like for an empty one) and validity (b or 1, 1, m, 1)."""
    q_l, k_l = average @ q, average @ k
    kernel_q = torch.softmax(q @ k_l.transpose(-1, -2) * scale + landmark_bias, -1)  # (b, h, n, m)
    kernel_l = torch.softmax(q_l @ k_l.transpose(-1, -2) * scale + landmark_bias, -1) * landmark_valid  # (b, h, m, m)
    scores_k = q_l @ k.transpose(-1, -2) * scale
    if key_bias is not None:
        scores_k = scores_k + key_bias
    kernel_k = torch.softmax(scores_k, -1)  # (b, h, m, n)
    return kernel_q @ (newton_pinv(kernel_l, iterations) @ (kernel_k @ v))


# ---- LSH -------------------------------------------------------------------------------------
def lsh_rotations(head_dim: int, buckets: int, rounds: int, seed: int = 0) -> torch.Tensor:
    """Random rotations (rounds, head_dim, buckets // 2) for angular LSH, fixed by ``seed``."""
    if buckets < 1 or (buckets > 1 and buckets % 2):
        raise ValueError(f"buckets must be 1 or an even number, got {buckets}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rounds, head_dim, max(1, buckets // 2), generator=gen)


def lsh_buckets(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Bucket ids (rounds, batch, heads, n): argmax over [xR, -xR] of the unit vectors x.

    All-zero rotations put every token in bucket 0 (argmax takes the first maximum).
    """
    unit = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    projected = unit[None] @ rotations[:, None, None]  # (rounds, b, h, n, buckets / 2)
    return torch.cat([projected, -projected], -1).argmax(-1)


def lsh_attention(q, k, v, key_bias=None, rotations=None, scale: float = 1.0, chunk: int = 64, causal: bool = False, threshold: int = 0) -> torch.Tensor:
    """Reformer-style LSH attention for separate queries and keys.

    Every round hashes queries and keys with the same random rotation (angular LSH on unit
    vectors), sorts each by (bucket, position) and cuts both orders into chunks of
    ``chunk``: query chunk i attends to key chunks i - 1 and i (cyclic), so a query sees
    the keys of its own and the neighbouring buckets. Padded keys are masked. With
    ``causal``, keys at or after the query's position are masked in the chunks and the
    query's own key is merged in separately, so no row is empty. Rounds are merged by the
    softmax of their log-sum-exps. With one bucket and ``chunk`` >= the sequence length
    this is exact attention.
    """
    n = q.shape[-2]
    if n <= threshold or k.shape[-2] != n:
        return exact_attention(q, k, v, key_bias, scale, causal)
    b, h, _, d = q.shape
    low = torch.finfo(q.dtype).min
    c = min(chunk, n)
    chunks = -(-n // c)
    total = chunks * c
    position = torch.arange(n)
    bias = torch.zeros(1, 1, n, dtype=q.dtype) if key_bias is None else key_bias.reshape(key_bias.shape[0], 1, -1).to(q.dtype)
    bias = torch.cat([bias.expand(b, h, n), torch.full((b, h, 1), low, dtype=q.dtype)], -1)  # index n: a dummy key

    def order_of(x):  # (rounds, b, h, total): positions sorted by (bucket, position), then dummies
        order = torch.argsort(lsh_buckets(x, rotations) * n + position, -1)
        return torch.cat([order, torch.full((*order.shape[:-1], total - n), n, dtype=order.dtype)], -1)

    def rows(x, order):  # x[..., order, :] with a zero row at index n
        x = torch.cat([x, x.new_zeros(b, h, 1, d)], -2).expand(order.shape[0], b, h, n + 1, d)
        return torch.gather(x, -2, order[..., None].expand(*order.shape, d))

    def look_back(x):  # (..., chunks, c, e) -> (..., chunks, 2c, e): each chunk with the previous one (cyclic)
        return torch.cat([torch.roll(x, 1, dims=-3), x], -2)

    q_order, k_order = order_of(q), order_of(k)
    rounds = q_order.shape[0]
    split = (rounds, b, h, chunks, c)
    qs = rows(q, q_order).reshape(*split, d) * scale
    ks, vs = (look_back(rows(x, k_order).reshape(*split, d)) for x in (k, v))
    k_bias = look_back(torch.gather(bias.expand(rounds, b, h, n + 1), -1, k_order).reshape(*split, 1))[..., 0]
    if chunks == 1:  # the only chunk looks back at itself: count its keys once
        k_bias = torch.where(torch.arange(2 * c) < c, low, k_bias)
    scores = qs @ ks.transpose(-1, -2) + k_bias[..., None, :]
    if causal:  # later keys and the query's own key (merged below) are hidden
        k_pos = look_back(k_order.reshape(*split, 1))[..., 0]
        scores = scores.masked_fill(k_pos[..., None, :] >= q_order.reshape(split)[..., None], low)
    lse = torch.logsumexp(scores, -1, keepdim=True)
    out = torch.softmax(scores, -1) @ vs  # (rounds, b, h, chunks, c, d)
    if causal:
        own_k, own_v = rows(k, q_order).reshape(*split, d), rows(v, q_order).reshape(*split, d)
        own_bias = torch.gather(bias.expand(rounds, b, h, n + 1), -1, q_order).reshape(*split, 1)
        own = (qs * own_k).sum(-1, keepdim=True) + own_bias
        merged = torch.logaddexp(lse, own)
        out = torch.exp(lse - merged) * out + torch.exp(own - merged) * own_v
        lse = merged
    inverse = torch.argsort(q_order, -1)[..., :n]
    out = torch.gather(out.reshape(rounds, b, h, total, d), -2, inverse[..., None].expand(*inverse.shape, d))
    lse = torch.gather(lse.reshape(rounds, b, h, total), -1, inverse)
    return (out * torch.softmax(lse, 0)[..., None]).sum(0)


# ---- Hedgehog: exact local blocks + learned linear attention for the rest ------------------
def hedgehog_features(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Hedgehog's feature map ``[softmax(x W + b), softmax(-(x W + b))]`` of each head.

    ``x`` (..., heads, tokens, d) with ``weight`` (heads, d, f) and ``bias`` (heads, 1, f),
    broadcast over the leading dims as given; the result has 2f features, all positive, so
    every linear-attention weight φ(q)·φ(k) is positive, as a softmax weight is."""
    y = x @ weight + bias
    return torch.cat([torch.softmax(y, -1), torch.softmax(-y, -1)], -1)


def _previous_block(x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``x`` shifted one block along dim 2 (block c gets block c - 1, block 0 gets ``fill``)."""
    first = torch.full_like(x[:, :, :1], fill)
    return torch.cat([first, x[:, :, :-1]], 2)


def hedgehog_attention(
    q, k, v, key_bias, wq, bq, wk, bk, mix, scale: float = 1.0, block: int = 64, sinks: int = 1, causal: bool = False, threshold: int = 0
) -> torch.Tensor:
    """Softmax attention, exact on a local window and the sink tokens, linear elsewhere.

    The sequence is cut into blocks of ``block`` tokens. A query attends exactly (softmax
    weights ``exp(s - max)``) to the keys of its own block and of the block before it, and
    to the first ``sinks`` tokens (StreamingLLM's attention sinks: BERT's [CLS] takes 10-15 %
    of the attention mass in MiniLM's middle layers). Every other key k gets the weight
    ``exp(mix_h) φ_q(q)·φ_k(k)`` of learned Hedgehog feature maps (``wq, bq, wk, bk``; see
    :func:`hedgehog_features`), which share the softmax's normaliser, as in LoLCATs (ICLR
    2025) and Based: keys far away are summed into a per-block state (features x values),
    so the cost is O(n · block) rather than O(n²). With ``causal`` a query sees keys at or
    before its position only (blocks before the previous one through a running sum).

    Exact whenever every key is local: at most ``block`` tokens, or at most ``threshold``
    (then :func:`exact_attention` runs). Padded keys (bias below -1e4) take no part.
    ``wq``/``wk`` (heads, d, f), ``bq``/``bk`` (heads, 1, f), ``mix`` (heads,).
    """
    n = q.shape[-2]
    if n <= threshold or k.shape[-2] != n:
        return exact_attention(q, k, v, key_bias, scale, causal)
    b, h, _, d = q.shape
    low = torch.finfo(q.dtype).min
    chunks = -(-n // block)
    pad = chunks * block - n
    s = min(sinks, n)
    bias = torch.zeros(1, n, dtype=q.dtype) if key_bias is None else key_bias.reshape(key_bias.shape[0], -1).to(q.dtype).expand(-1, n)
    bias = torch.nn.functional.pad(bias, (0, pad), value=low)  # (b or 1, total)
    valid = (bias > PADDING_BIAS).to(q.dtype)
    ones = torch.ones(b, h, n, 1, dtype=q.dtype)
    qp, kp, vp = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, torch.cat([v, ones], -1)))
    qb, kb, vb = (x.reshape(b, h, chunks, block, x.shape[-1]) for x in (qp, kp, vp))  # v gets a ones column: sums ride along
    # exact part: the previous block, the own block, the sinks (from block 2 on: before, they are in the window)
    far = (torch.arange(chunks) >= 2).to(q.dtype).reshape(1, 1, chunks, 1, 1)
    bias_b = bias.reshape(bias.shape[0], 1, chunks, 1, block)
    bias_sink = bias[:, :s].reshape(bias.shape[0], 1, 1, 1, s) + (1 - far) * low
    bias_loc = torch.cat([_previous_block(bias_b, low), bias_b, bias_sink.expand(-1, -1, chunks, -1, -1)], -1)
    if causal:
        q_pos = torch.arange(block).reshape(block, 1)
        k_pos = torch.cat([torch.arange(2 * block) - block, torch.full((s,), -block)]).reshape(1, -1)
        bias_loc = bias_loc + torch.where(k_pos > q_pos, low, 0.0).to(q.dtype)
    k_loc = torch.cat([_previous_block(kb), kb, k[:, :, None, :s].expand(-1, -1, chunks, -1, -1)], -2)
    v_loc = torch.cat([_previous_block(vb), vb, vp[:, :, None, :s].expand(-1, -1, chunks, -1, -1)], -2)
    scores = qb @ k_loc.transpose(-1, -2) * scale + bias_loc  # (b, h, C, B, 2B + s)
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    exact_part = weights @ v_loc  # (b, h, C, B, d + 1): numerator and normaliser
    # linear part: every other key through the feature maps, summed per block
    fq = hedgehog_features(qb, wq[:, None], bq[:, None])  # (b, h, C, B, F)
    fk = hedgehog_features(kb, wk[:, None], bk[:, None]) * valid.reshape(valid.shape[0], 1, chunks, block, 1)
    state = fk.transpose(-1, -2) @ vb  # (b, h, C, F, d + 1)
    sink_state = fk[:, :, 0, :s].transpose(-1, -2) @ vb[:, :, 0, :s]  # (b, h, F, d + 1)
    seen = torch.cumsum(state, 2) if causal else state.sum(2, keepdim=True)
    far_state = seen - state - _previous_block(state) - far * sink_state[:, :, None]
    combined = exact_part + torch.exp(mix).reshape(1, h, 1, 1, 1) * (fq @ far_state)
    out = combined[..., :d] / combined[..., d:]
    return out.reshape(b, h, chunks * block, d)[:, :, :n]


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """‖approx − exact‖ / ‖exact‖ (Frobenius, over everything)."""
    return float((approx.double() - exact.double()).norm() / exact.double().norm().clamp(min=1e-30))

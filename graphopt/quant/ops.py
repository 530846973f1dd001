"""graphopt's quantized-linear ops: ``torch.library`` custom ops with eager references.

Each op computes ``x @ W + bias`` with ``W`` stored quantized, and each eager reference
follows the numerics of the ONNX Runtime kernel it lowers to (graphopt.quant.lowering),
so ORT parity can be checked tightly:

* ``graphopt::linear_dynamic_int8``: ``DynamicQuantizeMatMul``. The activation is
  quantized per tensor to uint8 at run time (range widened to include 0, scale =
  range/255, zero point rounded half-to-even), the weight is int8, symmetric, one scale per
  output column; the integer product is exact, then scaled by ``a_scale * w_scale`` in fp32.
* ``graphopt::linear_nbits``: ``MatMulNBits`` (weight-only, 2, 4 or 8 bits, one scale and
  zero point per group of ``block_size`` input rows). ``accuracy_level=4`` makes ORT
  quantize the activation to int8 per block as well; the reference does the same.
* ``graphopt::linear_static_int8``: ``QuantizeLinear``/``DequantizeLinear`` around a MatMul:
  activation scale and zero point calibrated ahead of time, per-channel int8 weights.

Weights are stored as ONNX wants them: ``[K, N]`` (input rows, output columns) for the
int8 ops and ``MatMulNBits``' packed ``[N, K/block, block*bits/8]`` for the n-bit op.
"""

from __future__ import annotations

import torch

LIB = "graphopt"


def dynamic_quant_params(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) of ONNX DynamicQuantizeLinear / ORT's uint8 activation quantization."""
    lo = torch.clamp(x.min(), max=0.0).float()
    hi = torch.clamp(x.max(), min=0.0).float()
    scale = torch.where(hi == lo, torch.ones_like(hi), (hi - lo) / 255.0)
    zero_point = torch.round(torch.clamp(0.0 - lo / scale, 0.0, 255.0))
    return scale, zero_point


def quantize_activation_u8(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """uint8 codes as float (round half to even, then saturate), like ORT's QuantizeLinear."""
    return torch.clamp(torch.round(x.float() / scale) + zero_point, 0.0, 255.0)


# |uint8 code - zero point| <= 255 and |int8 weight| <= 127: a fp32 dot product of up to
# 512 such terms stays below 2**24, so it is exact, as ORT's int32 accumulation is.
_EXACT_FP32_TERMS = 512


def _integer_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b`` of integer codes held in floats: fp32 chunks of K, summed in fp64."""
    K = a.shape[-1]
    a, b = a.float(), b.float()
    if K <= _EXACT_FP32_TERMS:
        return torch.matmul(a, b).double()
    total = torch.matmul(a[..., :_EXACT_FP32_TERMS], b[:_EXACT_FP32_TERMS]).double()
    for start in range(_EXACT_FP32_TERMS, K, _EXACT_FP32_TERMS):
        part = torch.matmul(a[..., start : start + _EXACT_FP32_TERMS], b[start : start + _EXACT_FP32_TERMS]).double()
        total = total + part
    return total


# ---- dynamic int8 ---------------------------------------------------------------------------
@torch.library.custom_op(f"{LIB}::linear_dynamic_int8", mutates_args=())
def linear_dynamic_int8(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x [..., K] @ dequant(w_q [K, N] int8, w_scale [N]) + bias [N]``, activation uint8 per tensor."""
    scale, zero_point = dynamic_quant_params(x)
    codes = quantize_activation_u8(x, scale, zero_point) - zero_point
    acc = _integer_matmul(codes, w_q).float()
    return (acc * (scale * w_scale.float()) + bias.float()).to(x.dtype)


@linear_dynamic_int8.register_fake
def _(x, w_q, w_scale, bias):
    return x.new_empty((*x.shape[:-1], w_q.shape[1]))


# ---- static int8 (QDQ) ----------------------------------------------------------------------
@torch.library.custom_op(f"{LIB}::linear_static_int8", mutates_args=())
def linear_static_int8(
    x: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero_point: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero_point: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """``dequant(quant(x; x_scale, x_zero_point [uint8])) @ dequant(w_q [K, N] int8, w_scale [N], w_zero_point [N]) + bias``."""
    zero_point = x_zero_point.float()
    codes = quantize_activation_u8(x, x_scale.float(), zero_point) - zero_point
    acc = _integer_matmul(codes, w_q.float() - w_zero_point.float()).float()
    return (acc * (x_scale.float() * w_scale.float()) + bias.float()).to(x.dtype)


@linear_static_int8.register_fake
def _(x, x_scale, x_zero_point, w_q, w_scale, w_zero_point, bias):
    return x.new_empty((*x.shape[:-1], w_q.shape[1]))


# ---- weight-only n-bit (MatMulNBits) --------------------------------------------------------
@torch.library.custom_op(f"{LIB}::linear_nbits", mutates_args=())
def linear_nbits(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor,
    bias: torch.Tensor,
    K: int,
    N: int,
    bits: int,
    block_size: int,
    accuracy_level: int,
) -> torch.Tensor:
    """``x [..., K] @ W + bias`` with ``W`` in MatMulNBits' packed layout (see graphopt.quant.packing)."""
    from graphopt.quant.packing import unpack_nbits, unpack_zero_points

    codes = unpack_nbits(w_packed, bits, K)  # [N, blocks * block_size] unsigned codes, as float
    blocks = codes.shape[1] // block_size
    codes = codes.reshape(N, blocks, block_size)
    centered = codes - unpack_zero_points(zero_points, bits, blocks).reshape(N, blocks, 1)
    if accuracy_level == 4:
        return _nbits_int8_compute(x, centered, scales, bias, K, N, block_size)
    weight = (centered * scales.float().reshape(N, blocks, 1)).reshape(N, -1)[:, :K]
    return (torch.matmul(x.float(), weight.T) + bias.float()).to(x.dtype)


def _nbits_int8_compute(x, centered, scales, bias, K, N, block_size):
    # ORT (MLAS "CompInt8") quantizes the activation per block of block_size along K to int8,
    # symmetric, scale = amax / 127, then accumulates block products in fp32.
    blocks = centered.shape[1]
    lead = x.shape[:-1]
    a = torch.nn.functional.pad(x.float().reshape(-1, K), (0, blocks * block_size - K)).reshape(-1, blocks, block_size)
    a_scale = a.abs().amax(dim=-1, keepdim=True) / 127.0
    inverse = torch.where(a_scale == 0, torch.zeros_like(a_scale), 1.0 / a_scale)
    a_codes = torch.clamp(torch.round(a * inverse), -127, 127)
    # [M, blocks] x [N, blocks] block sums, exact integer dot products per block.
    block_dots = torch.einsum("mbk,nbk->mnb", a_codes.double(), centered.double()).float()
    weights = a_scale.squeeze(-1)[:, None, :] * scales.float().reshape(N, blocks)[None]
    out = (block_dots * weights).sum(-1) + bias.float()
    return out.reshape(*lead, N).to(x.dtype)


@linear_nbits.register_fake
def _(x, w_packed, scales, zero_points, bias, K, N, bits, block_size, accuracy_level):
    return x.new_empty((*x.shape[:-1], N))


# ---- int8 embedding -------------------------------------------------------------------------
@torch.library.custom_op(f"{LIB}::embedding_int8", mutates_args=())
def embedding_int8(table_q: torch.Tensor, scales: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows of an int8 table [V, D] with one scale per row [V, 1], as float32."""
    return table_q[indices].float() * scales[indices]


@embedding_int8.register_fake
def _(table_q, scales, indices):
    return table_q.new_empty((*indices.shape, table_q.shape[1]), dtype=torch.float32)


# ---- top-k logit refinement (a low-bit head corrected where it matters) -----------------------
@torch.library.custom_op(f"{LIB}::refine_topk_int8", mutates_args=())
def refine_topk_int8(coarse: torch.Tensor, x: torch.Tensor, table_q: torch.Tensor, scales: torch.Tensor, k: int) -> torch.Tensor:
    """``coarse [..., V]`` with its ``k`` largest entries per row recomputed as ``x . row`` from
    an int8 table ``[V, D]`` with one scale per row ``[V, 1]`` (fp32 products): a head quantized
    to few bits picks the candidates, the int8 rows decide among them."""
    index = coarse.topk(k, dim=-1).indices
    rows = table_q[index].float() * scales[index]  # [..., k, D]
    fine = (rows @ x.float().unsqueeze(-1)).squeeze(-1)
    return coarse.scatter(-1, index, fine)


@refine_topk_int8.register_fake
def _(coarse, x, table_q, scales, k):
    return torch.empty_like(coarse)


# ---- epilogue: bias + GELU ------------------------------------------------------------------
@torch.library.custom_op(f"{LIB}::bias_gelu", mutates_args=())
def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu(x + bias)`` (erf form): one ``BiasGelu`` kernel after a quantized matmul, instead
    of the five elementwise ops the exporter spells GELU with."""
    return torch.nn.functional.gelu(x + bias)


@bias_gelu.register_fake
def _(x, bias):
    return torch.empty_like(x)


# ---- n-bit embedding (GatherBlockQuantized) ---------------------------------------------------
@torch.library.custom_op(f"{LIB}::embedding_nbits", mutates_args=())
def embedding_nbits(
    table_packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, indices: torch.Tensor, block_size: int, bits: int
) -> torch.Tensor:
    """Rows of a group-quantized table: ``table_packed [V, D*bits/8]`` (MatMulNBits' packing per row),
    ``scales [V, D/block_size]``, packed zero points; dequantized to float32."""
    from graphopt.quant.packing import unpack_nbits, unpack_zero_points

    _V, blocks = scales.shape
    rows = table_packed[indices.reshape(-1)]
    codes = unpack_nbits(rows, bits, blocks * block_size).reshape(-1, blocks, block_size)
    flat = indices.reshape(-1)
    zero = unpack_zero_points(zero_points[flat], bits, blocks)
    values = (codes - zero[..., None]) * scales[flat][..., None]
    return values.reshape(*indices.shape, blocks * block_size)


@embedding_nbits.register_fake
def _(table_packed, scales, zero_points, indices, block_size, bits):
    return scales.new_empty((*indices.shape, scales.shape[1] * block_size))


# ---- self-attention with one int8 QKV projection ------------------------------------------------
@torch.library.custom_op(f"{LIB}::attention_int8", mutates_args=())
def attention_int8(
    x: torch.Tensor, w_qkv: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor, num_heads: int, scale: float
) -> torch.Tensor:
    """Self-attention ``[B, S, H] -> [B, S, H]`` whose Q, K, V projections are one dynamic-int8
    matmul by ``w_qkv [H, 3H]`` (the activation is quantized once, as it would be for each of
    the three separately); ``mask`` is an additive ``[B or 1, 1 or heads, S, S]`` bias."""
    qkv = linear_dynamic_int8(x, w_qkv, w_scale, bias)
    batch, seq, _ = qkv.shape
    q, k, v = (t.reshape(batch, seq, num_heads, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(batch, seq, -1)


@attention_int8.register_fake
def _(x, w_qkv, w_scale, bias, mask, num_heads, scale):
    return x.new_empty((*x.shape[:-1], w_qkv.shape[1] // 3))


# ---- self-attention with one static-int8 QKV projection -----------------------------------------
@torch.library.custom_op(f"{LIB}::attention_static_int8", mutates_args=())
def attention_static_int8(
    x: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero_point: torch.Tensor,
    w_qkv: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero_point: torch.Tensor,
    bias: torch.Tensor,
    mask: torch.Tensor,
    num_heads: int,
    scale: float,
) -> torch.Tensor:
    """:func:`attention_int8` with the activation quantized by a calibrated scale and zero point
    (static int8, one ``QuantizeLinear`` for the three projections) instead of at run time."""
    qkv = linear_static_int8(x, x_scale, x_zero_point, w_qkv, w_scale, w_zero_point, bias)
    batch, seq, _ = qkv.shape
    q, k, v = (t.reshape(batch, seq, num_heads, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(batch, seq, -1)


@attention_static_int8.register_fake
def _(x, x_scale, x_zero_point, w_qkv, w_scale, w_zero_point, bias, mask, num_heads, scale):
    return x.new_empty((*x.shape[:-1], w_qkv.shape[1] // 3))

"""Quantizing weights, and the storage layouts of the ORT kernels they lower to.

Conventions: a linear weight arrives as ``[N, K]`` (``nn.Linear``: output rows, input
columns). Per-channel int8 weights are returned as ``[K, N]`` int8 with one scale per output
column (MatMul's B layout). n-bit weights use ``MatMulNBits``' layout: ``[N, blocks,
block_size * bits / 8]`` uint8, lowest bits first (4 bits: element 2i in the low nibble of
byte i; 2 bits: element 4i in bits 0-1); scales ``[N, blocks]``; zero points packed the same
way along the blocks of a row (a row padded to whole bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graphopt.errors import ConfigError

INT8_QMAX = 127
REDUCED_INT8_QMAX = 63  # "reduce range": 7-bit weights, for CPUs without VNNI (see cpu.py)
NBITS = (2, 4, 8)  # the widths MatMulNBits runs on ORT's CPU provider (1.32)


def quantize_per_channel_int8(weight: torch.Tensor, qmax: int = INT8_QMAX) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``weight [N, K]`` -> (codes ``[K, N]`` int8, scales ``[N]`` fp32)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    codes = torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax).to(torch.int8)
    return codes.T.contiguous(), scale


def dequantize_per_channel_int8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_per_channel_int8`: ``[K, N]`` codes -> ``[N, K]`` fp32."""
    return (codes.float() * scale[None, :]).T


@dataclass
class NBitsWeight:
    packed: torch.Tensor  # uint8 [N, blocks, blob]
    scales: torch.Tensor  # fp32 [N, blocks]
    zero_points: torch.Tensor  # uint8, packed (4 bits: [N, ceil(blocks/2)]; 8 bits: [N, blocks])
    K: int
    N: int
    bits: int
    block_size: int
    padded: int  # input rows added to fill the last block (0 when block_size divides K)


def quantize_nbits(weight: torch.Tensor, bits: int, block_size: int, symmetric: bool = False) -> NBitsWeight:
    """Group-wise n-bit quantization of ``weight [N, K]`` into MatMulNBits' layout.

    Asymmetric (default): each block's range, widened to include 0, maps onto 0..2^bits-1
    with a zero point. Symmetric: zero point fixed at 2^(bits-1), scale = amax / (2^(bits-1)-1).
    Either range is shrunk per block where that lowers the block's squared error.
    A K that ``block_size`` does not divide is padded with zero weights (reported as ``padded``).
    """
    if bits not in NBITS:
        raise ConfigError(f"MatMulNBits weights must have 2, 4 or 8 bits, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ConfigError(f"block_size must be a power of two >= 16, got {block_size}")
    w = weight.detach().float()
    N, K = w.shape
    blocks = -(-K // block_size)
    padded = blocks * block_size - K
    w = torch.nn.functional.pad(w, (0, padded)).reshape(N, blocks, block_size)
    levels = 2**bits - 1
    scales, zero = _search_block_params(w, bits, symmetric)
    codes = torch.clamp(torch.round(w / scales[..., None]) + zero[..., None], 0, levels).to(torch.uint8)
    packed = pack_codes(codes.reshape(N, blocks * block_size), bits).reshape(N, blocks, block_size * bits // 8)
    return NBitsWeight(packed, scales.contiguous(), pack_zero_points(zero.to(torch.uint8), bits), K, N, bits, block_size, padded)


# Shrinking a block's range clips its few largest weights but refines every other one; the
# shrink with the least squared error per block is kept (1.0 = plain min/max).
SHRINK_STEPS = tuple(1.0 - 0.025 * i for i in range(13))


def _block_params(w: torch.Tensor, bits: int, symmetric: bool, shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
    levels = 2**bits - 1
    if symmetric:
        mid = 2 ** (bits - 1)
        amax = w.abs().amax(dim=-1) * shrink
        scales = torch.where(amax > 0, amax / (mid - 1), torch.ones_like(amax))
        return scales, torch.full_like(scales, float(mid))
    lo = torch.clamp(w.amin(dim=-1), max=0.0) * shrink
    hi = torch.clamp(w.amax(dim=-1), min=0.0) * shrink
    scales = torch.where(hi > lo, (hi - lo) / levels, torch.ones_like(hi))
    return scales, torch.clamp(torch.round(-lo / scales), 0, levels)


def _search_block_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of ``w [N, blocks, size]``: (scale, zero point) minimising the squared error."""
    levels = 2**bits - 1
    best_scales = best_zero = best_error = None
    for shrink in SHRINK_STEPS:
        scales, zero = _block_params(w, bits, symmetric, shrink)
        codes = torch.clamp(torch.round(w / scales[..., None]) + zero[..., None], 0, levels)
        error = ((codes - zero[..., None]) * scales[..., None] - w).pow(2).sum(dim=-1)
        if best_scales is None or best_zero is None or best_error is None:  # the first step
            best_scales, best_zero, best_error = scales, zero, error
            continue
        better = error < best_error
        best_scales = torch.where(better, scales, best_scales)
        best_zero = torch.where(better, zero, best_zero)
        best_error = torch.where(better, error, best_error)
    if best_scales is None or best_zero is None:
        raise ValueError("SHRINK_STEPS is empty: no block parameters to choose from")
    return best_scales, best_zero


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [rows, cols] -> bytes, ``8 // bits`` codes a byte, lowest bits first."""
    if bits == 8:
        return codes.to(torch.uint8)
    groups = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, 8 // bits)
    packed = groups[..., 0]
    for i in range(1, 8 // bits):
        packed = packed | (groups[..., i] << (bits * i))
    return packed


def _unpack(rows: torch.Tensor, bits: int) -> torch.Tensor:
    mask = 2**bits - 1
    return torch.stack([(rows >> (bits * i)) & mask for i in range(8 // bits)], dim=-1).reshape(rows.shape[0], -1)


def unpack_nbits(packed: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """MatMulNBits' B [N, blocks, blob] -> codes [N, blocks * block_size] as float."""
    rows = packed.reshape(packed.shape[0], -1)
    return rows.float() if bits == 8 else _unpack(rows, bits).float()


def pack_zero_points(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points [N, blocks] -> ORT's layout (below 8 bits: a row padded to whole bytes)."""
    if bits == 8:
        return zero.contiguous()
    per_byte = 8 // bits
    if zero.shape[1] % per_byte:
        zero = torch.nn.functional.pad(zero, (0, per_byte - zero.shape[1] % per_byte))
    return pack_codes(zero, bits)


def unpack_zero_points(packed: torch.Tensor, bits: int, blocks: int) -> torch.Tensor:
    """ORT-layout zero points -> [N, blocks] as float."""
    rows = packed.reshape(packed.shape[0], -1)
    if bits == 8:
        return rows[:, :blocks].float()
    return _unpack(rows, bits)[:, :blocks].float()


def dequantize_nbits(q: NBitsWeight) -> torch.Tensor:
    """The fp32 ``[N, K]`` weight a :class:`NBitsWeight` stands for."""
    blocks = q.scales.shape[1]
    codes = unpack_nbits(q.packed, q.bits, q.K).reshape(q.N, blocks, q.block_size)
    zero = unpack_zero_points(q.zero_points, q.bits, blocks)
    return ((codes - zero[..., None]) * q.scales[..., None]).reshape(q.N, -1)[:, : q.K]

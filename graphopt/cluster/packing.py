"""Bit-packing of cluster codes into uint8, in power-of-two bit planes.

A b-bit code is split into planes of 4, 2 and 1 bits (3 = 2 + 1, 5 = 4 + 1, ...); each
plane packs 8 / width codes per byte, least significant first. Planes keep the decoder to
shifts and masks on whole bytes, which every ONNX runtime has, and need no index tensors
(which would be as large as the weight) to find a code that straddles two bytes.
The code count is padded to a multiple of 8; the planes are concatenated, lowest bits first.
"""

from __future__ import annotations

import torch


def planes(bits: int) -> list[int]:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    return [w for w in (8, 4, 2, 1) if bits & w][::-1] if bits != 8 else [8]


def padded_count(n: int) -> int:
    return -(-n // 8) * 8


def packed_bytes(n: int, bits: int) -> int:
    return padded_count(n) * bits // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2**bits) (any shape) -> packed uint8 vector."""
    flat = codes.reshape(-1).to(torch.int32)
    if flat.numel() and (flat.min() < 0 or flat.max() >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits")
    flat = torch.nn.functional.pad(flat, (0, padded_count(flat.numel()) - flat.numel()))
    out, low = [], 0
    for width in planes(bits):
        per = 8 // width
        part = ((flat >> low) & ((1 << width) - 1)).reshape(-1, per)
        shifts = torch.arange(per, dtype=torch.int32) * width
        out.append((part << shifts).sum(dim=1).to(torch.uint8))
        low += width
    return torch.cat(out)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``n`` codes as int64."""
    total = padded_count(n)
    codes = torch.zeros(total, dtype=torch.int64)
    offset = low = 0
    for width in planes(bits):
        size = total * width // 8
        plane = packed[offset : offset + size].to(torch.int64)
        shifts = torch.arange(0, 8, width, dtype=torch.int64)
        codes |= (((plane[:, None] >> shifts) & ((1 << width) - 1)).reshape(-1)) << low
        offset += size
        low += width
    return codes[:n]

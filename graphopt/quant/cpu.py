"""Which int8 weight range the CPU at hand can run without overflow.

ONNX Runtime's u8 x s8 integer GEMM on x86 without VNNI multiplies pairs of bytes into a
saturating 16-bit sum (``vpmaddubsw``): 255 * 127 * 2 overflows it, so full-range int8
weights give large errors there (28% measured on AVX2). 7-bit weights (|w| <= 63, "reduce
range") cannot overflow. With VNNI (AVX512-VNNI or AVX-VNNI) the products accumulate in
32 bits and full-range weights are exact. Other architectures (ARM's dot-product kernels)
do not saturate either.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CpuInt8Support:
    capability: str  # torch.backends.cpu.get_cpu_capability(): AVX512, AVX2, DEFAULT, ...
    vnni: bool
    x86: bool

    @property
    def saturates_u8s8(self) -> bool:
        return self.x86 and not self.vnni

    def to_dict(self) -> dict:
        return {"capability": self.capability, "vnni": self.vnni, "x86": self.x86, "saturates_u8s8": self.saturates_u8s8}


@functools.lru_cache(maxsize=1)
def cpu_int8_support() -> CpuInt8Support:
    capability = torch.backends.cpu.get_cpu_capability()
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
    return CpuInt8Support(capability=capability, vnni=_has_vnni(), x86=x86)


def _has_vnni() -> bool:
    try:
        caps = torch.cpu.get_capabilities()  # cpuinfo's view: avx512_vnni, avx_vnni, ...
        return bool(caps.get("avx512_vnni") or caps.get("avx_vnni"))
    except Exception:  # noqa: BLE001 - older torch: read the kernel's flags instead
        try:
            with open("/proc/cpuinfo") as handle:
                flags = handle.read()
        except OSError:
            return False
        return " avx512_vnni" in flags or " avx_vnni" in flags


def weight_qmax(weight_range: str, support: CpuInt8Support | None = None) -> int:
    """127 (full range) or 63 (reduced) for ``weight_range`` in auto / full / reduced."""
    from graphopt.quant.packing import INT8_QMAX, REDUCED_INT8_QMAX

    if weight_range == "full":
        return INT8_QMAX
    if weight_range == "reduced":
        return REDUCED_INT8_QMAX
    support = support or cpu_int8_support()
    return REDUCED_INT8_QMAX if support.saturates_u8s8 else INT8_QMAX

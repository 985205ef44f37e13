"""What the host CPU's vector unit looks like, for the hand-written schedules' register tiles.

A register tile sized for AVX-512 (32 registers of 64 bytes) spills on an AVX2 machine (16 of 32
bytes) — measured: the quadratic form's accumulators went to the stack on this znver3 VM.
`host_cpu()` (the flags) is part of the compile-cache key, so a library is never reused on a CPU
with other vector widths.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def _flags() -> frozenset:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def vector_bytes() -> int:
    """Bytes in a vector register: 64 with AVX-512, else 32 (AVX2)."""
    return 64 if "avx512f" in _flags() else 32


def vector_registers() -> int:
    """Architectural vector registers: 32 with AVX-512, else 16."""
    return 32 if "avx512f" in _flags() else 16


def lanes(dtype: str) -> int:
    """Elements per vector register of the host (8 float32 with AVX2, 16 with AVX-512)."""
    return vector_bytes() // (4 if dtype == "float32" else 8)


def tile_rows(cols: int, lanes: int, cap: int) -> int:
    """Rows of an accumulator tile (rows × cols) held in about half the vector registers (the rest
    hold the streamed operand and broadcasts), a power of two ≤ cap. Measured on this AVX2 VM: the
    banded forward at N = 8192 went 245 -> 112 ms when its tiles followed this rule instead of
    being sized for 32 AVX-512 registers."""
    regs, budget = -(-cols // lanes), vector_registers() // 2
    r = 1
    while r * 2 * regs <= budget and r * 2 <= cap:
        r *= 2
    return r

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

"""The tunable knobs of the kernels: per kernel family, the choices and the default.

A knob changes how a kernel is scheduled (chunk length, register tile, FFT channel block), never
what it computes: tests/test_tune.py checks every choice of both families, forward and backward,
against the maths in torch. `attndsl tune` measures the choices (lowering/tune.py) and records
them in a meta_schedule database (schedules/database.py), where a knob is a `sample_categorical`
decision of the record's trace; compile() builds the choice a database picks (schedules/lookup.py).
Without a record a kernel is built with the defaults below, the values the kernels had before they
had knobs (sized for AVX-512 registers: on this AVX2 VM the tuned choices are 1.5-1.8x faster).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Knob:
    name: str
    choices: tuple[int, ...]
    default: int
    meaning: str


# family -> its knobs (the order is the order of the decisions in a record's trace)
SPACES: dict[str, tuple[Knob, ...]] = {
    # lowering/cpu/linear.py: linear, prefix_sum and decayed, forward and backward
    "linear": (
        Knob("chunk", (16, 32, 64), 32, "rows per chunk (C)"),
        Knob("tile_regs", (4, 8, 16), 16, "vector registers of an accumulator tile"),
    ),
    # lowering/cpu/quadratic.py: the softmax form, and lowering/cpu/sampled.py: kde and uniform, forward and backward
    "quadratic": (
        Knob("tile", (2, 4, 8), 4, "vector registers of query lanes per tile (T = tile·lanes rows and keys)"),
    ),
    # lowering/cpu/toeplitz.py: the toeplitz_fft scores kernels, forward and backward (lowering/fft/convolve.py)
    "toeplitz": (
        Knob("block_kb", (1, 128, 512, 4096), 512, "KiB of an FFT work-buffer block (L/8 points) past which the FFT convolver adds a second level of blocks (1: always, for L ≥ 64)"),
    ),
    # lowering/cpu/banded.py: the banded + constant kernels of a clipped table, forward and backward
    "banded": (
        Knob("chunk", (16, 32, 64), 32, "rows per chunk (C): window tiles are C×C, a window (2⌈(W−1)/C⌉+1)·C keys"),
    ),
    # GPU targets' portable kernels. lowering/portable/te_forms.py: linear, prefix_sum and decayed
    "portable_linear": (
        Knob("chunk", (32, 64, 128), 64, "rows per chunk of the scans over chunk states"),
    ),
    # lowering/portable/softmax_rows.py: the softmax form
    "portable_rows": (
        Knob("rows", (64, 128, 256), 128, "rows (threads) per thread block"),
    ),
    # lowering/portable/fft_blocks.py: the toeplitz_fft and values_fft forms
    "portable_fft": (
        Knob("threads", (128, 256, 512), 256, "threads per thread block (one FFT sequence each)"),
    ),
}


def defaults(family: str) -> dict[str, int]:
    return {k.name: k.default for k in SPACES[family]}


def resolve(family: str, knobs: dict | None) -> dict[str, int]:
    """The defaults of `family` overridden by `knobs`; an unknown knob or choice is a ValueError."""
    out = defaults(family)
    for name, value in (knobs or {}).items():
        knob = next((k for k in SPACES[family] if k.name == name), None)
        if knob is None:
            raise ValueError(f"{family} kernels have no knob {name!r}; "
                             f"valid: {', '.join(k.name for k in SPACES[family])}")
        if value not in knob.choices:
            raise ValueError(f"{family} knob {name}={value!r}; valid: {knob.choices}")
        out[name] = value
    return out


def grid(family: str) -> list[dict[str, int]]:
    """Every combination of the family's choices, the default first."""
    combos: list[dict[str, int]] = [{}]
    for knob in SPACES[family]:
        combos = [{**c, knob.name: v} for c in combos for v in knob.choices]
    first = defaults(family)
    return [first] + [c for c in combos if c != first]


def label(knobs: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in knobs.items())

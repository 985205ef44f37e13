"""Relative positions in TIR: the table slot of r, the circular buffer's r, and b_h(r) for each
kind of position term (learned table, alibi, user function)."""
from __future__ import annotations

from tvm import tirx

from .expr import to_tir


def rel(p, N, Lf):
    """r of slot p of the circular weight buffer: p (r ≥ 0) or p − L (r < 0)."""
    return tirx.Select(p < N, p, p - Lf)


def slot(r, W):
    """The table column of r: clip(r, −W, W) + W (the lookup and its gradient's scatter)."""
    return tirx.max(tirx.min(r, W), -W) + W


def bias_builder(position, dtype: str):
    """(TAB, h, r) -> b_h(r) as a PrimExpr, for r an int64 PrimExpr."""
    if position.name == "toeplitz":
        def bias(TAB, h, r, W):
            return TAB[h, slot(r, W)]
    elif position.name == "alibi":
        def bias(TAB, h, r, W):
            return -TAB[h, 0] * tirx.Cast(dtype, tirx.abs(r))
    elif position.name == "user":
        def bias(TAB, h, r, W):
            return to_tir(position.expr, tirx.Cast(dtype, r), dtype)
    else:
        raise NotImplementedError(position.name)
    return bias

"""Relative positions in TIR: the table slot of r, the circular buffer's r, b_h(r) for each kind
of position term (learned table, alibi, user function), and a learned table's gradient in tiles."""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from attndsl.ast import learned_table

from .expr import to_tir


def rel(p, N, Lf):
    """r of slot p of the circular weight buffer: p (r ≥ 0) or p − L (r < 0)."""
    return tirx.Select(p < N, p, p - Lf)


def slot(r, W):
    """The table column of r: clip(r, −W, W) + W (the lookup and its gradient's scatter)."""
    return tirx.max(tirx.min(r, W), -W) + W


def bias_builder(position, dtype: str):
    """(TAB, h, r) -> b_h(r) as a PrimExpr, for r an int64 PrimExpr."""
    if learned_table(position):
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


def table_grads(Tt: int, dtype: str):
    """Macros for a learned table's gradient in the tiled kernels (quadratic.py, pairwise.py):

        diagonals(dTpart, dBv, G, b, qbase, kbase, W)
            dTpart[b, slot(r)] += Σ_{i − j = r} G[j, i] over a Tt × Tt tile (query rows qbase..,
            key rows kbase..), through dBv (2·Tt,), left zeroed
        per_head(dTAB, dTpart, H, P, BH)
            dTAB[h] = Σ_{bh ≡ h (mod H)} dTpart[bh]"""
    zero = tirx.const(0, dtype)

    @T.macro
    def diagonals(dTpart, dBv, G, b, qbase, kbase, W):
        for j in range(Tt):
            for i in T.vectorized(Tt):
                dBv[i + (Tt - 1) - j] = dBv[i + (Tt - 1) - j] + G[j, i]
        for t in range(2 * Tt - 1):
            dTpart[b, slot(qbase - kbase + t - (Tt - 1), W)] += dBv[t]
            dBv[t] = zero

    @T.macro
    def per_head(dTAB, dTpart, H, P, BH):
        for h in T.parallel(H):
            for p in range(P):
                dTAB[h, p] = zero
            for g in range(BH // H):
                for p in range(P):
                    dTAB[h, p] += dTpart[g * H + h, p]

    return diagonals, per_head

"""One decoding step of causal linear attention (prefix_sum, decayed) as a recurrence, in TVMScript.

Per batch·head row b, with the token's features φq, φk (width M) and value v (D):

    S'  = γ·e^(m − m')·S + φk ⊗ [v, 1]          S (M, D + 1): Σ over the keys so far
    out = (φq·S'[:, :D]) / (φq·S'[:, D] + eps)

γ = exp(−TAB[b mod H, 0]) for the decayed form (TAB: its (H, 2) rates), else 1. A stabilized exp
map (favor, hyperbolic, exp_shift) keeps the keys' running shift m (MX, −∞ at the start):
φk = exp(raw_k − m')·norm with m' = max(m, max_w raw_k), the full forward's per-sequence key
stabilizer made causal; φq is stabilized by its own row max, a factor that cancels in the ratio.
The step reads the old state (S, MX) and writes a new one (S2, MX2): a state can be stepped twice
(beam search). Shapes: Q, K (BH, 1, Dk), V (BH, 1, D), Wt (Dk, width), O (BH, 1, D).
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from ..tir import vmath
from .featuremap import MapKernel, _quadrants, _raw_macro, elementwise_pair


def step_kernel(name: str, k: MapKernel, D: int, dtype: str, decayed: bool, eps: float | None):
    """The step's prim_func: (Q, K, V, Wt, TAB, S, MX, O out, S2 out, MX2 out)."""
    dk, M, norm = k.dk, k.width, k.norm
    elementwise = k.family == "elementwise"
    stab = k.family == "exp" and k.stabilize
    plain_exp = k.family == "exp" and not k.stabilize
    cosine = k.family == "cos"
    half = M // 2
    f = elementwise_pair(k, dtype)[0] if elementwise else None
    raw = None if elementwise else _raw_macro(k, dtype)
    floored = bool(eps)
    lowest = tirx.min_value(dtype)
    one = tirx.const(1, dtype)

    @T.prim_func
    def kernel(q: T.handle, k_: T.handle, v: T.handle, wt: T.handle, tab: T.handle, s: T.handle,
               mx: T.handle, o: T.handle, s2: T.handle, mx2: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        BH = T.int64()
        H = T.int64()
        P = T.int64()
        Q = T.match_buffer(q, (BH, 1, dk), dtype)
        K = T.match_buffer(k_, (BH, 1, dk), dtype)
        V = T.match_buffer(v, (BH, 1, D), dtype)
        Wt = T.match_buffer(wt, (dk, M), dtype)
        TAB = T.match_buffer(tab, (H, P), dtype)
        S = T.match_buffer(s, (BH, M, D + 1), dtype)
        MX = T.match_buffer(mx, (BH,), dtype)
        O = T.match_buffer(o, (BH, 1, D), dtype)
        S2 = T.match_buffer(s2, (BH, M, D + 1), dtype)
        MX2 = T.match_buffer(mx2, (BH,), dtype)
        for b in T.parallel(BH):
            fq = T.alloc_buffer((M,), dtype)
            fk = T.alloc_buffer((M,), dtype)
            acc = T.alloc_buffer((D + 1,), dtype)
            sc = T.alloc_buffer((3,), dtype)       # the state's factor, q's row max, the new key shift
            if elementwise:
                for w in range(M):
                    fq[w] = f(Q[b, 0, w])
                    fk[w] = f(K[b, 0, w])
            else:
                raw(Q, Wt, fq, b, 0)
                raw(K, Wt, fk, b, 0)
            sc[0] = one
            if decayed:
                sc[0] = T.exp(T.cast(0, dtype) - TAB[b % H, 0])
            MX2[b] = MX[b]
            if stab:
                sc[1] = lowest
                sc[2] = MX[b]
                for w in range(M):
                    sc[1] = T.max(sc[1], fq[w])
                    sc[2] = T.max(sc[2], fk[w])
                sc[0] = sc[0] * T.exp(MX[b] - sc[2])
                MX2[b] = sc[2]
                for w in range(M):
                    fq[w] = T.exp(fq[w] - sc[1]) * T.cast(norm, dtype)
                    fk[w] = T.exp(fk[w] - sc[2]) * T.cast(norm, dtype)
            elif plain_exp:
                for w in range(M):
                    fq[w] = T.exp(fq[w]) * T.cast(norm, dtype)
                    fk[w] = T.exp(fk[w]) * T.cast(norm, dtype)
            elif cosine:
                for w in range(M):
                    fq[w] = vmath.cos(fq[w], _quadrants(w, half)) * T.cast(norm, dtype)
                    fk[w] = vmath.cos(fk[w], _quadrants(w, half)) * T.cast(norm, dtype)
            for d in range(D + 1):
                acc[d] = T.cast(0, dtype)
            for m in range(M):
                for d in range(D):
                    S2[b, m, d] = S[b, m, d] * sc[0] + fk[m] * V[b, 0, d]
                    acc[d] = acc[d] + fq[m] * S2[b, m, d]
                S2[b, m, D] = S[b, m, D] * sc[0] + fk[m]
                acc[D] = acc[D] + fq[m] * S2[b, m, D]
            if floored:
                acc[D] = acc[D] + T.cast(eps, dtype)
            for d in range(D):
                O[b, 0, d] = acc[d] / acc[D]

    return kernel

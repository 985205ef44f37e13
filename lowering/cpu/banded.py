"""Banded + constant kernels: relative positions from a table clipped at W ≪ N, exactly, with no FFT.

Beyond the clip the weights are constant, c(r) = c₊ = c(W) for r ≥ W and c₋ = c(−W) for r ≤ −W
(c₋ = 0 when causal). Cut the sequence into chunks of C rows; for query chunk ci the key chunks
[lo, hi] = [ci − nb, ci + nb], nb = ⌈(W − 1)/C⌉, hold every key with |i − j| < W. So, v̄ = [v, 1]:

    Σ_j c(i−j) κ_ij v̄_j = φq_i·(c₊ P[lo] + c₋ (P[nc] − P[hi+1]))  +  Σ_{lo ≤ chunk(j) ≤ hi} c(i−j) κ_ij v̄_j
                           keys left / right of the window            exact weights, C×C tiles

with κ_ij = φq_i·φk_j and P[c] = Σ_{j < cC} φk_j⊗v̄_j the chunk prefix sums (N/C states, not N).
Cost O(N·(2nb+1)·C·(M+D)) + O(N·M·D); causal windows stop at the diagonal chunk. A sliding window
(far = False: c₊ = c₋ = 0) skips the prefix sums and the far term.

Shapes as in toeplitz.py: Qf, Kf (BH, N, M); V, O, dO (BH, N, D); DEN (BH, N); TAB (H, 2W+1), a
learned table; h = bh mod H. M, D and dtype are baked in; BH, N, H, W are symbolic. The kernels
implement the op `banded_attention` (abi.py).

Weights: c = exp(b − max b) over the r that occur (the shift cancels in the normalizer), stored for
every r a window can see in CE[r + R0], R0 = (nb + 1)·C, so a row of a C×C tile reads them as one
contiguous vector: w(s, t) = CE[R0 + (ci − kc)·C + t − s].
"""
from __future__ import annotations

import math

from tvm import tirx
from tvm.script import tirx as T

from attndsl.schedules import cpu
from attndsl.schedules.knobs import resolve

from ..tir.position import slot
from ..tir.tiles import chunk_loaders, fill, mm, mm_into, pad


# Symbolic sizes from the table width P = 2W + 1, length N and chunk C (inlined: TVM 0.27 refuses
# let-bound variables in allocation shapes).
def _nb(P, C):
    """Chunks a window reaches on each side: ⌈(W − 1)/C⌉."""
    return ((P - 1) // 2 + C - 2) // C


def _r0(P, C):
    """The largest |r| inside a window, plus one: CE has 2·R0 + 1 entries."""
    return (_nb(P, C) + 1) * C


def _chunks(N, C):
    return (N + C - 1) // C


def _weights(dtype: str, causal: bool, eps: float | None = None):
    """weights(TAB, h, N, W, R0, CE, CPM): CE[R0 + r] = c_h(r) for |r| ≤ R0, CPM = (c₊, c₋), and
    with `eps` CPM[2] = eps·exp(−max b), the floor in the weights' units."""
    zero = T.cast(0, dtype)
    floored = bool(eps)

    def occurs(r, N):
        return tirx.And(r >= 0, r < N) if causal else tirx.And(r > -N, r < N)

    @T.macro
    def weights(TAB, h, N, W, R0, CE, CPM):
        mx = T.alloc_buffer((1,), dtype, scope="local")
        mx[0] = T.min_value(dtype)
        for t in range(2 * W + 1):
            if occurs(t - W, N):
                mx[0] = T.max(mx[0], TAB[h, t])
        # exponents clamped at 0: a table entry no r reaches may exceed the max (it multiplies 0)
        for e in range(2 * R0 + 1):
            CE[e] = T.Select(occurs(e - R0, N) if causal else e >= 0,
                             T.exp(T.min(TAB[h, slot(e - R0, W)] - mx[0], zero)), zero)
        CPM[0] = T.exp(T.min(TAB[h, 2 * W] - mx[0], zero))
        CPM[1] = zero if causal else T.exp(T.min(TAB[h, 0] - mx[0], zero))
        if floored:
            CPM[2] = T.exp(T.cast(math.log(eps), dtype) - mx[0])

    return weights


def banded_forward(name: str, M: int, D: int, dtype: str, causal: bool, knobs: dict | None = None,
                   eps: float | None = None, far: bool = True):
    """(Qf, Kf, V, TAB, O out, DEN out). DEN_i = Σ_j c(i−j) κ_ij (+ eps·exp(−max b) with
    `eps`), O_i = Σ_j c(i−j) κ_ij V_j / DEN_i. `knobs`: the chunk C (schedules/knobs.py "banded").
    `far` False: the far keys weigh 0 (a sliding window), so their prefix sums are not built."""
    C = resolve("banded", knobs)["chunk"]
    L, zero, load, load_t, _, _ = chunk_loaders(dtype, C)
    HL = cpu.lanes(dtype)         # register tiles follow the host's vector unit (schedules/cpu.py)
    R = cpu.tile_rows(D, HL, C)   # rows of a (·, D) tile
    R1 = cpu.tile_rows(C, HL, C)  # rows of a score tile
    Mp = pad(M, R)
    weights = _weights(dtype, causal, eps)
    floored = bool(eps)

    @T.prim_func
    def kernel(q: T.handle, k: T.handle, v: T.handle, tab: T.handle, o: T.handle, dn: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        BH = T.int64()
        N = T.int64()
        H = T.int64()
        P = T.int64()
        Q = T.match_buffer(q, (BH, N, M), dtype)
        K = T.match_buffer(k, (BH, N, M), dtype)
        V = T.match_buffer(v, (BH, N, D), dtype)
        TAB = T.match_buffer(tab, (H, P), dtype)
        O = T.match_buffer(o, (BH, N, D), dtype)
        DEN = T.match_buffer(dn, (BH, N), dtype)
        W = (P - 1) // 2
        nb = _nb(P, C)
        R0 = _r0(P, C)
        nc = _chunks(N, C)
        CE = T.alloc_buffer((2 * _r0(P, C) + 1,), dtype)
        CPM = T.alloc_buffer((3 if floored else 2,), dtype)
        PS = T.alloc_buffer((_chunks(N, C) + 1 if far else 1, Mp, D), dtype)   # P[c]: Σ φk⊗v, chunks < c
        PZ = T.alloc_buffer((_chunks(N, C) + 1 if far else 1, Mp), dtype)      # the same for the ones column
        for bh in range(BH):
            weights(TAB, bh % H, N, W, R0, CE, CPM)
            if far:     # chunk sums into P[c + 1], then prefix sums
                for c in T.parallel(nc):
                    Kc = T.alloc_buffer((C, Mp), dtype)
                    Vc = T.alloc_buffer((C, D), dtype)
                    acc = T.alloc_buffer((R, D), dtype, scope="local")
                    for t in range(C):
                        for m in T.vectorized(Mp):
                            Kc[t, m] = zero
                    load(Kc, K, bh, c * C, N, M)
                    load(Vc, V, bh, c * C, N, D)
                    for m in T.vectorized(Mp):
                        PZ[c + 1, m] = zero
                    for t in range(C):
                        for m in T.vectorized(Mp):
                            PZ[c + 1, m] = PZ[c + 1, m] + Kc[t, m]
                    for m0 in range(Mp // R):
                        fill(acc, R, D)
                        mm(acc, Kc, True, Vc, m0 * R, R, 0, C, D)
                        for r in T.unroll(R):
                            for d in T.vectorized(D):
                                PS[c + 1, m0 * R + r, d] = acc[r, d]
                for m in T.parallel(Mp):
                    PZ[0, m] = zero
                    for d in T.vectorized(D):
                        PS[0, m, d] = zero
                    for c in range(nc):
                        PZ[c + 1, m] = PZ[c + 1, m] + PZ[c, m]
                        for d in T.vectorized(D):
                            PS[c + 1, m, d] = PS[c + 1, m, d] + PS[c, m, d]
            # every query chunk: the constant weights by P, then its window tile by tile
            for ci in T.parallel(nc):
                QcT = T.alloc_buffer((Mp, C), dtype)
                Kc = T.alloc_buffer((C, Mp), dtype)
                Vc = T.alloc_buffer((C, D), dtype)
                G = T.alloc_buffer((Mp, D), dtype)
                gz = T.alloc_buffer((Mp,), dtype)
                AT = T.alloc_buffer((C, C), dtype)       # AT[s, t] = c(i−j) Kf_s·Qf_t
                NUM = T.alloc_buffer((C, D), dtype)
                den = T.alloc_buffer((C,), dtype)
                acc = T.alloc_buffer((R, D), dtype, scope="local")
                acc1 = T.alloc_buffer((R1, C), dtype, scope="local")
                X = T.alloc_buffer((L, L), dtype, scope="local")
                Y = T.alloc_buffer((L, L), dtype, scope="local")
                lo = T.max(ci - nb, 0)
                hi = ci if causal else T.min(ci + nb, nc - 1)
                for m in range(Mp):
                    if far:
                        gz[m] = CPM[0] * PZ[lo, m] + CPM[1] * (PZ[nc, m] - PZ[hi + 1, m])
                        for d in T.vectorized(D):
                            G[m, d] = CPM[0] * PS[lo, m, d] + CPM[1] * (PS[nc, m, d] - PS[hi + 1, m, d])
                    for t in T.vectorized(C):
                        QcT[m, t] = zero
                for t in range(C):
                    for m in T.vectorized(Mp):
                        Kc[t, m] = zero
                load_t(QcT, Q, bh, ci * C, N, M, X, Y)
                for t in T.vectorized(C):
                    den[t] = zero
                if far:
                    for m in range(Mp):
                        for t in T.vectorized(C):
                            den[t] = den[t] + QcT[m, t] * gz[m]
                    for t0 in range(C // R):
                        fill(acc, R, D)
                        mm(acc, QcT, True, G, t0 * R, R, 0, Mp, D)
                        for r in T.unroll(R):
                            for d in T.vectorized(D):
                                NUM[t0 * R + r, d] = acc[r, d]
                else:
                    for t in range(C):
                        for d in T.vectorized(D):
                            NUM[t, d] = zero
                for kc in range(lo, hi + 1):
                    load(Kc, K, bh, kc * C, N, M)
                    load(Vc, V, bh, kc * C, N, D)
                    base = R0 + (ci - kc) * C
                    for s0 in range(C // R1):
                        fill(acc1, R1, C)
                        mm(acc1, Kc, False, QcT, s0 * R1, R1, 0, Mp, C)
                        for r in T.unroll(R1):
                            for t in T.vectorized(C):
                                AT[s0 * R1 + r, t] = acc1[r, t] * CE[base - s0 * R1 - r + t]
                                den[t] = den[t] + AT[s0 * R1 + r, t]
                    for t0 in range(C // R):
                        mm_into(NUM, acc, AT, True, Vc, t0 * R, R, 0, C, D)
                for t in range(C):
                    if ci * C + t < N:
                        if floored:
                            den[t] = den[t] + CPM[2]
                        DEN[bh, ci * C + t] = den[t]
                        for d in T.vectorized(D):
                            O[bh, ci * C + t, d] = NUM[t, d] * (T.cast(1, dtype) / den[t])

    return kernel


def banded_backward(name: str, M: int, D: int, dtype: str, causal: bool, knobs: dict | None = None,
                    far: bool = True):
    """Exact gradient of banded_forward: (Qf, Kf, V, TAB, O, DEN, dO, dQf out, dKf out, dV out,
    dTAB out (H, 2W+1)). With g_i = dO_i/DEN_i, cc_i = −(dO_i·O_i)/DEN_i, a_ij = Qf_i·Kf_j,
    b_ij = g_i·V_j + cc_i and w_ij = c(i−j) (c₊ / c₋ outside the windows):
        dQf_i = Σ_j w_ij b_ij Kf_j,   dKf_j = Σ_i w_ij b_ij Qf_i,   dV_j = Σ_i w_ij a_ij g_i,
        dTAB[slot(r)] += c(r) Σ_{i−j=r} a_ij b_ij     (c = exp(b − max b); the shift cancels).
    Far keys of a query chunk go through the key prefix sums P (as forward), far queries of a key
    chunk through the query prefix sums Pq[c] = Σ_{i < cC} Qf_i⊗[g_i, cc_i]; the window tiles are
    recomputed once from the query side (dQf, the weights' gradient) and once from the key side
    (dKf, dV), so no two threads write the same row. `knobs`, `far`: as banded_forward's."""
    C = resolve("banded", knobs)["chunk"]
    L, zero, load, load_t, _, _ = chunk_loaders(dtype, C)
    HL = cpu.lanes(dtype)
    RM = cpu.tile_rows(M, HL, C)  # rows of a (·, M) tile
    RD = cpu.tile_rows(D, HL, C)  # rows of a (·, D) tile
    R1 = cpu.tile_rows(C, HL, C)  # rows of a score tile
    Mp = pad(M, RD)              # state rows (over M) padded to whole tiles; padding stays 0
    weights = _weights(dtype, causal)

    @T.prim_func
    def kernel(q: T.handle, k: T.handle, v: T.handle, tab: T.handle, o: T.handle, dn: T.handle,
               do: T.handle, dq: T.handle, dk: T.handle, dv: T.handle, dtab: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        BH = T.int64()
        N = T.int64()
        H = T.int64()
        P = T.int64()
        Q = T.match_buffer(q, (BH, N, M), dtype)
        K = T.match_buffer(k, (BH, N, M), dtype)
        V = T.match_buffer(v, (BH, N, D), dtype)
        TAB = T.match_buffer(tab, (H, P), dtype)
        O = T.match_buffer(o, (BH, N, D), dtype)
        DEN = T.match_buffer(dn, (BH, N), dtype)
        dO = T.match_buffer(do, (BH, N, D), dtype)
        dQ = T.match_buffer(dq, (BH, N, M), dtype)
        dK = T.match_buffer(dk, (BH, N, M), dtype)
        dV = T.match_buffer(dv, (BH, N, D), dtype)
        dTAB = T.match_buffer(dtab, (H, P), dtype)
        W = (P - 1) // 2
        nb = _nb(P, C)
        R0 = _r0(P, C)
        nc = _chunks(N, C)
        CE = T.alloc_buffer((2 * _r0(P, C) + 1,), dtype)
        CPM = T.alloc_buffer((2,), dtype)
        PS = T.alloc_buffer((_chunks(N, C) + 1 if far else 1, Mp, D), dtype)   # key prefix sums Σ Kf⊗V
        PZ = T.alloc_buffer((_chunks(N, C) + 1 if far else 1, Mp), dtype)      #                 Σ Kf
        QS = T.alloc_buffer((_chunks(N, C) if far else 1, Mp, D), dtype)       # query chunk sums Σ Qf⊗g
        QZ = T.alloc_buffer((_chunks(N, C) if far else 1, Mp), dtype)          #                  Σ Qf cc
        PQ = T.alloc_buffer((_chunks(N, C) + 1 if far else 1, Mp, D), dtype)   # their prefix sums
        PQZ = T.alloc_buffer((_chunks(N, C) + 1 if far else 1, Mp), dtype)
        GALL = T.alloc_buffer((1, _chunks(N, C) * C, D), dtype)   # g rows (zero past N)
        CCALL = T.alloc_buffer((_chunks(N, C) * C,), dtype)
        DCE = T.alloc_buffer((_chunks(N, C), 2 * _r0(P, C) + 1), dtype)   # per query chunk: c(r) Σ a b
        DPM = T.alloc_buffer((_chunks(N, C), 2), dtype)                # per query chunk: dc₊, dc₋
        DSUM = T.alloc_buffer((2 * _r0(P, C) + 1,), dtype)
        for h in range(H):
            for t in range(P):
                dTAB[h, t] = zero
        for bh in range(BH):
            weights(TAB, bh % H, N, W, R0, CE, CPM)
            # 1. g, cc, and chunk sums of both sides
            for c in T.parallel(nc):
                Kc = T.alloc_buffer((C, Mp), dtype)
                Qc = T.alloc_buffer((C, Mp), dtype)
                Vc = T.alloc_buffer((C, D), dtype)
                Gc = T.alloc_buffer((C, D), dtype)
                inv = T.alloc_buffer((1,), dtype, scope="local")
                dot = T.alloc_buffer((1,), dtype, scope="local")
                accD = T.alloc_buffer((RD, D), dtype, scope="local")
                for t in range(C):
                    if c * C + t < N:
                        inv[0] = T.cast(1, dtype) / DEN[bh, c * C + t]
                        dot[0] = zero
                        for d in range(D):
                            dot[0] = dot[0] + dO[bh, c * C + t, d] * O[bh, c * C + t, d]
                        CCALL[c * C + t] = zero - dot[0] * inv[0]
                        for d in T.vectorized(D):
                            GALL[0, c * C + t, d] = dO[bh, c * C + t, d] * inv[0]
                    else:
                        CCALL[c * C + t] = zero
                        for d in T.vectorized(D):
                            GALL[0, c * C + t, d] = zero
                    if far:
                        for m in T.vectorized(Mp):
                            Kc[t, m] = zero
                            Qc[t, m] = zero
                if far:
                    load(Kc, K, bh, c * C, N, M)
                    load(Qc, Q, bh, c * C, N, M)
                    load(Vc, V, bh, c * C, N, D)
                    load(Gc, GALL, 0, c * C, N, D)
                    for m in T.vectorized(Mp):
                        PZ[c + 1, m] = zero
                        QZ[c, m] = zero
                    for t in range(C):
                        for m in T.vectorized(Mp):
                            PZ[c + 1, m] = PZ[c + 1, m] + Kc[t, m]
                            QZ[c, m] = QZ[c, m] + Qc[t, m] * CCALL[c * C + t]
                    for m0 in range(Mp // RD):
                        fill(accD, RD, D)
                        mm(accD, Kc, True, Vc, m0 * RD, RD, 0, C, D)
                        for r in T.unroll(RD):
                            for d in T.vectorized(D):
                                PS[c + 1, m0 * RD + r, d] = accD[r, d]
                        fill(accD, RD, D)
                        mm(accD, Qc, True, Gc, m0 * RD, RD, 0, C, D)
                        for r in T.unroll(RD):
                            for d in T.vectorized(D):
                                QS[c, m0 * RD + r, d] = accD[r, d]
            # 2. prefix sums over chunks
            if far:
                for m in T.parallel(Mp):
                    PZ[0, m] = zero
                    PQZ[0, m] = zero
                    for d in T.vectorized(D):
                        PS[0, m, d] = zero
                        PQ[0, m, d] = zero
                    for c in range(nc):
                        PZ[c + 1, m] = PZ[c + 1, m] + PZ[c, m]
                        PQZ[c + 1, m] = PQZ[c, m] + QZ[c, m]
                        for d in T.vectorized(D):
                            PS[c + 1, m, d] = PS[c + 1, m, d] + PS[c, m, d]
                            PQ[c + 1, m, d] = PQ[c, m, d] + QS[c, m, d]
            # 3. query chunks: dQf, and the gradient of the weights
            for ci in T.parallel(nc):
                QcT = T.alloc_buffer((M, C), dtype)
                GcT = T.alloc_buffer((D, C), dtype)
                cc = T.alloc_buffer((C,), dtype)
                Kc = T.alloc_buffer((C, M), dtype)
                Vc = T.alloc_buffer((C, D), dtype)
                GT = T.alloc_buffer((D, M), dtype)      # far-key weights, transposed
                gz = T.alloc_buffer((M,), dtype)
                BT = T.alloc_buffer((C, C), dtype)      # BT[s, t] = w b_ts
                AT = T.alloc_buffer((C, C), dtype)      # AT[s, t] = a_ts
                DQ = T.alloc_buffer((C, M), dtype)
                sp = T.alloc_buffer((2,), dtype, scope="local")
                accM = T.alloc_buffer((RM, M), dtype, scope="local")
                acc1 = T.alloc_buffer((R1, C), dtype, scope="local")
                X = T.alloc_buffer((L, L), dtype, scope="local")
                Y = T.alloc_buffer((L, L), dtype, scope="local")
                lo = T.max(ci - nb, 0)
                hi = ci if causal else T.min(ci + nb, nc - 1)
                sp[0] = zero
                sp[1] = zero
                if far:
                    for m in range(M):
                        gz[m] = CPM[0] * PZ[lo, m] + CPM[1] * (PZ[nc, m] - PZ[hi + 1, m])
                        sp[0] = sp[0] + QZ[ci, m] * PZ[lo, m]
                        sp[1] = sp[1] + QZ[ci, m] * (PZ[nc, m] - PZ[hi + 1, m])
                        for d in range(D):
                            GT[d, m] = CPM[0] * PS[lo, m, d] + CPM[1] * (PS[nc, m, d] - PS[hi + 1, m, d])
                            sp[0] = sp[0] + QS[ci, m, d] * PS[lo, m, d]
                            sp[1] = sp[1] + QS[ci, m, d] * (PS[nc, m, d] - PS[hi + 1, m, d])
                DPM[ci, 0] = sp[0]
                DPM[ci, 1] = sp[1]
                for e in range(2 * R0 + 1):
                    DCE[ci, e] = zero
                load_t(QcT, Q, bh, ci * C, N, M, X, Y)
                load_t(GcT, GALL, 0, ci * C, N, D, X, Y)
                for t in T.vectorized(C):
                    cc[t] = CCALL[ci * C + t]
                if far:
                    for t0 in range(C // RM):
                        fill(accM, RM, M)
                        mm(accM, GcT, True, GT, t0 * RM, RM, 0, D, M)
                        for r in T.unroll(RM):
                            for m in T.vectorized(M):
                                DQ[t0 * RM + r, m] = accM[r, m] + cc[t0 * RM + r] * gz[m]
                else:
                    for t in range(C):
                        for m in T.vectorized(M):
                            DQ[t, m] = zero
                for kc in range(lo, hi + 1):
                    load(Kc, K, bh, kc * C, N, M)
                    load(Vc, V, bh, kc * C, N, D)
                    base = R0 + (ci - kc) * C
                    for s0 in range(C // R1):
                        fill(acc1, R1, C)
                        mm(acc1, Kc, False, QcT, s0 * R1, R1, 0, M, C)
                        for r in T.unroll(R1):
                            for t in T.vectorized(C):
                                AT[s0 * R1 + r, t] = acc1[r, t]
                        fill(acc1, R1, C)
                        mm(acc1, Vc, False, GcT, s0 * R1, R1, 0, D, C)
                        for r in T.unroll(R1):
                            for t in T.vectorized(C):
                                bw: T.let = (acc1[r, t] + cc[t]) * CE[base - s0 * R1 - r + t]
                                BT[s0 * R1 + r, t] = bw
                                DCE[ci, base - s0 * R1 - r + t] = (DCE[ci, base - s0 * R1 - r + t]
                                                                   + AT[s0 * R1 + r, t] * bw)
                    for t0 in range(C // RM):
                        mm_into(DQ, accM, BT, True, Kc, t0 * RM, RM, 0, C, M)
                for t in range(C):
                    if ci * C + t < N:
                        for m in T.vectorized(M):
                            dQ[bh, ci * C + t, m] = DQ[t, m]
            # 4. key chunks: dKf, dV (far queries through the query prefix sums)
            for cj in T.parallel(nc):
                Qc = T.alloc_buffer((C, M), dtype)
                QcT = T.alloc_buffer((M, C), dtype)
                Gc = T.alloc_buffer((C, D), dtype)
                GcT = T.alloc_buffer((D, C), dtype)
                cc = T.alloc_buffer((C,), dtype)
                Kc = T.alloc_buffer((C, M), dtype)
                Vc = T.alloc_buffer((C, D), dtype)
                Rm = T.alloc_buffer((M, D), dtype)      # far-query weights Σ w Qf⊗g
                RT = T.alloc_buffer((D, M), dtype)
                rz = T.alloc_buffer((M,), dtype)
                AT = T.alloc_buffer((C, C), dtype)      # AT[s, t] = w a_ts
                BT = T.alloc_buffer((C, C), dtype)      # BT[s, t] = w b_ts
                DK = T.alloc_buffer((C, M), dtype)
                DVc = T.alloc_buffer((C, D), dtype)
                accM = T.alloc_buffer((RM, M), dtype, scope="local")
                accD = T.alloc_buffer((RD, D), dtype, scope="local")
                acc1 = T.alloc_buffer((R1, C), dtype, scope="local")
                X = T.alloc_buffer((L, L), dtype, scope="local")
                Y = T.alloc_buffer((L, L), dtype, scope="local")
                qlo = cj if causal else T.max(cj - nb, 0)
                qhi = T.min(cj + nb, nc - 1)
                if far:
                    for m in range(M):
                        rz[m] = CPM[0] * (PQZ[nc, m] - PQZ[qhi + 1, m]) + CPM[1] * PQZ[qlo, m]
                        for d in range(D):
                            Rm[m, d] = CPM[0] * (PQ[nc, m, d] - PQ[qhi + 1, m, d]) + CPM[1] * PQ[qlo, m, d]
                            RT[d, m] = Rm[m, d]
                load(Kc, K, bh, cj * C, N, M)
                load(Vc, V, bh, cj * C, N, D)
                if far:
                    for s0 in range(C // RM):
                        fill(accM, RM, M)
                        mm(accM, Vc, False, RT, s0 * RM, RM, 0, D, M)
                        for r in T.unroll(RM):
                            for m in T.vectorized(M):
                                DK[s0 * RM + r, m] = accM[r, m] + rz[m]
                    for s0 in range(C // RD):
                        fill(accD, RD, D)
                        mm(accD, Kc, False, Rm, s0 * RD, RD, 0, M, D)
                        for r in T.unroll(RD):
                            for d in T.vectorized(D):
                                DVc[s0 * RD + r, d] = accD[r, d]
                else:
                    for t in range(C):
                        for m in T.vectorized(M):
                            DK[t, m] = zero
                        for d in T.vectorized(D):
                            DVc[t, d] = zero
                for ci in range(qlo, qhi + 1):
                    load(Qc, Q, bh, ci * C, N, M)
                    load_t(QcT, Q, bh, ci * C, N, M, X, Y)
                    load(Gc, GALL, 0, ci * C, N, D)
                    load_t(GcT, GALL, 0, ci * C, N, D, X, Y)
                    for t in T.vectorized(C):
                        cc[t] = CCALL[ci * C + t]
                    base = R0 + (ci - cj) * C
                    for s0 in range(C // R1):
                        fill(acc1, R1, C)
                        mm(acc1, Kc, False, QcT, s0 * R1, R1, 0, M, C)
                        for r in T.unroll(R1):
                            for t in T.vectorized(C):
                                AT[s0 * R1 + r, t] = acc1[r, t] * CE[base - s0 * R1 - r + t]
                        fill(acc1, R1, C)
                        mm(acc1, Vc, False, GcT, s0 * R1, R1, 0, D, C)
                        for r in T.unroll(R1):
                            for t in T.vectorized(C):
                                BT[s0 * R1 + r, t] = (acc1[r, t] + cc[t]) * CE[base - s0 * R1 - r + t]
                    for s0 in range(C // RM):
                        mm_into(DK, accM, BT, False, Qc, s0 * RM, RM, 0, C, M)
                    for s0 in range(C // RD):
                        mm_into(DVc, accD, AT, False, Gc, s0 * RD, RD, 0, C, D)
                for t in range(C):
                    if cj * C + t < N:
                        for m in T.vectorized(M):
                            dK[bh, cj * C + t, m] = DK[t, m]
                        for d in T.vectorized(D):
                            dV[bh, cj * C + t, d] = DVc[t, d]
            # 5. the table's gradient: per-chunk sums reduced, scattered through the clip
            for e in T.parallel(2 * R0 + 1):
                DSUM[e] = zero
                for c in range(nc):
                    DSUM[e] = DSUM[e] + DCE[c, e]
            for e in range(2 * R0 + 1):
                dTAB[bh % H, slot(e - R0, W)] = dTAB[bh % H, slot(e - R0, W)] + DSUM[e]
            if far:
                for c in range(nc):
                    dTAB[bh % H, 2 * W] = dTAB[bh % H, 2 * W] + DPM[c, 0] * CPM[0]
                    dTAB[bh % H, 0] = dTAB[bh % H, 0] + DPM[c, 1] * CPM[1]

    return kernel

"""The pairwise form of a feature-map kernel: exact O(N²) attention in flash-style tiles, forward
and exact backward, with the position weight c(i − j) = exp(b(i − j)) computed on the fly. No
N×N tensor is ever formed.

    A_ij = (φq_i·φk_j) c(i − j) [j ∈ M(i)],   out_i = Σ_j A_ij v_j / (Σ_j A_ij + eps)

Shapes: Qf (BH, N, M), O, dO (BH, N, D), DEN (BH, N): N query rows; Kf (BHK, NK, M), V (BHK, NK, D):
NK keys (NK = N in self-attention; cross-attention keeps r = i − j and, causal, j ≤ i) of
BHK = BH / G rows, query row bh reading key row bh // G (grouped-query attention, as the quadratic
form's kernels; G = 1 otherwise; the backward writes dKf, dV per query row, which the op sums per
group); TAB (H, P) the position parameters (learned table P = 2W+1, alibi slopes P = 1, a dummy
otherwise); head h = bh mod H. M, D, dtype, causal and the position *kind* are baked in; BH, BHK,
N, NK, H, W are symbolic. The kernels implement the op `pairwise_attention` (abi.py).

Row shift: row i's weights are exp(b(i − j) − m_i), m_i = max of b over the r = i − j row i sees
(running maxima of b, O(N + NK) per head), so no weight overflows and every row keeps its
largest weight at 1, whatever range b spans; the shift cancels in the ratio, and DEN and the
floor are in the row's units: DEN_i = Σ_j A_ij e^(−m_i) + eps e^(−m_i).

Forward (per (bh, block of T query rows), in parallel), for each key tile of T keys: the tile's
κ = Kf·φqᵀ (transposed, queries in the vector lanes), times c read from the 2T − 1 values of b
along the tile's diagonals, summed into the row normalizer and multiplied into V. Causal: key
tiles above the diagonal are never visited.

Backward (per bh, outer loop over key tiles, inner over query tiles), with c' = c e^(−m_i)/DEN_i,
dP_ij = v_j·dO_i and D_i = dO_i·O_i:
    P_ij = κ_ij c'_ij,  G_ij = c'_ij (dP_ij − D_i)
    dV_j += Σ_i P_ij dO_i,  dKf_j += Σ_i G_ij φq_i,  dQf_i += Σ_j G_ij φk_j
    d b(r) = Σ_{i − j = r} κ_ij G_ij   (a learned table: per tile along its diagonals, then per head)
"""
from __future__ import annotations

import math

from tvm import tirx
from tvm.script import tirx as T

from attndsl.schedules import cpu

from ..tir.position import bias_builder, table_grads
from ..tir.tiles import chunk_loaders, fill, flash_backward, mm, mm_cols, mmc, out_cols, tile
from ..tir.vmath import exp


def _row_shift(dtype: str, causal: bool, bias):
    """row_shift(RM, TAB, H, N, NK, W): RM[h, i] = max over the r = i − j row i sees of b_h(r),
    j < NK (and j ≤ i when causal): r ∈ [max(i − NK + 1, 0), i] ∪ (not causal) [i − NK + 1, −1].
    The r ≥ 0 part is a running maximum within blocks of NK values of r; a row i ≥ NK (more
    queries than keys) sees the end of the previous block too, [i − NK + 1, its end], a running
    maximum as i descends (a sliding maximum over windows of NK); the r < 0 part is a running
    maximum backward from r = −1. O(N + NK) per head."""
    lowest = tirx.min_value(dtype)

    @T.macro
    def row_shift(RM, TAB, H, N, NK, W):
        for h in T.parallel(H):
            run = T.alloc_buffer((1,), dtype, scope="local")
            run[0] = lowest
            for i in range(N):
                if i % NK == 0:
                    run[0] = lowest
                run[0] = T.max(run[0], bias(TAB, h, i, W))
                RM[h, i] = run[0]
            if NK < N:
                # a = i − NK + 1 descending from N − NK; first the rest of its block, (a, end]
                run[0] = lowest
                for u in range(NK - 1 - (N - NK) % NK):
                    run[0] = T.max(run[0], bias(TAB, h, N - 1 - (N - NK) % NK - u, W))
                for t in range(N - NK):
                    if (N - NK - t) % NK == NK - 1:
                        run[0] = lowest
                    run[0] = T.max(run[0], bias(TAB, h, N - NK - t, W))
                    RM[h, N - 1 - t] = T.max(RM[h, N - 1 - t], run[0])
            if not causal:
                run[0] = lowest
                for t in range(NK - 1):
                    if NK - 1 - t < N:
                        RM[h, NK - 1 - t] = T.max(RM[h, NK - 1 - t], run[0])
                    run[0] = T.max(run[0], bias(TAB, h, -1 - t, W))
                RM[h, 0] = T.max(RM[h, 0], run[0])
    return row_shift


def _weight(bias):
    """κ · exp(b − m) for a tile entry, or κ itself without a position term."""
    return (lambda kappa, b, m: kappa * exp(b - m)) if bias is not None else (lambda kappa, b, m: kappa)


def pairwise_forward(name: str, M: int, D: int, dtype: str, causal: bool, position, knobs=None,
                     eps: float | None = None, narrow: bool = False):
    """(Qf, Kf, V, TAB, O out, DEN out): O_i = Σ_j A_ij v_j / DEN_i as above; `position` None: no
    b (c = 1). `knobs` (schedules/knobs.py, family "quadratic"): tile; `narrow`: a tile of one
    vector of query lanes (tiles.tile), for calls of few query rows."""
    L, Tt = cpu.lanes(dtype), tile(dtype, knobs, narrow)
    R1 = cpu.tile_rows(Tt, L, Tt)             # rows of a κ tile in registers (Tt columns)
    CV = out_cols(D, L)                       # output columns per register tile
    R = cpu.tile_rows(CV, L, Tt)              # rows of an output register tile
    _, zero, load, *_ = chunk_loaders(dtype, Tt)
    bias = bias_builder(position, dtype) if position is not None else None
    row_shift = _row_shift(dtype, causal, bias) if bias is not None else None
    weight = _weight(bias)
    one = T.cast(1, dtype)
    floored = bool(eps)
    log_eps = T.cast(math.log(eps), dtype) if floored else None

    def diag_end(i0, kt, qb):          # keys a causal diagonal tile's rows i0*R.. can see
        return T.Select(kt == qb, i0 * R + R, Tt) if causal else Tt

    def valid(j, i, kbase, qbase, NK):
        return tirx.all(kbase + j < NK, kbase + j <= qbase + i) if causal else kbase + j < NK

    def floor(m):                      # eps in the row's units
        return exp(log_eps - m) if bias is not None else T.cast(eps, dtype)

    @T.prim_func
    def kernel(qf: T.handle, kf: T.handle, v: T.handle, tab: T.handle, o: T.handle, den: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        BH = T.int64()
        BHK = T.int64()
        N = T.int64()
        NK = T.int64()
        H = T.int64()
        P = T.int64()
        Qf = T.match_buffer(qf, (BH, N, M), dtype)
        Kf = T.match_buffer(kf, (BHK, NK, M), dtype)
        V = T.match_buffer(v, (BHK, NK, D), dtype)
        TAB = T.match_buffer(tab, (H, P), dtype)
        O = T.match_buffer(o, (BH, N, D), dtype)
        DEN = T.match_buffer(den, (BH, N), dtype)
        W = (P - 1) // 2
        nb = (N + Tt - 1) // Tt
        nbk = (NK + Tt - 1) // Tt
        RM = T.alloc_buffer((H, N), dtype)            # the row shifts m_i
        if bias is not None:
            row_shift(RM, TAB, H, N, NK, W)
        for task in T.parallel(BH * nb):
            QT = T.alloc_buffer((M, Tt), dtype)       # φq of the block, transposed
            Kc = T.alloc_buffer((Tt, M), dtype)
            Vc = T.alloc_buffer((Tt, D), dtype)
            ST = T.alloc_buffer((Tt, Tt), dtype)      # ST[j, i]: the weights A_ij e^(−m_i)
            Oacc = T.alloc_buffer((Tt, D), dtype)
            Bv = T.alloc_buffer((2 * Tt,), dtype)     # b(i − j) of the tile along t = i − j + Tt − 1
            rm = T.alloc_buffer((Tt,), dtype)
            lsum = T.alloc_buffer((Tt,), dtype)
            acc1 = T.alloc_buffer((R1, Tt), dtype, scope="local")
            acc = T.alloc_buffer((R, CV), dtype, scope="local")
            b = task // nb
            qb = task % nb
            qbase = qb * Tt
            for i in range(Tt):
                for c in range(M):
                    QT[c, i] = T.Select(qbase + i < N, Qf[b, T.min(qbase + i, N - 1), c], zero)
                for d in T.vectorized(D):
                    Oacc[i, d] = zero
                if bias is not None:
                    rm[i] = RM[b % H, T.min(qbase + i, N - 1)]
                else:
                    rm[i] = zero
            for i in T.vectorized(Tt):
                lsum[i] = zero
            for t in T.vectorized(2 * Tt):
                Bv[t] = zero
            for kt in range(T.min(qb + 1, nbk) if causal else nbk):
                kbase = kt * Tt
                load(Kc, Kf, b // (BH // BHK), kbase, NK, M)
                load(Vc, V, b // (BH // BHK), kbase, NK, D)
                if bias is not None:
                    for t in range(2 * Tt - 1):
                        Bv[t] = bias(TAB, b % H, qbase - kbase + t - (Tt - 1), W)
                for j0 in range(Tt // R1):
                    fill(acc1, R1, Tt)
                    mm(acc1, Kc, False, QT, j0 * R1, R1, 0, M, Tt)
                    for r in T.unroll(R1):
                        for i in T.vectorized(Tt):
                            ST[j0 * R1 + r, i] = T.Select(
                                valid(j0 * R1 + r, i, kbase, qbase, NK),
                                weight(acc1[r, i], Bv[i + (Tt - 1 - r) - j0 * R1], rm[i]), zero)
                            lsum[i] = lsum[i] + ST[j0 * R1 + r, i]
                for i0, c0 in T.grid(Tt // R, D // CV):
                    if qbase + i0 * R < N:         # a block of query rows (cross-attention: few)
                        for r in T.unroll(R):
                            for d in T.vectorized(CV):
                                acc[r, d] = Oacc[i0 * R + r, c0 * CV + d]
                        mmc(acc, ST, True, Vc, i0 * R, R, 0, diag_end(i0, kt, qb), c0 * CV, CV)
                        for r in T.unroll(R):
                            for d in T.vectorized(CV):
                                Oacc[i0 * R + r, c0 * CV + d] = acc[r, d]
            for i in range(Tt):
                if qbase + i < N:
                    if floored:
                        DEN[b, qbase + i] = lsum[i] + floor(rm[i])
                    else:
                        DEN[b, qbase + i] = lsum[i]
                    inv: T.let = one / DEN[b, qbase + i]
                    for d in T.vectorized(D):
                        O[b, qbase + i, d] = Oacc[i, d] * inv

    return kernel


def pairwise_backward(name: str, M: int, D: int, dtype: str, causal: bool, position, learn: bool,
                      knobs=None, narrow: bool = False):
    """(Qf, Kf, V, TAB, O, DEN, dO, dQf out, dKf out, dV out, dTAB out (H, P)): the exact gradient
    of pairwise_forward's O (DEN holds the floor). dTAB is written only when `learn` (a learned
    table), else left alone. `knobs`, `narrow` as pairwise_forward's."""
    L, Tt = cpu.lanes(dtype), tile(dtype, knobs, narrow)
    R1 = cpu.tile_rows(Tt, L, Tt)
    CK, CV = out_cols(M, L), out_cols(D, L)
    RK, RV = cpu.tile_rows(CK, L, Tt), cpu.tile_rows(CV, L, Tt)
    _, zero, load, *_ = chunk_loaders(dtype, Tt)
    bias = bias_builder(position, dtype) if position is not None else None
    row_shift = _row_shift(dtype, causal, bias) if bias is not None else None
    weight = _weight(bias)
    one = T.cast(1, dtype)
    key_rows, query_rows = flash_backward(Tt, causal)
    diagonals, per_head = table_grads(Tt, dtype)

    def valid(j, i, kbase, qbase, N, NK):
        ok = tirx.all(kbase + j < NK, qbase + i < N)
        return tirx.all(ok, kbase + j <= qbase + i) if causal else ok

    @T.prim_func
    def kernel(qf: T.handle, kf: T.handle, v: T.handle, tab: T.handle, o: T.handle, den: T.handle,
               do: T.handle, dqf: T.handle, dkf: T.handle, dv: T.handle, dtab: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        BH = T.int64()
        BHK = T.int64()
        N = T.int64()
        NK = T.int64()
        H = T.int64()
        P = T.int64()
        Qf = T.match_buffer(qf, (BH, N, M), dtype)
        Kf = T.match_buffer(kf, (BHK, NK, M), dtype)
        V = T.match_buffer(v, (BHK, NK, D), dtype)
        TAB = T.match_buffer(tab, (H, P), dtype)
        O = T.match_buffer(o, (BH, N, D), dtype)
        DEN = T.match_buffer(den, (BH, N), dtype)
        dO = T.match_buffer(do, (BH, N, D), dtype)
        dQf = T.match_buffer(dqf, (BH, N, M), dtype)
        dKf = T.match_buffer(dkf, (BH, NK, M), dtype)
        dV = T.match_buffer(dv, (BH, NK, D), dtype)
        dTAB = T.match_buffer(dtab, (H, P), dtype)
        W = (P - 1) // 2
        nb = (N + Tt - 1) // Tt
        nbk = (NK + Tt - 1) // Tt
        RM = T.alloc_buffer((H, N), dtype)
        if bias is not None:
            row_shift(RM, TAB, H, N, NK, W)
        # per-bh operands, padded with zero rows to whole tiles; transposed rows get one cache
        # line of slack (a power-of-two row stride would map a tile's rows onto one L1 set)
        QT = T.alloc_buffer((BH, M, (N + Tt - 1) // Tt * Tt + L), dtype)       # φq, transposed
        dOT = T.alloc_buffer((BH, D, (N + Tt - 1) // Tt * Tt + L), dtype)      # dO, transposed
        Qp = T.alloc_buffer((BH, (N + Tt - 1) // Tt * Tt, M), dtype)
        dOp = T.alloc_buffer((BH, (N + Tt - 1) // Tt * Tt, D), dtype)
        Dd = T.alloc_buffer((BH, (N + Tt - 1) // Tt * Tt), dtype)          # D_i = dO_i·O_i
        Rp = T.alloc_buffer((BH, (N + Tt - 1) // Tt * Tt), dtype)          # m_i (written only when read:
        # TVM 0.27's buffer compaction miscompiles a buffer that is written and never read)
        Ip = T.alloc_buffer((BH, (N + Tt - 1) // Tt * Tt), dtype)          # 1 / DEN_i
        dQacc = T.alloc_buffer((BH, (N + Tt - 1) // Tt * Tt, M), dtype)
        dTpart = T.alloc_buffer((BH, P), dtype)       # each bh's share of dTAB
        for task in T.parallel(BH * nb):
            dsum = T.alloc_buffer((1,), dtype, scope="local")
            b = task // nb
            for i0 in range(Tt):
                i = task % nb * Tt + i0
                if i < N:
                    dsum[0] = zero
                    for c in range(M):
                        QT[b, c, i] = Qf[b, i, c]
                    for d in range(D):
                        dOT[b, d, i] = dO[b, i, d]
                        dsum[0] = dsum[0] + dO[b, i, d] * O[b, i, d]
                    for c in T.vectorized(M):
                        Qp[b, i, c] = Qf[b, i, c]
                    for d in T.vectorized(D):
                        dOp[b, i, d] = dO[b, i, d]
                    Dd[b, i] = dsum[0]
                    Ip[b, i] = one / DEN[b, i]
                    if bias is not None:
                        Rp[b, i] = RM[b % H, i]
                else:
                    for c in range(M):
                        QT[b, c, i] = zero
                    for d in range(D):
                        dOT[b, d, i] = zero
                    for c in T.vectorized(M):
                        Qp[b, i, c] = zero
                    for d in T.vectorized(D):
                        dOp[b, i, d] = zero
                    Dd[b, i] = zero
                    Ip[b, i] = zero
                    if bias is not None:
                        Rp[b, i] = zero
                for c in T.vectorized(M):
                    dQacc[b, i, c] = zero
        for b in T.parallel(BH):
            Kc = T.alloc_buffer((Tt, M), dtype)
            Vc = T.alloc_buffer((Tt, D), dtype)
            KT = T.alloc_buffer((Tt, Tt), dtype)      # κ[j, i], then κ G for the table
            PT = T.alloc_buffer((Tt, Tt), dtype)      # P[j, i]
            GT = T.alloc_buffer((Tt, Tt), dtype)      # G[j, i]
            dKacc = T.alloc_buffer((Tt, M), dtype)
            dVacc = T.alloc_buffer((Tt, D), dtype)
            Bv = T.alloc_buffer((2 * Tt,), dtype)
            dBv = T.alloc_buffer((2 * Tt,), dtype)
            acc1 = T.alloc_buffer((R1, Tt), dtype, scope="local")
            accK = T.alloc_buffer((RK, CK), dtype, scope="local")
            accV = T.alloc_buffer((RV, CV), dtype, scope="local")
            for t in T.vectorized(2 * Tt):
                Bv[t] = zero
                dBv[t] = zero
            if learn:
                for p in range(P):
                    dTpart[b, p] = zero
            for kt in range(nbk):
                kbase = kt * Tt
                load(Kc, Kf, b // (BH // BHK), kbase, NK, M)
                load(Vc, V, b // (BH // BHK), kbase, NK, D)
                for j in range(Tt):
                    for c in T.vectorized(M):
                        dKacc[j, c] = zero
                    for d in T.vectorized(D):
                        dVacc[j, d] = zero
                for qt in range(kt if causal else 0, nb):
                    qbase = qt * Tt
                    if bias is not None:
                        for t in range(2 * Tt - 1):
                            Bv[t] = bias(TAB, b % H, qbase - kbase + t - (Tt - 1), W)
                    for j0 in range(Tt // R1):
                        # κ, then dP: P = κ c' and G = c' (dP − D), R1 keys at a time
                        fill(acc1, R1, Tt)
                        mm_cols(acc1, Kc, QT, b, qbase, j0 * R1, R1, 0, M, Tt)
                        for r in T.unroll(R1):
                            for i in T.vectorized(Tt):
                                KT[j0 * R1 + r, i] = acc1[r, i]
                        fill(acc1, R1, Tt)
                        mm_cols(acc1, Vc, dOT, b, qbase, j0 * R1, R1, 0, D, Tt)
                        for r in T.unroll(R1):
                            for i in T.vectorized(Tt):
                                GT[j0 * R1 + r, i] = T.Select(
                                    valid(j0 * R1 + r, i, kbase, qbase, N, NK),
                                    weight(Ip[b, qbase + i], Bv[i + (Tt - 1 - r) - j0 * R1], Rp[b, qbase + i]),
                                    zero)
                                PT[j0 * R1 + r, i] = KT[j0 * R1 + r, i] * GT[j0 * R1 + r, i]
                                GT[j0 * R1 + r, i] = GT[j0 * R1 + r, i] * (acc1[r, i] - Dd[b, qbase + i])
                                if learn:
                                    KT[j0 * R1 + r, i] = KT[j0 * R1 + r, i] * GT[j0 * R1 + r, i]
                    # dV_j += Σ_i P_ji dO_i,  dKf_j += Σ_i G_ji φq_i,  dQf_i += Σ_j G_ji φk_j
                    key_rows(accV, dVacc, PT, dOp, b, qbase, N - qbase, RV, CV, D, qt, kt)
                    key_rows(accK, dKacc, GT, Qp, b, qbase, N - qbase, RK, CK, M, qt, kt)
                    query_rows(accK, dQacc, GT, Kc, b, qbase, N - qbase, RK, CK, M, qt, kt)
                    if learn:          # d b(r) = Σ_{i−j=r} κ_ji G_ji
                        diagonals(dTpart, dBv, KT, b, qbase, kbase, W)
                for j in range(Tt):
                    if kbase + j < NK:
                        for c in T.vectorized(M):
                            dKf[b, kbase + j, c] = dKacc[j, c]
                        for d in T.vectorized(D):
                            dV[b, kbase + j, d] = dVacc[j, d]
        for task in T.parallel(BH * nb):
            b = task // nb
            for i0 in range(Tt):
                i = task % nb * Tt + i0
                if i < N:
                    for c in T.vectorized(M):
                        dQf[b, i, c] = dQacc[b, i, c]
        if learn:
            per_head(dTAB, dTpart, H, P, BH)

    return kernel

"""The quadratic form for the softmax kernel: flash-style CPU kernels in TVMScript, forward and
exact backward, with the position term computed on the fly. No N×N tensor is ever formed.

Shapes: Q (BH, N, Dk), O, dO (BH, N, Dv), LSE (BH, N): N query rows; K (BHK, NK, Dk), V (BHK, NK, Dv),
KB (BHK, NK) a bias per key (the key padding mask's, attndsl/padding.py): NK keys (NK = N in
self-attention; cross-attention keeps r = i − j and, causal, j ≤ i) of BHK = BH / G rows, query
row bh reading key row bh // G (grouped-query attention: the G query heads of a kv head, with
no copy of K and V; G = 1 otherwise); TAB (H, P) the position parameters (learned table
P = 2W+1, alibi slopes P = 1, a dummy otherwise), head h = bh mod H. The backward writes dK, dV
per query row, (BH, NK, ·), which the op sums per group. Dk, Dv, dtype, scale s, causal and the
position *kind* are baked in; BH, BHK, N, NK, H, W are symbolic.

Tiles: T = four vector registers of query lanes (32 float32 rows with AVX2, 64 with AVX-512;
schedules/cpu.py; the tile knob), or one register in the narrow kernels that a call of at most
that many query rows runs (a decoding step, a few queries against a memory); register tiles use about half the vector registers, and outputs wider than
four vectors are computed in column windows, so nothing spills.

Forward (per (bh, block of T query rows), in parallel), for each key tile of T keys:
    S_ji = s·k_j·q_i + b(i − j) + kb_j     a T×T tile in L1, scores transposed so that rows of
                                           queries are vector lanes (row max, exp, sums vectorize)
    m'_i = max(m_i, max_j S_ji),  α_i = exp(m_i − m'_i),  P_ji = exp(S_ji − m'_i)
    l_i ← α_i l_i + Σ_j P_ji,     O_i ← α_i O_i + Σ_j P_ji v_j
and at the end O_i /= l_i, LSE_i = m_i + log l_i (kept for the backward). Causal: key tiles
above the diagonal are never visited; the diagonal tile is masked. A sliding window (the table
clipped at W + 1 whose edge is KEY_OUT, ast.windowed) visits only the tiles within ±W.
The position term of a tile depends on i − j only: the 2T − 1 values b(qbase − kbase + t − T + 1)
are evaluated once per tile (Bv) and read at offset i − j, so b costs O(T) per tile, not O(T²).

Backward (FlashAttention-2, per bh in parallel; outer loop over key tiles, inner over query
tiles), with P recomputed from the saved LSE and D_i = dO_i·O_i:
    dP_ji = v_j·dO_i,  dS_ji = P_ji (dP_ji − D_i)
    dV_j += Σ_i P_ji dO_i,  dK_j += s Σ_i dS_ji q_i,  dQ_i += s Σ_j dS_ji k_j
    d b(r) = Σ_{i − j = r} dS_ji  (gathered per tile along its diagonals, scattered into the
    table slot clip(r, −W, W) + W of a per-bh partial table; partials summed per head at the end).
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from attndsl.schedules import cpu

from ..tir.position import bias_builder, table_grads
from ..tir.tiles import fill, flash_backward, mm, mm_cols, mmc, out_cols, tile
from ..tir.vmath import softmax_exp


def _adder(bias):
    """x + b(i − j) read from the tile's diagonal vector, or x itself without a position term."""
    return (lambda x, b: x + b) if bias is not None else (lambda x, b: x)


def _band(position, Tt: int, causal: bool):
    """first(t, W), last(t, nb, W): the range [first, last) of the tiles of Tt keys that tile t of
    queries reaches, every tile (up to the diagonal when causal) or, with a sliding window
    (ast.windowed: the table clipped at W, the window W − 1), those within it; symmetric, so the
    same range holds for the query tiles a key tile reaches."""
    if position is None or position.name != "window":
        return (lambda t, W: 0), (lambda t, nb, W: T.min(t + 1, nb) if causal else nb)

    def first(t, W):
        return T.max(t * Tt - (W - 1), 0) // Tt

    def last(t, nb, W):
        return T.min(t + 1 if causal else nb, (t * Tt + Tt + W - 2) // Tt + 1)
    return first, last


def softmax_forward(name: str, Dk: int, Dv: int, dtype: str, causal: bool, scale: float, position,
                    knobs=None, narrow: bool = False):
    """(Q, K, V, TAB, KB, O out, LSE out). O_i = Σ_j softmax_j(s·q_i·k_j + b(i−j) + kb_j) v_j over
    j ≤ i when causal; LSE_i = log Σ_j exp(s·q_i·k_j + b(i−j) + kb_j). `position` None: no b.
    `knobs` (schedules/knobs.py, family "quadratic"): tile; `narrow`: a tile of one vector of
    query lanes (tiles.tile), for calls of few query rows."""
    L, Tt = cpu.lanes(dtype), tile(dtype, knobs, narrow)
    R1 = cpu.tile_rows(Tt, L, Tt)             # rows of a score tile in registers (Tt columns)
    CV = out_cols(Dv, L)                 # output columns per register tile
    R = cpu.tile_rows(CV, L, Tt)              # rows of an output register tile
    bias = bias_builder(position, dtype) if position is not None else None
    with_bias = _adder(bias)
    zero = T.cast(0, dtype)
    one = T.cast(1, dtype)
    lowest = tirx.min_value(dtype)
    sc = tirx.const(scale, dtype)

    def diag_end(i0, kt, qb):          # keys a causal diagonal tile's rows i0*R.. can see
        return T.Select(kt == qb, i0 * R + R, Tt) if causal else Tt

    first, last = _band(position, Tt, causal)

    @T.prim_func
    def kernel(q: T.handle, k: T.handle, v: T.handle, tab: T.handle, kb: T.handle, o: T.handle, lse: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        BH = T.int64()
        BHK = T.int64()
        N = T.int64()
        NK = T.int64()
        H = T.int64()
        P = T.int64()
        Q = T.match_buffer(q, (BH, N, Dk), dtype)
        K = T.match_buffer(k, (BHK, NK, Dk), dtype)
        V = T.match_buffer(v, (BHK, NK, Dv), dtype)
        TAB = T.match_buffer(tab, (H, P), dtype)
        KB = T.match_buffer(kb, (BHK, NK), dtype)
        O = T.match_buffer(o, (BH, N, Dv), dtype)
        LSE = T.match_buffer(lse, (BH, N), dtype)
        W = (P - 1) // 2
        nb = (N + Tt - 1) // Tt
        nbk = (NK + Tt - 1) // Tt
        for task in T.parallel(BH * nb):
            QT = T.alloc_buffer((Dk, Tt), dtype)      # s·q of the block, transposed
            Kc = T.alloc_buffer((Tt, Dk), dtype)
            Vc = T.alloc_buffer((Tt, Dv), dtype)
            KBc = T.alloc_buffer((Tt,), dtype)
            ST = T.alloc_buffer((Tt, Tt), dtype)      # ST[j, i]: scores, then weights P
            Oacc = T.alloc_buffer((Tt, Dv), dtype)
            Bv = T.alloc_buffer((2 * Tt,), dtype)     # b(i − j) of the tile along t = i − j + Tt − 1
            mx = T.alloc_buffer((Tt,), dtype)
            mn = T.alloc_buffer((Tt,), dtype)
            lsum = T.alloc_buffer((Tt,), dtype)
            alpha = T.alloc_buffer((Tt,), dtype)
            acc1 = T.alloc_buffer((R1, Tt), dtype, scope="local")
            acc = T.alloc_buffer((R, CV), dtype, scope="local")
            b = task // nb
            qb = task % nb
            qbase = qb * Tt
            for i in range(Tt):
                for c in range(Dk):
                    QT[c, i] = T.Select(qbase + i < N, Q[b, T.min(qbase + i, N - 1), c] * sc, zero)
                for d in T.vectorized(Dv):
                    Oacc[i, d] = zero
            for i in T.vectorized(Tt):
                mx[i] = lowest
                lsum[i] = zero
            for t in T.vectorized(2 * Tt):
                Bv[t] = zero
            for kt in range(first(qb, W), last(qb, nbk, W)):
                kbase = kt * Tt
                for j in range(Tt):
                    if kbase + j < NK:
                        for c in T.vectorized(Dk):
                            Kc[j, c] = K[b // (BH // BHK), kbase + j, c]
                        for d in T.vectorized(Dv):
                            Vc[j, d] = V[b // (BH // BHK), kbase + j, d]
                        KBc[j] = KB[b // (BH // BHK), kbase + j]
                    else:
                        for c in T.vectorized(Dk):
                            Kc[j, c] = zero
                        for d in T.vectorized(Dv):
                            Vc[j, d] = zero
                        KBc[j] = zero
                if bias is not None:
                    for t in range(2 * Tt - 1):
                        Bv[t] = bias(TAB, b % H, qbase - kbase + t - (Tt - 1), W)
                for i in T.vectorized(Tt):
                    mn[i] = mx[i]
                # scores, masked to `lowest`, and their running row max
                for j0 in range(Tt // R1):
                    fill(acc1, R1, Tt)
                    mm(acc1, Kc, False, QT, j0 * R1, R1, 0, Dk, Tt)
                    for r in T.unroll(R1):
                        for i in T.vectorized(Tt):
                            if causal:
                                ST[j0 * R1 + r, i] = T.Select(
                                    tirx.all(kbase + j0 * R1 + r < NK, kbase + j0 * R1 + r <= qbase + i),
                                    with_bias(acc1[r, i], Bv[i + (Tt - 1 - r) - j0 * R1]) + KBc[j0 * R1 + r], lowest)
                            else:
                                ST[j0 * R1 + r, i] = T.Select(
                                    kbase + j0 * R1 + r < NK,
                                    with_bias(acc1[r, i], Bv[i + (Tt - 1 - r) - j0 * R1]) + KBc[j0 * R1 + r], lowest)
                            mn[i] = T.max(mn[i], ST[j0 * R1 + r, i])
                for i in T.vectorized(Tt):
                    alpha[i] = softmax_exp(mx[i] - mn[i])
                    lsum[i] = lsum[i] * alpha[i]
                    mx[i] = mn[i]
                for j in range(Tt):
                    for i in T.vectorized(Tt):
                        ST[j, i] = softmax_exp(ST[j, i] - mx[i])
                        lsum[i] = lsum[i] + ST[j, i]
                for i0, c0 in T.grid(Tt // R, Dv // CV):
                    if qbase + i0 * R < N:         # a block of query rows (cross-attention: few)
                        for r in T.unroll(R):
                            for d in T.vectorized(CV):
                                acc[r, d] = Oacc[i0 * R + r, c0 * CV + d] * alpha[i0 * R + r]
                        mmc(acc, ST, True, Vc, i0 * R, R, 0, diag_end(i0, kt, qb), c0 * CV, CV)
                        for r in T.unroll(R):
                            for d in T.vectorized(CV):
                                Oacc[i0 * R + r, c0 * CV + d] = acc[r, d]
            for i in range(Tt):
                if qbase + i < N:
                    inv: T.let = one / lsum[i]
                    for d in T.vectorized(Dv):
                        O[b, qbase + i, d] = Oacc[i, d] * inv
                    LSE[b, qbase + i] = mx[i] + T.log(lsum[i])

    return kernel


def softmax_backward(name: str, Dk: int, Dv: int, dtype: str, causal: bool, scale: float, position,
                     learn: bool, knobs=None, narrow: bool = False):
    """(Q, K, V, TAB, KB, O, LSE, dO, dQ out, dK out, dV out, dTAB out (H, P)): the exact gradient of
    softmax_forward's O. dTAB is written only when `learn` (a learned table), else left alone.
    `knobs`, `narrow` as softmax_forward's."""
    L, Tt = cpu.lanes(dtype), tile(dtype, knobs, narrow)
    R1 = cpu.tile_rows(Tt, L, Tt)
    CK, CV = out_cols(Dk, L), out_cols(Dv, L)
    RK, RV = cpu.tile_rows(CK, L, Tt), cpu.tile_rows(CV, L, Tt)
    bias = bias_builder(position, dtype) if position is not None else None
    with_bias = _adder(bias)
    zero = T.cast(0, dtype)
    sc = tirx.const(scale, dtype)
    key_rows, query_rows = flash_backward(Tt, causal)
    diagonals, per_head = table_grads(Tt, dtype)
    # the query tiles a key tile reaches (r = −W … W), from the diagonal on when causal (a
    # window's first tile never lies past it)
    first, last = _band(position, Tt, False)

    def valid(j, i, kbase, qbase, N, NK):
        ok = tirx.all(kbase + j < NK, qbase + i < N)
        return tirx.all(ok, kbase + j <= qbase + i) if causal else ok

    @T.prim_func
    def kernel(q: T.handle, k: T.handle, v: T.handle, tab: T.handle, kb: T.handle, o: T.handle, lse: T.handle,
               do: T.handle, dq: T.handle, dk: T.handle, dv: T.handle, dtab: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        BH = T.int64()
        BHK = T.int64()
        N = T.int64()
        NK = T.int64()
        H = T.int64()
        P = T.int64()
        Q = T.match_buffer(q, (BH, N, Dk), dtype)
        K = T.match_buffer(k, (BHK, NK, Dk), dtype)
        V = T.match_buffer(v, (BHK, NK, Dv), dtype)
        TAB = T.match_buffer(tab, (H, P), dtype)
        KB = T.match_buffer(kb, (BHK, NK), dtype)
        O = T.match_buffer(o, (BH, N, Dv), dtype)
        LSE = T.match_buffer(lse, (BH, N), dtype)
        dO = T.match_buffer(do, (BH, N, Dv), dtype)
        dQ = T.match_buffer(dq, (BH, N, Dk), dtype)
        dK = T.match_buffer(dk, (BH, NK, Dk), dtype)
        dV = T.match_buffer(dv, (BH, NK, Dv), dtype)
        dTAB = T.match_buffer(dtab, (H, P), dtype)
        W = (P - 1) // 2
        nb = (N + Tt - 1) // Tt
        nbk = (NK + Tt - 1) // Tt
        # per-bh operands, padded with zero rows to whole tiles (memory linear in N)
        # transposed rows get one cache line of slack: a power-of-two row stride would map a
        # tile's Dk rows onto the same L1 set
        QT = T.alloc_buffer((BH, Dk, (N + Tt - 1) // Tt * Tt + L), dtype)      # s·q, transposed
        dOT = T.alloc_buffer((BH, Dv, (N + Tt - 1) // Tt * Tt + L), dtype)     # dO, transposed
        Qp = T.alloc_buffer((BH, (N + Tt - 1) // Tt * Tt, Dk), dtype)
        dOp = T.alloc_buffer((BH, (N + Tt - 1) // Tt * Tt, Dv), dtype)
        Dd = T.alloc_buffer((BH, (N + Tt - 1) // Tt * Tt), dtype)          # D_i = dO_i·O_i
        Lp = T.alloc_buffer((BH, (N + Tt - 1) // Tt * Tt), dtype)
        dQacc = T.alloc_buffer((BH, (N + Tt - 1) // Tt * Tt, Dk), dtype)
        dTpart = T.alloc_buffer((BH, P), dtype)       # each bh's share of dTAB
        for task in T.parallel(BH * nb):
            dsum = T.alloc_buffer((1,), dtype, scope="local")
            b = task // nb
            for i0 in range(Tt):
                i = task % nb * Tt + i0
                if i < N:
                    dsum[0] = zero
                    for c in range(Dk):
                        QT[b, c, i] = Q[b, i, c] * sc
                    for d in range(Dv):
                        dOT[b, d, i] = dO[b, i, d]
                        dsum[0] = dsum[0] + dO[b, i, d] * O[b, i, d]
                    for c in T.vectorized(Dk):
                        Qp[b, i, c] = Q[b, i, c]
                    for d in T.vectorized(Dv):
                        dOp[b, i, d] = dO[b, i, d]
                    Dd[b, i] = dsum[0]
                    Lp[b, i] = LSE[b, i]
                else:
                    for c in range(Dk):
                        QT[b, c, i] = zero
                    for d in range(Dv):
                        dOT[b, d, i] = zero
                    for c in T.vectorized(Dk):
                        Qp[b, i, c] = zero
                    for d in T.vectorized(Dv):
                        dOp[b, i, d] = zero
                    Dd[b, i] = zero
                    Lp[b, i] = zero
                for c in T.vectorized(Dk):
                    dQacc[b, i, c] = zero
        for b in T.parallel(BH):
            Kc = T.alloc_buffer((Tt, Dk), dtype)
            Vc = T.alloc_buffer((Tt, Dv), dtype)
            KBc = T.alloc_buffer((Tt,), dtype)
            PT = T.alloc_buffer((Tt, Tt), dtype)      # P[j, i]
            dST = T.alloc_buffer((Tt, Tt), dtype)     # dS[j, i]
            dKacc = T.alloc_buffer((Tt, Dk), dtype)
            dVacc = T.alloc_buffer((Tt, Dv), dtype)
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
                for j in range(Tt):
                    if kbase + j < NK:
                        for c in T.vectorized(Dk):
                            Kc[j, c] = K[b // (BH // BHK), kbase + j, c]
                        for d in T.vectorized(Dv):
                            Vc[j, d] = V[b // (BH // BHK), kbase + j, d]
                        KBc[j] = KB[b // (BH // BHK), kbase + j]
                    else:
                        for c in T.vectorized(Dk):
                            Kc[j, c] = zero
                        for d in T.vectorized(Dv):
                            Vc[j, d] = zero
                        KBc[j] = zero
                    for c in T.vectorized(Dk):
                        dKacc[j, c] = zero
                    for d in T.vectorized(Dv):
                        dVacc[j, d] = zero
                for qt in range(kt if causal else first(kt, W), last(kt, nb, W)):
                    qbase = qt * Tt
                    if bias is not None:
                        for t in range(2 * Tt - 1):
                            Bv[t] = bias(TAB, b % H, qbase - kbase + t - (Tt - 1), W)
                    # P = exp(S − LSE) and dS = P (dP − D), tile by tile of R1 keys
                    for j0 in range(Tt // R1):
                        fill(acc1, R1, Tt)
                        mm_cols(acc1, Kc, QT, b, qbase, j0 * R1, R1, 0, Dk, Tt)
                        for r in T.unroll(R1):
                            for i in T.vectorized(Tt):
                                PT[j0 * R1 + r, i] = T.Select(
                                    valid(j0 * R1 + r, i, kbase, qbase, N, NK),
                                    softmax_exp(with_bias(acc1[r, i], Bv[i + (Tt - 1 - r) - j0 * R1])
                                                + KBc[j0 * R1 + r] - Lp[b, qbase + i]),
                                    zero)
                        fill(acc1, R1, Tt)
                        mm_cols(acc1, Vc, dOT, b, qbase, j0 * R1, R1, 0, Dv, Tt)
                        for r in T.unroll(R1):
                            for i in T.vectorized(Tt):
                                dST[j0 * R1 + r, i] = PT[j0 * R1 + r, i] * (acc1[r, i] - Dd[b, qbase + i])
                    # dV_j += Σ_i P_ji dO_i,  dK_j += Σ_i dS_ji q_i  (s applied at the store),
                    # dQ_i += Σ_j dS_ji k_j
                    key_rows(accV, dVacc, PT, dOp, b, qbase, N - qbase, RV, CV, Dv, qt, kt)
                    key_rows(accK, dKacc, dST, Qp, b, qbase, N - qbase, RK, CK, Dk, qt, kt)
                    query_rows(accK, dQacc, dST, Kc, b, qbase, N - qbase, RK, CK, Dk, qt, kt)
                    if learn:          # d b(r) = Σ_{i−j=r} dS_ji
                        diagonals(dTpart, dBv, dST, b, qbase, kbase, W)
                for j in range(Tt):
                    if kbase + j < NK:
                        for c in T.vectorized(Dk):
                            dK[b, kbase + j, c] = dKacc[j, c] * sc
                        for d in T.vectorized(Dv):
                            dV[b, kbase + j, d] = dVacc[j, d]
        for task in T.parallel(BH * nb):
            b = task // nb
            for i0 in range(Tt):
                i = task % nb * Tt + i0
                if i < N:
                    for c in T.vectorized(Dk):
                        dQ[b, i, c] = dQacc[b, i, c] * sc
        if learn:
            per_head(dTAB, dTpart, H, P, BH)

    return kernel

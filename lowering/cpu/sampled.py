"""Sampled softmax attention (KDEformer, Zandieh et al. 2023, and its uniform baseline): CPU
kernels in TVMScript, forward and the exact backward of the estimator for given buckets and samples.

Rows are visited in *sorted* order — sorted row i is row PQ[i] of Q (PK[i] of K, V); attndsl/
sampling.py sorts by LSH bucket, identity order for uniform — and cut into blocks of B sorted rows
(the runtime scalar `blk`): sorted row i is in block g(i) = i // B. Query i sees
  * its block's keys exactly: keys j with g(j) = g(i) (and j ≤ i when causal), weight 1;
  * S samples, shared by every query: key row SI_t of K with value VS_t and weight
    w_t = exp(LW_t), unless the query's block already holds it: visible iff SB_t ≠ g(i)
    (SB_t < g(i) when causal),
so that, with lw = KB_j for block keys (the key padding mask's bias, 0 for a key kept),
    out_i = Σ_{j visible} e^{s·q_i·k_j + lw_j} v_j / Σ_{j visible} e^{s·q_i·k_j + lw_j}.
attndsl/sampling.py chooses the samples: heavy keys (LW = 0, VS = their values) and keys drawn
with probability p_t (LW = log 1/(p_t·S'), VS = their values or the tail's mean value).
LSE_i = log denominator_i (after the running max), kept for the backward.

Shapes: Q, K (BH, N, Dk); V, O, dO (BH, N, Dv); PQ, PK (BH, N) int32; SI, SB (BH, S) int32;
LW (BH, S); VS (BH, S, Dv); KB (BH, N); LSE (BH, N). Q, K, V, O, LSE, dO and the gradients stay in the
caller's row order: the permutations are read inside the kernels, so nothing is copied into
sorted order. Dk, Dv, dtype,
s and causal are baked in; BH, N, S, B symbolic.

Each key row of a tile carries its visibility as a block interval with one exception: visible to
query block g iff LO ≤ g ≤ HI and g ≠ EX (block key: LO = HI = g(j), EX = −1; sample: LO = 0, EX = SB
or, causal, LO = SB + 1; padding: LO > HI), and when causal also POS ≤ i. Query rows past N get
block −2, which no key is visible to.

Forward (per (bh, tile of T query rows)): key tiles over the blocks the rows span, then sample
tiles, each folded into a running max, normalizer and output as in lowering/cpu/quadratic.py.
Backward, P recomputed from LSE and D_i = dO_i·O_i, dS = P (dP − D):
  * query-major (per query tile): dQ_i = s Σ_j dS_ij k_j over block keys and samples;
  * key-major (per key tile, block keys and samples alike): dV_j = Σ_i P_ij dO_i,
    dK_j = s Σ_i dS_ij q_i, dLW_t = Σ_i dS_it — over the query blocks that see the tile; the
    samples' dK go to a (BH, S, Dk) buffer, added into rows SI by the caller (samples repeat),
    their dV is VS's gradient.
No two tasks write the same row, so there are no atomics.
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from attndsl.schedules import cpu

from ..tir.tiles import fill, mm, mmc, out_cols, tile
from ..tir.vmath import softmax_exp


def _helpers(Dk: int, Dv: int, dtype: str, causal: bool, scale: float, Tt: int):
    """Tile loaders and the visibility test shared by the kernels (closures over the constants;
    Tt query rows and keys per tile)."""
    zero = T.cast(0, dtype)
    sc = tirx.const(scale, dtype)
    big = T.int32(2 ** 30)

    def visible(j, i, lo, hi, ex, kpos, qblk, qpos):
        ok = tirx.all(lo[j] <= qblk[i], qblk[i] <= hi[j], qblk[i] != ex[j])
        return tirx.all(ok, kpos[j] <= qpos[i]) if causal else ok

    @T.macro
    def load_queries(Q, PQ, b, qbase, N, blk, QT, qblk, qpos):
        """QT[c, i] = s·q of sorted row qbase + i (zero past N); qblk[i] = its block or −2; qpos[i]."""
        for i in range(Tt):
            for c in range(Dk):
                QT[c, i] = T.Select(qbase + i < N, Q[b, PQ[b, T.min(qbase + i, N - 1)], c] * sc, zero)
            qblk[i] = T.Select(qbase + i < N, T.Cast("int32", (qbase + i) // blk), T.int32(-2))
            qpos[i] = T.Cast("int32", qbase + i)

    @T.macro
    def load_keys(K, V, PK, SI, LW, SB, VS, KB, b, kt, nkt, kstart, kend, S, blk,
                  Kc, Vc, kb, lo, hi, ex, kpos):
        """Key tile kt of a query tile's list: block keys [kstart, kend) in tiles first (kt < nkt),
        then the samples (keys K[SI], values VS); rows past either end are padding (visible to nobody)."""
        if kt < nkt:
            for j in range(Tt):
                kj = kstart + kt * Tt + j
                if kj < kend:
                    for c in T.vectorized(Dk):
                        Kc[j, c] = K[b, PK[b, kj], c]
                    for d in T.vectorized(Dv):
                        Vc[j, d] = V[b, PK[b, kj], d]
                    lo[j] = T.Cast("int32", kj // blk)
                    hi[j] = T.Cast("int32", kj // blk)
                    kb[j] = KB[b, PK[b, kj]]
                else:
                    for c in T.vectorized(Dk):
                        Kc[j, c] = zero
                    for d in T.vectorized(Dv):
                        Vc[j, d] = zero
                    lo[j] = T.int32(1)
                    hi[j] = T.int32(0)
                    kb[j] = zero
                ex[j] = T.int32(-1)
                kpos[j] = T.Cast("int32", kj)
        else:
            for j in range(Tt):
                t = (kt - nkt) * Tt + j
                if t < S:
                    for c in T.vectorized(Dk):
                        Kc[j, c] = K[b, SI[b, t], c]
                    for d in T.vectorized(Dv):
                        Vc[j, d] = VS[b, t, d]
                    if causal:
                        lo[j] = SB[b, t] + 1
                        ex[j] = T.int32(-1)
                    else:
                        lo[j] = T.int32(0)
                        ex[j] = SB[b, t]
                    hi[j] = big
                    kb[j] = LW[b, t]
                else:
                    for c in T.vectorized(Dk):
                        Kc[j, c] = zero
                    for d in T.vectorized(Dv):
                        Vc[j, d] = zero
                    lo[j] = T.int32(1)
                    hi[j] = T.int32(0)
                    ex[j] = T.int32(-1)
                    kb[j] = zero
                kpos[j] = T.int32(-1)

    def block_keys(qbase, N, blk):
        """[kstart, kend): the keys of every block that query rows qbase.. qbase + T − 1 touch."""
        return qbase // blk * blk, T.min(N, (T.min(qbase + Tt, N) - 1) // blk * blk + blk)

    return visible, load_queries, load_keys, block_keys


def sampled_forward(name: str, Dk: int, Dv: int, dtype: str, causal: bool, scale: float, knobs=None):
    """(Q, K, V, PQ, PK, SI, LW, SB, VS, KB, O out, LSE out, blk). `knobs` (schedules/knobs.py, family
    "quadratic", as the exact softmax kernels): tile."""
    L, Tt = cpu.lanes(dtype), tile(dtype, knobs)
    R1 = cpu.tile_rows(Tt, L, Tt)
    CV = out_cols(Dv, L)
    R = cpu.tile_rows(CV, L, Tt)
    visible, load_queries, load_keys, block_keys = _helpers(Dk, Dv, dtype, causal, scale, Tt)
    zero = T.cast(0, dtype)
    one = T.cast(1, dtype)
    lowest = tirx.min_value(dtype)

    @T.prim_func
    def kernel(q: T.handle, k: T.handle, v: T.handle, pq: T.handle, pk: T.handle, si: T.handle,
               lw: T.handle, sb: T.handle, vs: T.handle, keyb: T.handle, o: T.handle, lse: T.handle, blk: T.int64):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        BH = T.int64()
        N = T.int64()
        S = T.int64()
        Q = T.match_buffer(q, (BH, N, Dk), dtype)
        K = T.match_buffer(k, (BH, N, Dk), dtype)
        V = T.match_buffer(v, (BH, N, Dv), dtype)
        PQ = T.match_buffer(pq, (BH, N), "int32")
        PK = T.match_buffer(pk, (BH, N), "int32")
        SI = T.match_buffer(si, (BH, S), "int32")
        LW = T.match_buffer(lw, (BH, S), dtype)
        SB = T.match_buffer(sb, (BH, S), "int32")
        VS = T.match_buffer(vs, (BH, S, Dv), dtype)
        KB = T.match_buffer(keyb, (BH, N), dtype)
        O = T.match_buffer(o, (BH, N, Dv), dtype)
        LSE = T.match_buffer(lse, (BH, N), dtype)
        nq = (N + Tt - 1) // Tt
        for task in T.parallel(BH * nq):
            QT = T.alloc_buffer((Dk, Tt), dtype)
            Kc = T.alloc_buffer((Tt, Dk), dtype)
            Vc = T.alloc_buffer((Tt, Dv), dtype)
            ST = T.alloc_buffer((Tt, Tt), dtype)      # ST[j, i]: scores, then weights
            Oacc = T.alloc_buffer((Tt, Dv), dtype)
            kb = T.alloc_buffer((Tt,), dtype)         # log-weight of each key row
            lo = T.alloc_buffer((Tt,), "int32")
            hi = T.alloc_buffer((Tt,), "int32")
            ex = T.alloc_buffer((Tt,), "int32")
            kpos = T.alloc_buffer((Tt,), "int32")
            qblk = T.alloc_buffer((Tt,), "int32")
            qpos = T.alloc_buffer((Tt,), "int32")
            mx = T.alloc_buffer((Tt,), dtype)
            mn = T.alloc_buffer((Tt,), dtype)
            lsum = T.alloc_buffer((Tt,), dtype)
            alpha = T.alloc_buffer((Tt,), dtype)
            acc1 = T.alloc_buffer((R1, Tt), dtype, scope="local")
            acc = T.alloc_buffer((R, CV), dtype, scope="local")
            b = task // nq
            qbase = task % nq * Tt
            load_queries(Q, PQ, b, qbase, N, blk, QT, qblk, qpos)
            for i in range(Tt):
                for d in T.vectorized(Dv):
                    Oacc[i, d] = zero
            for i in T.vectorized(Tt):
                mx[i] = lowest
                lsum[i] = zero
            kstart, kend = block_keys(qbase, N, blk)
            nkt = (kend - kstart + Tt - 1) // Tt
            for kt in range(nkt + (S + Tt - 1) // Tt):
                load_keys(K, V, PK, SI, LW, SB, VS, KB, b, kt, nkt, kstart, kend, S, blk,
                          Kc, Vc, kb, lo, hi, ex, kpos)
                for i in T.vectorized(Tt):
                    mn[i] = mx[i]
                for j0 in range(Tt // R1):
                    fill(acc1, R1, Tt)
                    mm(acc1, Kc, False, QT, j0 * R1, R1, 0, Dk, Tt)
                    for r in T.unroll(R1):
                        for i in T.vectorized(Tt):
                            ST[j0 * R1 + r, i] = T.Select(
                                visible(j0 * R1 + r, i, lo, hi, ex, kpos, qblk, qpos),
                                acc1[r, i] + kb[j0 * R1 + r], lowest)
                            mn[i] = T.max(mn[i], ST[j0 * R1 + r, i])
                for i in T.vectorized(Tt):
                    alpha[i] = softmax_exp(mx[i] - mn[i])
                    lsum[i] = lsum[i] * alpha[i]
                    mx[i] = mn[i]
                for j in range(Tt):
                    for i in T.vectorized(Tt):
                        ST[j, i] = T.Select(ST[j, i] == lowest, zero, softmax_exp(ST[j, i] - mx[i]))
                        lsum[i] = lsum[i] + ST[j, i]
                for i0, c0 in T.grid(Tt // R, Dv // CV):
                    for r in T.unroll(R):
                        for d in T.vectorized(CV):
                            acc[r, d] = Oacc[i0 * R + r, c0 * CV + d] * alpha[i0 * R + r]
                    mmc(acc, ST, True, Vc, i0 * R, R, 0, Tt, c0 * CV, CV)
                    for r in T.unroll(R):
                        for d in T.vectorized(CV):
                            Oacc[i0 * R + r, c0 * CV + d] = acc[r, d]
            for i in range(Tt):
                if qbase + i < N:
                    inv: T.let = one / lsum[i]
                    for d in T.vectorized(Dv):
                        O[b, PQ[b, qbase + i], d] = Oacc[i, d] * inv
                    LSE[b, PQ[b, qbase + i]] = mx[i] + T.log(lsum[i])

    return kernel


def sampled_backward(name: str, Dk: int, Dv: int, dtype: str, causal: bool, scale: float, knobs=None):
    """(Q, K, V, PQ, PK, SI, LW, SB, VS, KB, O, LSE, dO, dQ, dK, dV, dKS, dVS, dLW out, blk): the exact
    gradient of sampled_forward's O for the given samples; dK, dV hold the block keys' share only
    (the caller adds dKS into rows SI; dVS is VS's gradient); LW's gradient lets p depend on the
    inputs. `knobs` as sampled_forward's."""
    L, Tt = cpu.lanes(dtype), tile(dtype, knobs)
    R1 = cpu.tile_rows(Tt, L, Tt)
    CK, CV = out_cols(Dk, L), out_cols(Dv, L)
    RK, RV = cpu.tile_rows(CK, L, Tt), cpu.tile_rows(CV, L, Tt)
    visible, load_queries, load_keys, block_keys = _helpers(Dk, Dv, dtype, causal, scale, Tt)
    zero = T.cast(0, dtype)
    sc = tirx.const(scale, dtype)

    @T.macro
    def load_grads(Q, O, dO, LSE, PQ, b, qbase, N, Qt, dOT, dOt, Dd, Lq):
        """Qt (raw q), dOT (dO transposed), dOt, Dd = dO·O and Lq = LSE of a query tile."""
        for i in range(Tt):
            if qbase + i < N:
                row: T.let = PQ[b, qbase + i]
                Dd[i] = zero
                for d in range(Dv):
                    dOT[d, i] = dO[b, row, d]
                    Dd[i] = Dd[i] + dO[b, row, d] * O[b, row, d]
                for c in T.vectorized(Dk):
                    Qt[i, c] = Q[b, row, c]
                for d in T.vectorized(Dv):
                    dOt[i, d] = dO[b, row, d]
                Lq[i] = LSE[b, row]
            else:
                Dd[i] = zero
                for d in range(Dv):
                    dOT[d, i] = zero
                for c in T.vectorized(Dk):
                    Qt[i, c] = zero
                for d in T.vectorized(Dv):
                    dOt[i, d] = zero
                Lq[i] = zero

    @T.macro
    def probabilities(Kc, Vc, QT, dOT, kb, Lq, Dd, lo, hi, ex, kpos, qblk, qpos, PT, dST, acc1):
        """PT[j, i] = P_ij = exp(s·q_i·k_j + lw_j − LSE_i) where visible, else 0; dST = P (dP − D)."""
        for j0 in range(Tt // R1):
            fill(acc1, R1, Tt)
            mm(acc1, Kc, False, QT, j0 * R1, R1, 0, Dk, Tt)
            for r in T.unroll(R1):
                for i in T.vectorized(Tt):
                    PT[j0 * R1 + r, i] = T.Select(
                        visible(j0 * R1 + r, i, lo, hi, ex, kpos, qblk, qpos),
                        softmax_exp(acc1[r, i] + kb[j0 * R1 + r] - Lq[i]), zero)
            fill(acc1, R1, Tt)
            mm(acc1, Vc, False, dOT, j0 * R1, R1, 0, Dv, Tt)
            for r in T.unroll(R1):
                for i in T.vectorized(Tt):
                    dST[j0 * R1 + r, i] = PT[j0 * R1 + r, i] * (acc1[r, i] - Dd[i])

    @T.macro
    def accumulate(buf, acc, A, a_t, B, R, C, width):
        """buf[r, :] += Σ_k A(r, k) B[k, :] over the tile (A read as A[k, r] when a_t), one R × C
        register tile at a time."""
        for i0, c0 in T.grid(Tt // R, width // C):
            for r in T.unroll(R):
                for c in T.vectorized(C):
                    acc[r, c] = buf[i0 * R + r, c0 * C + c]
            mmc(acc, A, a_t, B, i0 * R, R, 0, Tt, c0 * C, C)
            for r in T.unroll(R):
                for c in T.vectorized(C):
                    buf[i0 * R + r, c0 * C + c] = acc[r, c]

    @T.prim_func
    def kernel(q: T.handle, k: T.handle, v: T.handle, pq: T.handle, pk: T.handle, si: T.handle,
               lw: T.handle, sb: T.handle, vs: T.handle, keyb: T.handle, o: T.handle, lse: T.handle, do: T.handle,
               dq: T.handle, dk: T.handle, dv: T.handle, dks: T.handle, dvs: T.handle, dlw: T.handle, blk: T.int64):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        BH = T.int64()
        N = T.int64()
        S = T.int64()
        Q = T.match_buffer(q, (BH, N, Dk), dtype)
        K = T.match_buffer(k, (BH, N, Dk), dtype)
        V = T.match_buffer(v, (BH, N, Dv), dtype)
        PQ = T.match_buffer(pq, (BH, N), "int32")
        PK = T.match_buffer(pk, (BH, N), "int32")
        SI = T.match_buffer(si, (BH, S), "int32")
        LW = T.match_buffer(lw, (BH, S), dtype)
        SB = T.match_buffer(sb, (BH, S), "int32")
        VS = T.match_buffer(vs, (BH, S, Dv), dtype)
        KB = T.match_buffer(keyb, (BH, N), dtype)
        O = T.match_buffer(o, (BH, N, Dv), dtype)
        LSE = T.match_buffer(lse, (BH, N), dtype)
        dO = T.match_buffer(do, (BH, N, Dv), dtype)
        dQ = T.match_buffer(dq, (BH, N, Dk), dtype)
        dK = T.match_buffer(dk, (BH, N, Dk), dtype)
        dV = T.match_buffer(dv, (BH, N, Dv), dtype)
        dKS = T.match_buffer(dks, (BH, S, Dk), dtype)
        dVS = T.match_buffer(dvs, (BH, S, Dv), dtype)
        dLW = T.match_buffer(dlw, (BH, S), dtype)
        nq = (N + Tt - 1) // Tt
        ns = (S + Tt - 1) // Tt
        # tasks t < nq: query tile t (dQ); t ≥ nq: key tile u = t − nq, block keys (dK, dV) if
        # u < nq, else samples (dKS, dVS, dLW)
        for task in T.parallel(BH * (2 * nq + ns)):
            QT = T.alloc_buffer((Dk, Tt), dtype)
            Qt = T.alloc_buffer((Tt, Dk), dtype)
            dOT = T.alloc_buffer((Dv, Tt), dtype)
            dOt = T.alloc_buffer((Tt, Dv), dtype)
            Dd = T.alloc_buffer((Tt,), dtype)
            Lq = T.alloc_buffer((Tt,), dtype)
            Kc = T.alloc_buffer((Tt, Dk), dtype)
            Vc = T.alloc_buffer((Tt, Dv), dtype)
            PT = T.alloc_buffer((Tt, Tt), dtype)
            dST = T.alloc_buffer((Tt, Tt), dtype)
            dXacc = T.alloc_buffer((Tt, Dk), dtype)   # dQ of a query tile or dK of a key tile
            dVacc = T.alloc_buffer((Tt, Dv), dtype)
            dLWacc = T.alloc_buffer((Tt, Tt), dtype)  # Σ_i dS[j, i], lane-wise until the end
            kb = T.alloc_buffer((Tt,), dtype)
            lo = T.alloc_buffer((Tt,), "int32")
            hi = T.alloc_buffer((Tt,), "int32")
            ex = T.alloc_buffer((Tt,), "int32")
            kpos = T.alloc_buffer((Tt,), "int32")
            qblk = T.alloc_buffer((Tt,), "int32")
            qpos = T.alloc_buffer((Tt,), "int32")
            red = T.alloc_buffer((1,), dtype, scope="local")
            acc1 = T.alloc_buffer((R1, Tt), dtype, scope="local")
            accK = T.alloc_buffer((RK, CK), dtype, scope="local")
            accV = T.alloc_buffer((RV, CV), dtype, scope="local")
            b = task // (2 * nq + ns)
            t = task % (2 * nq + ns)
            for j in range(Tt):
                for c in T.vectorized(Dk):
                    dXacc[j, c] = zero
                for d in T.vectorized(Dv):
                    dVacc[j, d] = zero
                for i in T.vectorized(Tt):
                    dLWacc[j, i] = zero
            if t < nq:                            # query-major: dQ_i = s Σ_j dS_ij k_j
                qbase = t * Tt
                load_queries(Q, PQ, b, qbase, N, blk, QT, qblk, qpos)
                load_grads(Q, O, dO, LSE, PQ, b, qbase, N, Qt, dOT, dOt, Dd, Lq)
                kstart, kend = block_keys(qbase, N, blk)
                nkt = (kend - kstart + Tt - 1) // Tt
                for kt in range(nkt + ns):
                    load_keys(K, V, PK, SI, LW, SB, VS, KB, b, kt, nkt, kstart, kend, S, blk,
                              Kc, Vc, kb, lo, hi, ex, kpos)
                    probabilities(Kc, Vc, QT, dOT, kb, Lq, Dd, lo, hi, ex, kpos, qblk, qpos, PT, dST, acc1)
                    accumulate(dXacc, accK, dST, True, Kc, RK, CK, Dk)
                for i in range(Tt):
                    if qbase + i < N:
                        for c in T.vectorized(Dk):
                            dQ[b, PQ[b, qbase + i], c] = dXacc[i, c] * sc
            else:                                 # key-major, over the queries that see the tile
                u = t - nq
                kbase = u * Tt
                qstart = T.Select(u < nq, kbase // blk * blk, T.int64(0))
                qend = T.Select(u < nq, T.min(N, (T.min(kbase + Tt, N) - 1) // blk * blk + blk), N)
                load_keys(K, V, PK, SI, LW, SB, VS, KB, b, T.Select(u < nq, T.int64(0), T.int64(1) + u - nq),
                          T.int64(1), kbase, N, S, blk, Kc, Vc, kb, lo, hi, ex, kpos)
                for qt in range((qend - qstart + Tt - 1) // Tt):
                    qbase = qstart + qt * Tt
                    load_queries(Q, PQ, b, qbase, N, blk, QT, qblk, qpos)
                    load_grads(Q, O, dO, LSE, PQ, b, qbase, N, Qt, dOT, dOt, Dd, Lq)
                    probabilities(Kc, Vc, QT, dOT, kb, Lq, Dd, lo, hi, ex, kpos, qblk, qpos, PT, dST, acc1)
                    accumulate(dVacc, accV, PT, False, dOt, RV, CV, Dv)       # Σ_i P_ij dO_i
                    accumulate(dXacc, accK, dST, False, Qt, RK, CK, Dk)       # Σ_i dS_ij q_i
                    if u >= nq:
                        for j in range(Tt):
                            for i in T.vectorized(Tt):
                                dLWacc[j, i] = dLWacc[j, i] + dST[j, i]
                for j in range(Tt):
                    if u < nq:
                        if kbase + j < N:
                            for c in T.vectorized(Dk):
                                dK[b, PK[b, kbase + j], c] = dXacc[j, c] * sc
                            for d in T.vectorized(Dv):
                                dV[b, PK[b, kbase + j], d] = dVacc[j, d]
                    elif (u - nq) * Tt + j < S:
                        for c in T.vectorized(Dk):
                            dKS[b, (u - nq) * Tt + j, c] = dXacc[j, c] * sc
                        for d in T.vectorized(Dv):
                            dVS[b, (u - nq) * Tt + j, d] = dVacc[j, d]
                        red[0] = zero
                        for i in range(Tt):
                            red[0] = red[0] + dLWacc[j, i]
                        dLW[b, (u - nq) * Tt + j] = red[0]

    return kernel

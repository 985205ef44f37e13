"""Toeplitz-FFT kernels: relative positions in linear attention in O(N log N) (Luo et al. 2021,
FastRPB), forward and exact backward, in TVMScript. The scores kernels inline their FFTs
(fft/convolve.py); the values kernels call one through packed functions (fft/packed.py: fft/real.py's
TVMScript FFT by default, or torch.fft).

Shapes: Qf, Kf (BH, N, M); V, O, dO (BH, N, D); DEN (BH, N); TAB (H, P) the position parameters
(a learned table, P = 2W+1; alibi slopes, P = 1; unused for a user function); head h = bh mod H.
M, D, dtype and the position *kind* are baked in; BH, N, H, W are symbolic. `n_fft` (scalar) is
the FFT length L ≥ 2N − 1 (costs.fft_length), so circular products are linear ones.

The Toeplitz weights c(r), r = i − j, live in a length-L circular buffer: c_cyc[r mod L]
(zero where r is masked: |r| ≥ N, and r < 0 when causal). Then for every channel sequence u,
    Σ_j c(i − j) u_j = irfft(ĉ · rfft(u))_i          (convolution)
    Σ_i c(i − j) a_i = irfft(conj(ĉ) · rfft(a))_j    (correlation: the transposed product)
    Σ_i a_i b_{i−r}  = irfft(Σ rfft(a) · conj(rfft(b)))[r mod L]   (d c(r), the table's gradient)

Scores (Luo): c = exp(b − max b) (the shift cancels in the normalizer). Channels (m, d) with
d ≤ D, v_aug = [v, 1]:  NUM_i,d = Σ_m Qf_im Σ_j c(i−j) Kf_jm v_aug_jd,  O = NUM[:, :D] / NUM[:, D].
Values (FastRPB): c = b, channels d < D:  Y_i = Σ_j c(i−j) V_j.

Memory: heads run one after another and channels go through the FFT a block at a time, so the
(N, M·D) state sequence is never materialized, for any head. The scores kernels are fused (FFT
work buffers of 2·VL features, in the vector lanes and the complex parts, filled straight from
the inputs and contracted in place: scores_forward, scores_backward); the values form runs its
D channels through the packed FFT.
"""
from __future__ import annotations

import math

from tvm import tirx
from tvm.script import tirx as T

from attndsl.schedules import cpu
from attndsl.schedules.knobs import resolve as knobs_of

from ..fft import convolve as fft_convolve
from ..tir.position import bias_builder, rel, slot


def _valid(causal: bool):
    """valid(p, N, L): whether circular position p holds an r = i − j that occurs (r ≥ 0 if causal)."""
    def valid(p, N, L):
        if causal:
            return p < N
        return tirx.Or(p < N, p > L - N)
    return valid


def _floor(dtype: str, causal: bool, bias, eps: float):
    """floor(FL, TAB, H, N, Lf, W): FL[h] = eps·exp(−max_r b_h(r)), the floor in the units of the
    weights c = exp(b − max b)."""
    valid = _valid(causal)

    @T.macro
    def floor(FL, TAB, H, N, Lf, W):
        for h in T.parallel(H):
            mx = T.alloc_buffer((1,), dtype, scope="local")
            mx[0] = T.min_value(dtype)
            for p in range(Lf):
                if valid(p, N, Lf):
                    mx[0] = T.max(mx[0], bias(TAB, h, rel(p, N, Lf), W))
            FL[h] = T.exp(T.cast(math.log(eps), dtype) - mx[0])
    return floor


def _position_macros(dtype: str, causal: bool, bias, exp_c: bool):
    """Macros shared by all four kernels: the weights' spectrum, and the table's gradient."""
    zero = T.cast(0, dtype)
    valid = _valid(causal)

    @T.macro
    def weights(CC, TAB, H, N, Lf, W):
        """CC[h, p] = c_h(r), r = p or p − L (0 where r is masked)."""
        for h in T.parallel(H):
            mx = T.alloc_buffer((1,), dtype, scope="local")
            mx[0] = T.min_value(dtype)
            for p in range(Lf):
                if valid(p, N, Lf):
                    CC[h, p] = bias(TAB, h, rel(p, N, Lf), W)
                    mx[0] = T.max(mx[0], CC[h, p])
                else:
                    CC[h, p] = zero
            if exp_c:
                for p in range(Lf):
                    CC[h, p] = T.Select(valid(p, N, Lf), T.exp(CC[h, p] - mx[0]), zero)

    @T.macro
    def build_spectrum(CC, CH, TAB, H, N, Lf, W):
        """CC[h, p] = c_h(r), r = p or p − L; CH[h] = rfft(CC[h])."""
        weights(CC, TAB, H, N, Lf, W)
        T.evaluate(T.call_packed("attndsl.fft.rfft", CC, CH, Lf))

    @T.macro
    def scatter_grad(DCC, CC, dTAB, H, P, N, Lf, W):
        """dTAB from dc = DCC (H, L), circular order: db = dc·c (scores, as c = exp(b)) or dc
        (values), scattered into the table through the clip."""
        for h in T.parallel(H):
            for t in range(P):
                dTAB[h, t] = zero
            for p in range(Lf):
                if valid(p, N, Lf):
                    if exp_c:
                        dTAB[h, slot(rel(p, N, Lf), W)] += DCC[h, p] * CC[h, p]
                    else:
                        dTAB[h, slot(rel(p, N, Lf), W)] += DCC[h, p]

    @T.macro
    def table_grad(DC, DCC, CC, dTAB, H, P, N, Lf, W):
        """dTAB from DC = Σ rfft(a)·conj(rfft(b)): dc = irfft(DC), then scatter_grad."""
        T.evaluate(T.call_packed("attndsl.fft.irfft", DC, DCC))
        scatter_grad(DCC, CC, dTAB, H, P, N, Lf, W)

    @T.macro
    def spectral(X, CH, h, F, conj):
        """X[g] *= CH[h] (or conj(CH[h])), complex, interleaved."""
        for g in T.parallel(X.shape[0]):
            for w in range(F):
                xr: T.let = X[g, w, 0]
                xi: T.let = X[g, w, 1]
                cr: T.let = CH[h, w, 0]
                ci: T.let = CH[h, w, 1]
                if conj:
                    X[g, w, 0] = xr * cr + xi * ci
                    X[g, w, 1] = xi * cr - xr * ci
                else:
                    X[g, w, 0] = xr * cr - xi * ci
                    X[g, w, 1] = xi * cr + xr * ci

    @T.macro
    def cross_spectrum(DC, XA, XB, h, F, G):
        """DC[h] += Σ_g XA[g] · conj(XB[g])."""
        for w in T.parallel(F):
            for g in range(G):
                DC[h, w, 0] += XA[g, w, 0] * XB[g, w, 0] + XA[g, w, 1] * XB[g, w, 1]
                DC[h, w, 1] += XA[g, w, 1] * XB[g, w, 0] - XA[g, w, 0] * XB[g, w, 1]

    return build_spectrum, table_grad, spectral, cross_spectrum, weights, scatter_grad


def _block_bytes(knobs) -> int:
    """The FFT convolver's block size from the block_kb knob (schedules/knobs.py)."""
    return knobs_of("toeplitz", knobs)["block_kb"] * 1024


def _feature(M: int, VL: int, dtype: str):
    """(X, bh, t, m) -> X[bh, t, m], 0 for the lanes past M (a gather only when M is not a
    multiple of 2·VL, the features of one work buffer)."""
    def feature(X, bh, t, m):
        if M % (2 * VL) == 0:
            return X[bh, t, m]
        return tirx.Select(m < M, X[bh, t, tirx.min(m, M - 1)], T.cast(0, dtype))
    return feature


def scores_forward(name: str, M: int, D: int, dtype: str, causal: bool, position, knobs=None,
                   eps: float | None = None):
    """Luo et al., fused: (Qf, Kf, V, TAB, O out, DEN out, n_fft), the maths of the module; with
    `eps`, DEN_i gets + eps·exp(−max b) (c = exp(b − max b)).

    One work unit per value channel d ≤ D (in parallel), 2·VL features m at a time: the vector
    lanes hold VL of them and the real and imaginary parts two feature blocks,
    z_t = (Kf[t, m0+l] + i·Kf[t, m0+VL+l])·v_aug[t, d], written straight into the FFT's work
    buffer, convolved with c_h in place (fft/convolve.py convolver: ĉ·FFT(z), inverse, depth-first
    in one buffer of 2L·VL floats), and Qf[t, m0+l]·Re z_t + Qf[t, m0+VL+l]·Im z_t summed into the
    unit's accumulator. No (G, L) sequence or spectrum buffer exists and no transpose runs;
    NUM (D+1, N) is the only state a head keeps. `knobs`: block_kb, the FFT convolver's block size."""
    D1 = D + 1
    VL = cpu.lanes(dtype)          # one vector register of features (16 f32 with AVX-512)
    MP = (M + 2 * VL - 1) // (2 * VL)
    feature = _feature(M, VL, dtype)
    zero = T.cast(0, dtype)
    one = T.cast(1, dtype)
    _, _, _, _, weights, _ = _position_macros(dtype, causal, bias_builder(position, dtype), True)
    floored = bool(eps)
    floor = _floor(dtype, causal, bias_builder(position, dtype), eps) if floored else None
    setup, spectrum, convolve, _, _ = fft_convolve.convolver(dtype, VL, _block_bytes(knobs))

    @T.prim_func
    def kernel(q: T.handle, k: T.handle, v: T.handle, tab: T.handle, o: T.handle, dn: T.handle,
               Lf: T.int64):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        BH = T.int64()
        N = T.int64()
        H = T.int64()
        P = T.int64()
        Q = T.match_buffer(q, (BH, N, M), dtype)
        K = T.match_buffer(k, (BH, N, M), dtype)
        Vv = T.match_buffer(v, (BH, N, D), dtype)
        TAB = T.match_buffer(tab, (H, P), dtype)
        O = T.match_buffer(o, (BH, N, D), dtype)
        DEN = T.match_buffer(dn, (BH, N), dtype)
        W = (P - 1) // 2
        CC = T.alloc_buffer((H, Lf), dtype)
        CH = T.alloc_buffer((H, Lf, 2), dtype)
        TW = T.alloc_buffer((Lf, 2), dtype)
        TWi = T.alloc_buffer((Lf, 2), dtype)
        ZS = T.alloc_buffer((2 * Lf, VL), dtype)
        NT = T.alloc_buffer((D1, N), dtype)
        FL = T.alloc_buffer((H,), dtype)             # the floor per head (with eps)
        weights(CC, TAB, H, N, Lf, W)
        if floored:
            floor(FL, TAB, H, N, Lf, W)
        setup(TW, TWi, Lf)
        spectrum(CC, CH, ZS, H, TW, Lf)
        for bh in range(BH):
            h = bh % H
            for d in T.parallel(D1):
                Z = T.alloc_buffer((2 * Lf, VL), dtype)
                A = T.alloc_buffer((N, VL), dtype)
                for t in range(N):
                    for l in T.vectorized(VL):
                        A[t, l] = zero
                for mp in range(MP):
                    for t in range(N):
                        vd: T.let = T.Select(d < D, Vv[bh, t, T.min(d, D - 1)], one)
                        for l in T.vectorized(VL):
                            Z[2 * t, l] = feature(K, bh, t, 2 * mp * VL + l) * vd
                            Z[2 * t + 1, l] = feature(K, bh, t, (2 * mp + 1) * VL + l) * vd
                    for t in range(Lf // 2 - N):        # the rows the pruned first stage reads
                        for l in T.vectorized(VL):
                            Z[2 * (N + t), l] = zero
                            Z[2 * (N + t) + 1, l] = zero
                    convolve(Z, CH, h, TW, TWi, Lf)
                    for t in range(N):
                        for l in T.vectorized(VL):
                            A[t, l] += (feature(Q, bh, t, 2 * mp * VL + l) * Z[2 * t, l]
                                        + feature(Q, bh, t, (2 * mp + 1) * VL + l) * Z[2 * t + 1, l])
                for t in range(N):
                    NT[d, t] = zero
                    for l in range(VL):
                        NT[d, t] += A[t, l]
            if floored:
                for i in T.parallel(N):
                    NT[D, i] = NT[D, i] + FL[h]
            for i in T.parallel(N):
                DEN[bh, i] = NT[D, i]
                for d in range(D):
                    O[bh, i, d] = NT[d, i] / NT[D, i]

    return kernel


D_CHUNKS = 4     # value channels of the fused backward split in this many chunks: MP·D_CHUNKS units


def scores_backward(name: str, M: int, D: int, dtype: str, causal: bool, position, learn: bool,
                    knobs=None):
    """Exact gradient of scores_forward: (Qf, Kf, V, TAB, O, DEN, dO, dQf out, dKf out, dV out,
    dTAB out (H, P), n_fft). With g_i = [dO_i/DEN_i, −(dO_i·O_i)/DEN_i] (D+1 channels):
        dQf_im = Σ_d g_id Σ_j c(i−j) Kf_jm v_aug_jd              (convolution)
        dKf_jm = Σ_d v_aug_jd R_md[j],  dV_jd = Σ_m Kf_jm R_md[j],  R_md[j] = Σ_i c(i−j) Qf_im g_id
        dc(r)  = Σ_md Σ_i Qf_im g_id Kf_{i−r,m} v_aug_{i−r,d}     (cross-correlation, by FFT)
    Fused like the forward: a work unit per (feature pair block mp, chunk of value channels),
    MP·D_CHUNKS in parallel; for each channel d of its chunk, two work buffers,
    z1 = (Kf[:, m0+l] + i·Kf[:, m0+VL+l])·v_aug[:, d] and z2 = (Qf[:, m0+l] + i·Qf[:, m0+VL+l])·g[:, d],
    go through the convolver's paired run (z1 convolved, z2 correlated, their cross-spectrum summed
    per lane in the transform's order), then g_d·z1 and v_d·z2 are summed into the unit's dQf and
    dKf (partials per chunk, added after) and Kf·z2 into dV (partials per mp). dTAB is written
    only when `learn`: the summed cross-spectra of each head go back through the inverse
    transform once, at the end. `knobs`: as the forward's."""
    D1 = D + 1
    VL = cpu.lanes(dtype)
    MP = (M + 2 * VL - 1) // (2 * VL)
    NC = min(D_CHUNKS, D1)
    DCH = (D1 + NC - 1) // NC
    UNITS = MP * NC
    feature = _feature(M, VL, dtype)
    zero = T.cast(0, dtype)
    one = T.cast(1, dtype)
    _, _, _, _, weights, scatter_grad = _position_macros(dtype, causal, bias_builder(position, dtype), True)
    setup, spectrum, _, correlation, run_of = fft_convolve.convolver(dtype, VL, _block_bytes(knobs))
    run = run_of(True, learn)

    @T.prim_func
    def kernel(q: T.handle, k: T.handle, v: T.handle, tab: T.handle, o: T.handle, dn: T.handle,
               do: T.handle, dq: T.handle, dk: T.handle, dv: T.handle, dtab: T.handle, Lf: T.int64):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        BH = T.int64()
        N = T.int64()
        H = T.int64()
        P = T.int64()
        Q = T.match_buffer(q, (BH, N, M), dtype)
        K = T.match_buffer(k, (BH, N, M), dtype)
        Vv = T.match_buffer(v, (BH, N, D), dtype)
        TAB = T.match_buffer(tab, (H, P), dtype)
        O = T.match_buffer(o, (BH, N, D), dtype)
        DEN = T.match_buffer(dn, (BH, N), dtype)
        dO = T.match_buffer(do, (BH, N, D), dtype)
        dQ = T.match_buffer(dq, (BH, N, M), dtype)
        dK = T.match_buffer(dk, (BH, N, M), dtype)
        dV = T.match_buffer(dv, (BH, N, D), dtype)
        dTAB = T.match_buffer(dtab, (H, P), dtype)
        W = (P - 1) // 2
        CC = T.alloc_buffer((H, Lf), dtype)
        CH = T.alloc_buffer((H, Lf, 2), dtype)
        TW = T.alloc_buffer((Lf, 2), dtype)
        TWi = T.alloc_buffer((Lf, 2), dtype)
        ZS = T.alloc_buffer((2 * Lf, VL), dtype)
        GT = T.alloc_buffer((D1, N), dtype)
        DQP = T.alloc_buffer((NC, N, M), dtype)
        DKP = T.alloc_buffer((NC, N, M), dtype)
        DVP = T.alloc_buffer((MP, N, D1), dtype)
        DC = T.alloc_buffer((H, Lf, 2), dtype)
        DCS = T.alloc_buffer((UNITS, Lf, 2), dtype)
        DCC = T.alloc_buffer((H, Lf), dtype)
        weights(CC, TAB, H, N, Lf, W)
        setup(TW, TWi, Lf)
        spectrum(CC, CH, ZS, H, TW, Lf)
        if learn:
            for h in T.parallel(H):
                for w in range(Lf):
                    DC[h, w, 0] = zero
                    DC[h, w, 1] = zero
        for bh in range(BH):
            h = bh % H
            for i in T.parallel(N):
                inv: T.let = one / DEN[bh, i]
                GT[D, i] = zero
                for d in range(D):
                    GT[d, i] = dO[bh, i, d] * inv
                    GT[D, i] -= dO[bh, i, d] * O[bh, i, d] * inv
            for u in T.parallel(UNITS):
                ZZ = T.alloc_buffer((4 * Lf, VL), dtype)      # z1, then z2 (rows 2L..)
                DCV = T.alloc_buffer((2 * Lf, VL), dtype)
                AQ = T.alloc_buffer((N, 2 * VL), dtype)
                AK = T.alloc_buffer((N, 2 * VL), dtype)
                SV = T.alloc_buffer((VL,), dtype)
                for t in range(N):
                    for l in T.vectorized(2 * VL):
                        AQ[t, l] = zero
                        AK[t, l] = zero
                if learn:
                    for r in range(2 * Lf):
                        for l in T.vectorized(VL):
                            DCV[r, l] = zero
                for dd in range(DCH):
                    if u % NC * DCH + dd < D1:
                        for t in range(N):
                            vd: T.let = T.Select(u % NC * DCH + dd < D, Vv[bh, t, T.min(u % NC * DCH + dd, D - 1)], one)
                            gd: T.let = GT[u % NC * DCH + dd, t]
                            for l in T.vectorized(VL):
                                ZZ[2 * t, l] = feature(K, bh, t, 2 * (u // NC) * VL + l) * vd
                                ZZ[2 * t + 1, l] = feature(K, bh, t, (2 * (u // NC) + 1) * VL + l) * vd
                                ZZ[2 * Lf + 2 * t, l] = feature(Q, bh, t, 2 * (u // NC) * VL + l) * gd
                                ZZ[2 * Lf + 2 * t + 1, l] = feature(Q, bh, t, (2 * (u // NC) + 1) * VL + l) * gd
                        for t in range(Lf // 2 - N):        # the rows the pruned first stage reads
                            for l in T.vectorized(VL):
                                ZZ[2 * (N + t), l] = zero
                                ZZ[2 * (N + t) + 1, l] = zero
                                ZZ[2 * Lf + 2 * (N + t), l] = zero
                                ZZ[2 * Lf + 2 * (N + t) + 1, l] = zero
                        run(ZZ, CH, h, DCV, TW, TWi, Lf)
                        for t in range(N):
                            vd: T.let = T.Select(u % NC * DCH + dd < D, Vv[bh, t, T.min(u % NC * DCH + dd, D - 1)], one)
                            gd: T.let = GT[u % NC * DCH + dd, t]
                            for l in T.vectorized(VL):
                                AQ[t, l] += gd * ZZ[2 * t, l]
                                AQ[t, VL + l] += gd * ZZ[2 * t + 1, l]
                                AK[t, l] += vd * ZZ[2 * Lf + 2 * t, l]
                                AK[t, VL + l] += vd * ZZ[2 * Lf + 2 * t + 1, l]
                                SV[l] = (feature(K, bh, t, 2 * (u // NC) * VL + l) * ZZ[2 * Lf + 2 * t, l]
                                         + feature(K, bh, t, (2 * (u // NC) + 1) * VL + l) * ZZ[2 * Lf + 2 * t + 1, l])
                            DVP[u // NC, t, u % NC * DCH + dd] = zero
                            for l in range(VL):
                                DVP[u // NC, t, u % NC * DCH + dd] += SV[l]
                for t in range(N):
                    for l in range(2 * VL):
                        if 2 * (u // NC) * VL + l < M:
                            DQP[u % NC, t, T.min(2 * (u // NC) * VL + l, M - 1)] = AQ[t, l]
                            DKP[u % NC, t, T.min(2 * (u // NC) * VL + l, M - 1)] = AK[t, l]
                if learn:
                    for w in range(Lf):
                        DCS[u, w, 0] = zero
                        DCS[u, w, 1] = zero
                        for l in range(VL):
                            DCS[u, w, 0] += DCV[2 * w, l]
                            DCS[u, w, 1] += DCV[2 * w + 1, l]
            for i in T.parallel(N):
                for m in range(M):
                    dQ[bh, i, m] = zero
                    dK[bh, i, m] = zero
                    for c in range(NC):
                        dQ[bh, i, m] += DQP[c, i, m]
                        dK[bh, i, m] += DKP[c, i, m]
                for d in range(D):
                    dV[bh, i, d] = zero
                    for b in range(MP):
                        dV[bh, i, d] += DVP[b, i, d]
            if learn:
                for w in T.parallel(Lf):
                    for uu in range(UNITS):
                        DC[h, w, 0] += DCS[uu, w, 0]
                        DC[h, w, 1] += DCS[uu, w, 1]
        if learn:
            correlation(DC, DCC, ZS, H, TWi, Lf)
            scatter_grad(DCC, CC, dTAB, H, P, N, Lf, W)

    return kernel


def values_forward(name: str, D: int, dtype: str, causal: bool, position):
    """FastRPB: (V, TAB, Y out, n_fft). Y_i = Σ_j b(i−j) V_j over j ≤ i when causal."""
    build_spectrum, _, spectral, _, _, _ = _position_macros(dtype, causal, bias_builder(position, dtype), False)

    @T.prim_func
    def kernel(v: T.handle, tab: T.handle, y: T.handle, Lf: T.int64):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        BH = T.int64()
        N = T.int64()
        H = T.int64()
        P = T.int64()
        Vv = T.match_buffer(v, (BH, N, D), dtype)
        TAB = T.match_buffer(tab, (H, P), dtype)
        Y = T.match_buffer(y, (BH, N, D), dtype)
        W = (P - 1) // 2
        CC = T.alloc_buffer((H, Lf), dtype)
        CH = T.alloc_buffer((H, Lf // 2 + 1, 2), dtype)
        U = T.alloc_buffer((D, Lf), dtype)
        X = T.alloc_buffer((D, Lf // 2 + 1, 2), dtype)
        build_spectrum(CC, CH, TAB, H, N, Lf, W)
        for bh in range(BH):
            h = bh % H
            for d in T.parallel(D):
                for i in range(N):
                    U[d, i] = Vv[bh, i, d]
            T.evaluate(T.call_packed("attndsl.fft.rfft", U, X, N))
            spectral(X, CH, h, Lf // 2 + 1, False)
            T.evaluate(T.call_packed("attndsl.fft.irfft", X, U))
            for i in T.parallel(N):
                for d in range(D):
                    Y[bh, i, d] = U[d, i]

    return kernel


def values_backward(name: str, D: int, dtype: str, causal: bool, position, learn: bool):
    """Gradient of values_forward: (V, TAB, dY, dV out, dTAB out, n_fft).
    dV_j = Σ_i b(i−j) dY_i (correlation); db(r) = Σ_i dY_i·V_{i−r} (cross-correlation)."""
    zero = T.cast(0, dtype)
    build_spectrum, table_grad, spectral, cross_spectrum, _, _ = _position_macros(
        dtype, causal, bias_builder(position, dtype), False)

    @T.prim_func
    def kernel(v: T.handle, tab: T.handle, dy: T.handle, dv: T.handle, dtab: T.handle, Lf: T.int64):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        BH = T.int64()
        N = T.int64()
        H = T.int64()
        P = T.int64()
        Vv = T.match_buffer(v, (BH, N, D), dtype)
        TAB = T.match_buffer(tab, (H, P), dtype)
        dY = T.match_buffer(dy, (BH, N, D), dtype)
        dV = T.match_buffer(dv, (BH, N, D), dtype)
        dTAB = T.match_buffer(dtab, (H, P), dtype)
        W = (P - 1) // 2
        CC = T.alloc_buffer((H, Lf), dtype)
        CH = T.alloc_buffer((H, Lf // 2 + 1, 2), dtype)
        DC = T.alloc_buffer((H, Lf // 2 + 1, 2), dtype)
        DCC = T.alloc_buffer((H, Lf), dtype)
        U = T.alloc_buffer((D, Lf), dtype)
        XA = T.alloc_buffer((D, Lf // 2 + 1, 2), dtype)
        XB = T.alloc_buffer((D, Lf // 2 + 1, 2), dtype)
        build_spectrum(CC, CH, TAB, H, N, Lf, W)
        if learn:
            for h in T.parallel(H):
                for w in range(Lf // 2 + 1):
                    DC[h, w, 0] = zero
                    DC[h, w, 1] = zero
        for bh in range(BH):
            h = bh % H
            for d in T.parallel(D):
                for i in range(N):
                    U[d, i] = dY[bh, i, d]
            T.evaluate(T.call_packed("attndsl.fft.rfft", U, XA, N))
            if learn:
                for d in T.parallel(D):
                    for i in range(N):
                        U[d, i] = Vv[bh, i, d]
                T.evaluate(T.call_packed("attndsl.fft.rfft", U, XB, N))
                cross_spectrum(DC, XA, XB, h, Lf // 2 + 1, D)
            spectral(XA, CH, h, Lf // 2 + 1, True)
            T.evaluate(T.call_packed("attndsl.fft.irfft", XA, U))
            for i in T.parallel(N):
                for d in range(D):
                    dV[bh, i, d] = U[d, i]
        if learn:
            table_grad(DC, DCC, CC, dTAB, H, P, N, Lf, W)

    return kernel

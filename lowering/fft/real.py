"""Batched real FFT and its inverse in TVMScript: the same contract as packed.py's packed functions.

    rfft:  X (G, L) real, Y (G, L/2+1, 2) out, n     Y[g] = rfft(X[g, :n] zero-padded to L)
    irfft: Y (G, L/2+1, 2), X (G, L) out             X[g] = irfft(Y[g], L)  (torch's 1/L)
L a power of two ≥ 16 (symbolic: one build serves every G and L; packed.py's lengths start at 16);
Y complex interleaved (re, im).

Every channel goes through the same transform, so the vector lanes run across channels: a block
of VL channels is transposed (in registers, VL×VL tiles) to a work buffer Z (L, VL) whose rows
2k, 2k+1 hold re, im of z_k = x_2k + i·x_2k+1, k < N = L/2 — the transposed block *is* that
complex sequence, no reordering needed. Then
    Z = FFT_N(z)                       Stockham radix-8 DIF stages (then one radix-4 or radix-2
                                       stage for log2 N mod 3 = 2, 1), ping-ponging between two
                                       halves of one buffer, each butterfly VL-lane vector ops,
                                       twiddles W_N^k from a table
    X_k = E_k + W_L^k·O_k,  X_{N−k} = conj(E_k − W_L^k·O_k)   (real-input split, k ≤ N/2)
      E_k = (Z_k + conj Z_{N−k})/2,  O_k = −i(Z_k − conj Z_{N−k})/2
and the result is transposed back to Y. The inverse runs the same steps backwards: Hermitian
pairs to Z_k = (E_k + i·O_k)/L with E_k = X_k + conj X_{N−k}, O_k = (X_k − conj X_{N−k})·W_L^−k,
an inverse FFT_N (conjugate twiddles), and x_2k, x_2k+1 = re, im z_k. As torch does, the inverse
ignores the imaginary parts of Y[:, 0] and Y[:, N].

Blocks of channels run in parallel (T.parallel), each with its own 2·(L+2)·VL scratch. Twiddle
tables are computed per call in float64 (vmath.cos, vectorized) and rounded to the dtype.
Every pass streams the block's scratch once: at L ≥ 32768 (4 MB a block) that is L3 traffic,
and the rate halves. (An in-place DIF variant that ran the late stages group by group in L2 and
read the digit-reversed result through an index table was no faster here: not kept.)

The transforms are macros (rfft_macro, irfft_macro) so a kernel may inline them; `rfft`/`irfft`
wrap them as kernels and `library` compiles the pair that packed.py serves the Toeplitz kernels with.
"""
from __future__ import annotations

import math

from tvm import tirx
from tvm.script import tirx as T

from ..tir import vmath
from ..tir.tiles import shuffle_idx


def lanes(dtype: str) -> int:
    """Channels per block: one 256-bit register. (16-lane f32 blocks ran no faster on a znver3
    (AVX2) VM and, in one fwd+bwd run of a Toeplitz form at N = 4096 on znver4 (AVX-512), 6%
    slower overall; convolve.py, with no transposes, takes the host's full width instead.
    _macros handles VL = 4, 8, 16.)"""
    return 8 if dtype == "float32" else 4


def _macros(dtype: str, VL: int, inverse: bool):
    """The building blocks, closed over dtype, the lane count VL and the direction."""
    zero = T.cast(0, dtype)
    f64 = "float64"

    def pm(a, b):
        """a + b forward, a − b inverse (the ∓i of the radix-4 butterfly)."""
        return a - b if inverse else a + b

    def mp(a, b):
        return a + b if inverse else a - b

    def sel(fwd, inv):
        return inv if inverse else fwd

    c8 = T.cast(math.sqrt(0.5), dtype)
    stages = [(b, shuffle_idx(VL, b, False), shuffle_idx(VL, b, True)) for b in (8, 4, 2, 1) if b < VL]

    @T.macro
    def shuffle(A, B, bit, lo, hi):
        for t in T.unroll(VL):
            if t & bit == 0:
                B[t, T.Ramp(0, 1, VL)] = T.Shuffle([A[t, T.Ramp(0, 1, VL)], A[t + bit, T.Ramp(0, 1, VL)]], lo)
            else:
                B[t, T.Ramp(0, 1, VL)] = T.Shuffle([A[t - bit, T.Ramp(0, 1, VL)], A[t, T.Ramp(0, 1, VL)]], hi)

    @T.macro
    def transpose(A, B):
        """A (VL, VL) register tile <- its transpose (B is scratch)."""
        if VL == 16:
            shuffle(A, B, stages[0][0], stages[0][1], stages[0][2])
            shuffle(B, A, stages[1][0], stages[1][1], stages[1][2])
            shuffle(A, B, stages[2][0], stages[2][1], stages[2][2])
            shuffle(B, A, stages[3][0], stages[3][1], stages[3][2])
        elif VL == 8:
            shuffle(A, B, stages[0][0], stages[0][1], stages[0][2])
            shuffle(B, A, stages[1][0], stages[1][1], stages[1][2])
            shuffle(A, B, stages[2][0], stages[2][1], stages[2][2])
            for t in T.unroll(VL):
                A[t, T.Ramp(0, 1, VL)] = B[t, T.Ramp(0, 1, VL)]
        else:
            shuffle(A, B, stages[0][0], stages[0][1], stages[0][2])
            shuffle(B, A, stages[1][0], stages[1][1], stages[1][2])

    def w(k, n, imag):
        """W_n^k (forward) or W_n^−k (inverse), real or imaginary part, computed in float64."""
        x = T.cast(k, f64) * (T.float64(2 * math.pi) / T.cast(n, f64))
        return T.cast(vmath.cos(x, (-1 if inverse else 1) if imag else 0), dtype)

    @T.macro
    def twiddles(TW, TR, L):
        """TW[k] = W_N^k, k < N = L/2;  TR[k] = W_L^k, k ≤ N/2 (re, im); conjugated when inverse."""
        for k0 in T.parallel(L // 8):
            for kl in T.vectorized(4):
                TW[k0 * 4 + kl, 0] = w(k0 * 4 + kl, L // 2, False)
                TW[k0 * 4 + kl, 1] = w(k0 * 4 + kl, L // 2, True)
        for k0 in T.parallel(L // 16):
            for kl in T.vectorized(4):
                TR[k0 * 4 + kl, 0] = w(k0 * 4 + kl, L, False)
                TR[k0 * 4 + kl, 1] = w(k0 * 4 + kl, L, True)
        TR[L // 4, 0] = w(L // 4, L, False)
        TR[L // 4, 1] = w(L // 4, L, True)

    @T.macro
    def radix4(W, so, do, TW, N, s):
        """One Stockham stage from rows so.. of W to rows do.., n = N/s, m = n/4, p < m, q < s
        (element x_j = W[so + 2j] + i·W[so + 2j + 1]):
        a, b, c, d = x[q + s(p + {0,1,2,3}m)]
        y[q + s(4p + {0,1,2,3})] = (a+c)+(b+d), W^p((a−c)∓i(b−d)), W^2p((a+c)−(b+d)), W^3p((a−c)±i(b−d))."""
        for p in range(N // (4 * s)):
            w1r: T.let = TW[p * s, 0]
            w1i: T.let = TW[p * s, 1]
            w2r: T.let = TW[2 * p * s, 0]
            w2i: T.let = TW[2 * p * s, 1]
            w3r: T.let = TW[3 * p * s, 0]
            w3i: T.let = TW[3 * p * s, 1]
            for q in range(s):
                for l in T.vectorized(VL):
                    ia: T.let = so + 2 * (q + s * p)
                    ib: T.let = ia + N // 2
                    ic: T.let = ia + N
                    id: T.let = ia + 3 * (N // 2)
                    apcr: T.let = W[ia, l] + W[ic, l]
                    apci: T.let = W[ia + 1, l] + W[ic + 1, l]
                    amcr: T.let = W[ia, l] - W[ic, l]
                    amci: T.let = W[ia + 1, l] - W[ic + 1, l]
                    bpdr: T.let = W[ib, l] + W[id, l]
                    bpdi: T.let = W[ib + 1, l] + W[id + 1, l]
                    bmdr: T.let = W[ib, l] - W[id, l]
                    bmdi: T.let = W[ib + 1, l] - W[id + 1, l]
                    # forward: t1 = (a−c) − i(b−d), t3 = (a−c) + i(b−d); inverse: the other way
                    t1r: T.let = pm(amcr, bmdi)
                    t1i: T.let = mp(amci, bmdr)
                    t3r: T.let = mp(amcr, bmdi)
                    t3i: T.let = pm(amci, bmdr)
                    t2r: T.let = apcr - bpdr
                    t2i: T.let = apci - bpdi
                    o: T.let = do + 2 * (q + 4 * s * p)
                    W[o, l] = apcr + bpdr
                    W[o + 1, l] = apci + bpdi
                    W[o + 2 * s, l] = t1r * w1r - t1i * w1i
                    W[o + 2 * s + 1, l] = t1r * w1i + t1i * w1r
                    W[o + 4 * s, l] = t2r * w2r - t2i * w2i
                    W[o + 4 * s + 1, l] = t2r * w2i + t2i * w2r
                    W[o + 6 * s, l] = t3r * w3r - t3i * w3i
                    W[o + 6 * s + 1, l] = t3r * w3i + t3i * w3r

    @T.macro
    def radix8(W, so, do, TW, N, s):
        """One Stockham radix-8 stage, n = N/s, m = n/8, p < m, q < s: x_r = x[q + s(p + rm)],
        y[q + s(8p + k)] = W_n^pk Σ_r x_r W_8^rk, the 8-point DFT as a span-4 butterfly
        (b_r = (x_r − x_r+4)·W_8^r) followed by two 4-point DFTs (even and odd k)."""
        for p in range(N // (8 * s)):
            w1r: T.let = TW[p * s, 0]
            w1i: T.let = TW[p * s, 1]
            w2r: T.let = TW[2 * p * s, 0]
            w2i: T.let = TW[2 * p * s, 1]
            w3r: T.let = TW[3 * p * s, 0]
            w3i: T.let = TW[3 * p * s, 1]
            w4r: T.let = TW[4 * p * s, 0]
            w4i: T.let = TW[4 * p * s, 1]
            w5r: T.let = TW[5 * p * s, 0]
            w5i: T.let = TW[5 * p * s, 1]
            w6r: T.let = TW[6 * p * s, 0]
            w6i: T.let = TW[6 * p * s, 1]
            w7r: T.let = TW[7 * p * s, 0]
            w7i: T.let = TW[7 * p * s, 1]
            for q in range(s):
                for l in T.vectorized(VL):
                    i0: T.let = so + 2 * (q + s * p)
                    a0r: T.let = W[i0, l] + W[i0 + N, l]
                    a0i: T.let = W[i0 + 1, l] + W[i0 + N + 1, l]
                    b0r: T.let = W[i0, l] - W[i0 + N, l]
                    b0i: T.let = W[i0 + 1, l] - W[i0 + N + 1, l]
                    a1r: T.let = W[i0 + N // 4, l] + W[i0 + N // 4 + N, l]
                    a1i: T.let = W[i0 + N // 4 + 1, l] + W[i0 + N // 4 + N + 1, l]
                    d1r: T.let = W[i0 + N // 4, l] - W[i0 + N // 4 + N, l]
                    d1i: T.let = W[i0 + N // 4 + 1, l] - W[i0 + N // 4 + N + 1, l]
                    a2r: T.let = W[i0 + N // 2, l] + W[i0 + N // 2 + N, l]
                    a2i: T.let = W[i0 + N // 2 + 1, l] + W[i0 + N // 2 + N + 1, l]
                    d2r: T.let = W[i0 + N // 2, l] - W[i0 + N // 2 + N, l]
                    d2i: T.let = W[i0 + N // 2 + 1, l] - W[i0 + N // 2 + N + 1, l]
                    a3r: T.let = W[i0 + 3 * (N // 4), l] + W[i0 + 3 * (N // 4) + N, l]
                    a3i: T.let = W[i0 + 3 * (N // 4) + 1, l] + W[i0 + 3 * (N // 4) + N + 1, l]
                    d3r: T.let = W[i0 + 3 * (N // 4), l] - W[i0 + 3 * (N // 4) + N, l]
                    d3i: T.let = W[i0 + 3 * (N // 4) + 1, l] - W[i0 + 3 * (N // 4) + N + 1, l]
                    # b_r = d_r·W_8^r: W_8 = (1 ∓ i)/√2, W_8^2 = ∓i, W_8^3 = (−1 ∓ i)/√2
                    b1r: T.let = pm(d1r, d1i) * c8
                    b1i: T.let = mp(d1i, d1r) * c8
                    b2r: T.let = sel(d2i, -d2i)
                    b2i: T.let = sel(-d2r, d2r)
                    b3r: T.let = sel(d3i - d3r, -(d3r + d3i)) * c8
                    b3i: T.let = sel(-(d3r + d3i), d3r - d3i) * c8
                    # 4-point DFTs: A_j (outputs k = 2j), B_j (k = 2j + 1)
                    e0r: T.let = a0r + a2r
                    e0i: T.let = a0i + a2i
                    e1r: T.let = a0r - a2r
                    e1i: T.let = a0i - a2i
                    f0r: T.let = a1r + a3r
                    f0i: T.let = a1i + a3i
                    f1r: T.let = a1r - a3r
                    f1i: T.let = a1i - a3i
                    g0r: T.let = b0r + b2r
                    g0i: T.let = b0i + b2i
                    g1r: T.let = b0r - b2r
                    g1i: T.let = b0i - b2i
                    h0r: T.let = b1r + b3r
                    h0i: T.let = b1i + b3i
                    h1r: T.let = b1r - b3r
                    h1i: T.let = b1i - b3i
                    y2r: T.let = pm(e1r, f1i)
                    y2i: T.let = mp(e1i, f1r)
                    y4r: T.let = e0r - f0r
                    y4i: T.let = e0i - f0i
                    y6r: T.let = mp(e1r, f1i)
                    y6i: T.let = pm(e1i, f1r)
                    y1r: T.let = g0r + h0r
                    y1i: T.let = g0i + h0i
                    y3r: T.let = pm(g1r, h1i)
                    y3i: T.let = mp(g1i, h1r)
                    y5r: T.let = g0r - h0r
                    y5i: T.let = g0i - h0i
                    y7r: T.let = mp(g1r, h1i)
                    y7i: T.let = pm(g1i, h1r)
                    o: T.let = do + 2 * (q + 8 * s * p)
                    W[o, l] = e0r + f0r
                    W[o + 1, l] = e0i + f0i
                    W[o + 2 * s, l] = y1r * w1r - y1i * w1i
                    W[o + 2 * s + 1, l] = y1r * w1i + y1i * w1r
                    W[o + 4 * s, l] = y2r * w2r - y2i * w2i
                    W[o + 4 * s + 1, l] = y2r * w2i + y2i * w2r
                    W[o + 6 * s, l] = y3r * w3r - y3i * w3i
                    W[o + 6 * s + 1, l] = y3r * w3i + y3i * w3r
                    W[o + 8 * s, l] = y4r * w4r - y4i * w4i
                    W[o + 8 * s + 1, l] = y4r * w4i + y4i * w4r
                    W[o + 10 * s, l] = y5r * w5r - y5i * w5i
                    W[o + 10 * s + 1, l] = y5r * w5i + y5i * w5r
                    W[o + 12 * s, l] = y6r * w6r - y6i * w6i
                    W[o + 12 * s + 1, l] = y6r * w6i + y6i * w6r
                    W[o + 14 * s, l] = y7r * w7r - y7i * w7i
                    W[o + 14 * s + 1, l] = y7r * w7i + y7i * w7r

    @T.macro
    def radix2(W, so, do, N):
        """The last stage when log2 N is odd: s = N/2, y[q] = x[q] + x[q+s], y[q+s] = x[q] − x[q+s]
        (rows: re and im of x[q] are rows 2q, 2q+1, those of x[q+s] N rows further)."""
        for q in range(N):
            for l in T.vectorized(VL):
                W[do + q, l] = W[so + q, l] + W[so + q + N, l]
                W[do + q + N, l] = W[so + q, l] - W[so + q + N, l]

    @T.macro
    def fft(W, h, TW, N, lg):
        """FFT_N of half h of W (rows h·R.., R = 2N + 2), stages ping-ponging between the halves:
        ⌊lg/3⌋ radix-8 stages, then one radix-4 or radix-2 stage for lg mod 3 = 2 or 1 (lg =
        log2 N); the result lands in half (h + stages) mod 2, stages = ⌈lg/3⌉."""
        for st in range(lg // 3):
            radix8(W, (h + st) % 2 * (2 * N + 2), (h + st + 1) % 2 * (2 * N + 2), TW, N,
                   T.shift_left(T.int64(1), 3 * st))
        if lg % 3 == 2:
            radix4(W, (h + lg // 3) % 2 * (2 * N + 2), (h + lg // 3 + 1) % 2 * (2 * N + 2), TW, N,
                   T.shift_left(T.int64(1), 3 * (lg // 3)))
        if lg % 3 == 1:
            radix2(W, (h + lg // 3) % 2 * (2 * N + 2), (h + lg // 3 + 1) % 2 * (2 * N + 2), N)

    return zero, transpose, twiddles, radix4, radix2, fft


def _log2(L):
    """log2 of the power of two L, as an int64 PrimExpr (exact: L is a power of two)."""
    return T.cast(T.round(T.log2(T.cast(L, "float64"))), "int64")


def _stages(L):
    """Butterfly stages of FFT_{L/2}: ⌈log2(L/2) / 3⌉ (radix-8, then one radix-4 or radix-2)."""
    return (_log2(L // 2) + 2) // 3


def _half(h, L):
    """First row of half h mod 2 of the work buffer (two halves of L + 2 rows)."""
    return h % 2 * (L + 2)


def rfft_macro(dtype: str, VL: int | None = None):
    """T.macro transform(X, Y, n): Y = rfft(X[:, :n], L) (see the module docstring)."""
    VL = VL or lanes(dtype)
    zero, transpose, twiddles, _, _, fft = _macros(dtype, VL, False)
    half = T.cast(0.5, dtype)

    @T.macro
    def load(Z, X, g0, G, L, n, R, S):
        """Z[t, l] = X[g0 + l, t] (0 for t ≥ n or g0 + l ≥ G): register transposes on full tiles."""
        for t0 in range(L // VL):
            if g0 + VL <= G and t0 * VL + VL <= n:
                for l in T.unroll(VL):
                    R[l, T.Ramp(0, 1, VL)] = X[g0 + l, T.Ramp(t0 * VL, 1, VL)]
                transpose(R, S)
                for t in T.unroll(VL):
                    Z[t0 * VL + t, T.Ramp(0, 1, VL)] = R[t, T.Ramp(0, 1, VL)]
            elif t0 * VL >= n:
                for t in range(VL):
                    for l in T.vectorized(VL):
                        Z[t0 * VL + t, l] = zero
            else:
                for t in range(VL):
                    for l in range(VL):
                        Z[t0 * VL + t, l] = T.Select(tirx.And(g0 + l < G, t0 * VL + t < n),
                                                     X[T.min(g0 + l, G - 1), T.min(t0 * VL + t, L - 1)], zero)

    @T.macro
    def split(W, zo, oo, TR, N):
        """Rows oo + 2k, oo + 2k + 1 (k ≤ N) <- X_k from Z = FFT_N(z) at rows zo.. (the real-input
        post-processing)."""
        for l in T.vectorized(VL):
            W[oo + 0, l] = W[zo + 0, l] + W[zo + 1, l]
            W[oo + 1, l] = zero
            W[oo + 2 * N, l] = W[zo + 0, l] - W[zo + 1, l]
            W[oo + 2 * N + 1, l] = zero
        for k in range(1, N // 2 + 1):
            wr: T.let = TR[k, 0]
            wi: T.let = TR[k, 1]
            for l in T.vectorized(VL):
                zr: T.let = W[zo + 2 * k, l]
                zi: T.let = W[zo + 2 * k + 1, l]
                cr: T.let = W[zo + 2 * (N - k), l]
                ci: T.let = -W[zo + 2 * (N - k) + 1, l]
                er: T.let = (zr + cr) * half
                ei: T.let = (zi + ci) * half
                orr: T.let = (zi - ci) * half        # O = −i(Z − conj Z')/2
                oi: T.let = (cr - zr) * half
                pr: T.let = wr * orr - wi * oi
                pi: T.let = wr * oi + wi * orr
                W[oo + 2 * k, l] = er + pr
                W[oo + 2 * k + 1, l] = ei + pi
                W[oo + 2 * (N - k), l] = er - pr
                W[oo + 2 * (N - k) + 1, l] = pi - ei

    @T.macro
    def store(Yf, W, oo, g0, G, L, R, S):
        """Yf[g0 + l, t] = W[oo + t, l] for t < L + 2, g0 + l < G."""
        for t0 in range(L // VL):
            if g0 + VL <= G:
                for t in T.unroll(VL):
                    R[t, T.Ramp(0, 1, VL)] = W[oo + t0 * VL + t, T.Ramp(0, 1, VL)]
                transpose(R, S)
                for l in T.unroll(VL):
                    Yf[g0 + l, T.Ramp(t0 * VL, 1, VL)] = R[l, T.Ramp(0, 1, VL)]
            else:
                for l in range(VL):
                    if g0 + l < G:
                        for t in range(VL):
                            Yf[g0 + l, t0 * VL + t] = W[oo + t0 * VL + t, l]
        for l in range(VL):
            if g0 + l < G:
                Yf[g0 + l, L] = W[oo + L, l]
                Yf[g0 + l, L + 1] = W[oo + L + 1, l]

    @T.macro
    def transform(X, Y, n):
        """Y = rfft(X[:, :n], L): X (G, L), Y (G, L/2+1, 2) buffers of the calling kernel."""
        Yf = T.decl_buffer((X.shape[0], X.shape[1] + 2), dtype, data=Y.data)
        TW = T.alloc_buffer((X.shape[1] // 2, 2), dtype)
        TR = T.alloc_buffer((X.shape[1] // 4 + 1, 2), dtype)
        twiddles(TW, TR, X.shape[1])
        for b in T.parallel((X.shape[0] + VL - 1) // VL):
            W = T.alloc_buffer((2 * X.shape[1] + 4, VL), dtype)     # two halves of L + 2 rows
            R = T.alloc_buffer((VL, VL), dtype, scope="local")
            S = T.alloc_buffer((VL, VL), dtype, scope="local")
            load(W, X, b * VL, X.shape[0], X.shape[1], T.min(n, X.shape[1]), R, S)
            fft(W, 0, TW, X.shape[1] // 2, _log2(X.shape[1] // 2))
            split(W, _half(_stages(X.shape[1]), X.shape[1]), _half(_stages(X.shape[1]) + 1, X.shape[1]),
                  TR, X.shape[1] // 2)
            store(Yf, W, _half(_stages(X.shape[1]) + 1, X.shape[1]), b * VL, X.shape[0], X.shape[1], R, S)

    return transform


def irfft_macro(dtype: str, VL: int | None = None):
    """T.macro transform(Y, X): X = irfft(Y, L) (see the module docstring)."""
    VL = VL or lanes(dtype)
    zero, transpose, twiddles, _, _, fft = _macros(dtype, VL, True)

    @T.macro
    def load(Z, Yf, g0, G, L, R, S):
        """Z[t, l] = Yf[g0 + l, t], t < L + 2 (rows of absent channels 0)."""
        for t0 in range(L // VL):
            if g0 + VL <= G:
                for l in T.unroll(VL):
                    R[l, T.Ramp(0, 1, VL)] = Yf[g0 + l, T.Ramp(t0 * VL, 1, VL)]
                transpose(R, S)
                for t in T.unroll(VL):
                    Z[t0 * VL + t, T.Ramp(0, 1, VL)] = R[t, T.Ramp(0, 1, VL)]
            else:
                for t in range(VL):
                    for l in range(VL):
                        Z[t0 * VL + t, l] = T.Select(g0 + l < G, Yf[T.min(g0 + l, G - 1), t0 * VL + t], zero)
        for l in range(VL):
            Z[L, l] = T.Select(g0 + l < G, Yf[T.min(g0 + l, G - 1), L], zero)
            Z[L + 1, l] = zero

    @T.macro
    def unsplit(W, oo, zo, TR, N, L):
        """Rows zo + 2k, zo + 2k + 1 (k < N) <- (E_k + i·O_k)/L from the Hermitian half X_k at rows
        oo + 2k, oo + 2k + 1 (k ≤ N)."""
        inv: T.let = T.cast(1, dtype) / T.cast(L, dtype)
        for l in T.vectorized(VL):
            W[zo + 0, l] = (W[oo + 0, l] + W[oo + 2 * N, l]) * inv
            W[zo + 1, l] = (W[oo + 0, l] - W[oo + 2 * N, l]) * inv
        for k in range(1, N // 2 + 1):
            wr: T.let = TR[k, 0]                 # W_L^−k
            wi: T.let = TR[k, 1]
            for l in T.vectorized(VL):
                xr: T.let = W[oo + 2 * k, l]
                xi: T.let = W[oo + 2 * k + 1, l]
                cr: T.let = W[oo + 2 * (N - k), l]
                ci: T.let = -W[oo + 2 * (N - k) + 1, l]
                er: T.let = xr + cr
                ei: T.let = xi + ci
                dr: T.let = xr - cr
                di: T.let = xi - ci
                orr: T.let = dr * wr - di * wi
                oi: T.let = dr * wi + di * wr
                W[zo + 2 * k, l] = (er - oi) * inv             # E + iO
                W[zo + 2 * k + 1, l] = (ei + orr) * inv
                W[zo + 2 * (N - k), l] = (er + oi) * inv       # conj E + i conj O
                W[zo + 2 * (N - k) + 1, l] = (orr - ei) * inv

    @T.macro
    def store(X, W, zo, g0, G, L, R, S):
        """X[g0 + l, t] = W[zo + t, l], t < L."""
        for t0 in range(L // VL):
            if g0 + VL <= G:
                for t in T.unroll(VL):
                    R[t, T.Ramp(0, 1, VL)] = W[zo + t0 * VL + t, T.Ramp(0, 1, VL)]
                transpose(R, S)
                for l in T.unroll(VL):
                    X[g0 + l, T.Ramp(t0 * VL, 1, VL)] = R[l, T.Ramp(0, 1, VL)]
            else:
                for l in range(VL):
                    if g0 + l < G:
                        for t in range(VL):
                            X[g0 + l, t0 * VL + t] = W[zo + t0 * VL + t, l]

    @T.macro
    def transform(Y, X):
        """X = irfft(Y, L): Y (G, L/2+1, 2), X (G, L) buffers of the calling kernel."""
        Yf = T.decl_buffer((X.shape[0], X.shape[1] + 2), dtype, data=Y.data)
        TW = T.alloc_buffer((X.shape[1] // 2, 2), dtype)
        TR = T.alloc_buffer((X.shape[1] // 4 + 1, 2), dtype)
        twiddles(TW, TR, X.shape[1])
        for b in T.parallel((X.shape[0] + VL - 1) // VL):
            W = T.alloc_buffer((2 * X.shape[1] + 4, VL), dtype)     # two halves of L + 2 rows
            R = T.alloc_buffer((VL, VL), dtype, scope="local")
            S = T.alloc_buffer((VL, VL), dtype, scope="local")
            load(W, Yf, b * VL, X.shape[0], X.shape[1], R, S)
            unsplit(W, 0, X.shape[1] + 2, TR, X.shape[1] // 2, X.shape[1])
            fft(W, 1, TW, X.shape[1] // 2, _log2(X.shape[1] // 2))
            store(X, W, _half(_stages(X.shape[1]) + 1, X.shape[1]), b * VL, X.shape[0], X.shape[1], R, S)

    return transform


def library_rfft_macro(dtype: str):
    """The same transform through packed.py's packed function (torch.fft / pocketfft)."""
    @T.macro
    def transform(X, Y, n):
        T.evaluate(T.call_packed("attndsl.fft.rfft", X, Y, n))
    return transform


def library_irfft_macro(dtype: str):
    @T.macro
    def transform(Y, X):
        T.evaluate(T.call_packed("attndsl.fft.irfft", Y, X))
    return transform


# implementation -> (rfft macro builder, irfft macro builder), each dtype -> T.macro
IMPLEMENTATIONS = {
    "tir": (rfft_macro, irfft_macro),
    "library": (library_rfft_macro, library_irfft_macro),
}


def rfft(name: str, dtype: str, impl: str = "tir"):
    """A kernel (X (G, L), Y (G, L/2+1, 2) out, n): Y = rfft(X[:, :n], L)."""
    transform = IMPLEMENTATIONS[impl][0](dtype)

    @T.prim_func
    def kernel(x: T.handle, y: T.handle, n: T.int64):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        G = T.int64()
        L = T.int64()
        X = T.match_buffer(x, (G, L), dtype)
        Y = T.match_buffer(y, (G, L // 2 + 1, 2), dtype)
        transform(X, Y, n)

    return kernel


def irfft(name: str, dtype: str, impl: str = "tir"):
    """A kernel (Y (G, L/2+1, 2), X (G, L) out): X = irfft(Y, L)."""
    transform = IMPLEMENTATIONS[impl][1](dtype)

    @T.prim_func
    def kernel(y: T.handle, x: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        G = T.int64()
        L = T.int64()
        Y = T.match_buffer(y, (G, L // 2 + 1, 2), dtype)
        X = T.match_buffer(x, (G, L), dtype)
        transform(Y, X)

    return kernel


def library(dtype: str):
    """The compiled pair {"rfft", "irfft"} for one dtype (what packed.py serves the kernels with)."""
    from ..build import build, resolve_target
    from ..tir import script
    script.install()
    return build({"rfft": rfft("rfft", dtype), "irfft": irfft("irfft", dtype)}, resolve_target("llvm"))

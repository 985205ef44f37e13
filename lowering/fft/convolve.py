"""Toeplitz products by FFT in one work buffer, in place and depth-first: the fused Toeplitz-FFT
scores kernels' transform (toeplitz.scores_forward, scores_backward).

Z (2L, VL): rows 2t, 2t+1 hold re, im of z_t, t < L, VL independent complex sequences (one per
vector lane). Two real sequences ride in one complex one, z = u + i·u', so a circular
convolution with a real c needs no real-input split:  c ⊛ z = (c ⊛ u) + i·(c ⊛ u')  and
    c ⊛ z = FFT⁻¹(ĉ · FFT(z)),
where the order of the spectrum does not matter as long as ĉ is in the same order. So the
forward transform is an in-place decimation-in-frequency FFT (radix-8 stages of span L/8, L/64, ..,
then one radix-4 or radix-2 stage of span 1 for log2 L mod 3 = 2, 1) whose output stays in
digit-reversed order; ĉ is made by the same transform (`spectrum`), and the inverse runs the
adjoint stages in reverse order (conjugate twiddles before each conjugate butterfly), which
undoes the reordering. 1/L is folded into ĉ.

Depth-first: after the first stage the eight blocks of L/8 points are independent, so each block
runs its remaining forward stages, the product with ĉ and its inverse stages while it sits in
L2 (L/8 · VL · 8 bytes in float32: 256 KB at L = 16384, VL = 16), and only the first stage and
its adjoint stream the whole buffer. Where a block exceeds `block_bytes` (BLOCK_BYTES: from
L = 65536 in float32 with VL = 16) there is a second level: a block's second stage, then its
eight sub-blocks of L/64 points one after another. Pruned for zero-padded inputs: z_t = 0 for
t ≥ L/2 (the first stage skips those loads), and only t < L/2 of the result is kept (the last
adjoint stage computes no more).
"""
from __future__ import annotations

import math

from tvm import tirx
from tvm.script import tirx as T

from ..tir import vmath


BLOCK_BYTES = 512 * 1024   # half a 1 MiB L2. Measured (one thread, znver4): the second level ran
                           # 12% faster at N = 32768, the same at 16384, up to 8% slower at 4096


def _log2(L):
    """log2 of the power of two L, as an int64 PrimExpr."""
    return T.cast(T.round(T.log2(T.cast(L, "float64"))), "int64")


def _stages(dtype: str, VL: int, inverse: bool):
    """(stage8, stage4, stage2, twiddles) for one direction; stage8 is a factory over the pruning
    flags. Rows of point t: 2(cb + t), 2(cb + t) + 1 for a block starting at point cb."""
    c8 = T.cast(math.sqrt(0.5), dtype)

    def pm(a, b):
        """a + b forward, a − b inverse (the ∓i of the butterflies)."""
        return a - b if inverse else a + b

    def mp(a, b):
        return a + b if inverse else a - b

    def sel(fwd, inv):
        return inv if inverse else fwd

    def ld(Z, row, l, w, part):
        """Point at `row`, re (part 0) or im: times w = (wr, wi) before an inverse butterfly."""
        if not inverse or w is None:
            return Z[row + part, l]
        zr, zi = Z[row, l], Z[row + 1, l]
        return zr * w[0] - zi * w[1] if part == 0 else zr * w[1] + zi * w[0]

    def out(y, w, part):
        """Butterfly output y = (yr, yi) to store: times w after a forward butterfly."""
        if inverse or w is None:
            return y[part]
        return y[0] * w[0] - y[1] * w[1] if part == 0 else y[0] * w[1] + y[1] * w[0]

    @T.macro
    def twiddles(TW, L):
        """TW[k] = W_L^k (forward) or W_L^−k (inverse), k < L, computed in float64."""
        for k0 in T.parallel(L // 4):
            for kl in T.vectorized(4):
                TW[k0 * 4 + kl, 0] = T.cast(vmath.cos(T.cast(k0 * 4 + kl, "float64") * (T.float64(2 * math.pi) / T.cast(L, "float64")), 0), dtype)
                TW[k0 * 4 + kl, 1] = T.cast(vmath.cos(T.cast(k0 * 4 + kl, "float64") * (T.float64(2 * math.pi) / T.cast(L, "float64")), -1 if inverse else 1), dtype)

    def stage8_of(zero_in: bool, low_out: bool):
        """One radix-8 stage of span s over `groups` groups of 8s points from point cb:
        x_r = z[g·8s + j + r·s], y_k = Σ_r x_r W_8^{±rk}; forward: z[.. + k·s] = y_k W_8s^{jk};
        inverse (the adjoint): x_k times W_8s^{−jk} first. W_8s^{jk} = TW[j·k·stride],
        stride = L/(8s) (passed, not divided: a division hoisted out of a skipped branch
        faulted at L < 64). zero_in: x_r = 0 for r ≥ 4; low_out: only y_r, r < 4, stored."""
        def up(a, b):
            return a if zero_in else a + b

        def un(a, b):
            return a if zero_in else a - b

        @T.macro
        def stage8(Z, cb, s, groups, TW, stride):
            for g in range(groups):
                for j in range(s):
                    e: T.let = j * stride                          # W_8s^jk = W_L^(jk·stride)
                    w1r: T.let = TW[e, 0]
                    w1i: T.let = TW[e, 1]
                    w2r: T.let = TW[2 * e, 0]
                    w2i: T.let = TW[2 * e, 1]
                    w3r: T.let = TW[3 * e, 0]
                    w3i: T.let = TW[3 * e, 1]
                    w4r: T.let = TW[4 * e, 0]
                    w4i: T.let = TW[4 * e, 1]
                    w5r: T.let = TW[5 * e, 0]
                    w5i: T.let = TW[5 * e, 1]
                    w6r: T.let = TW[6 * e, 0]
                    w6i: T.let = TW[6 * e, 1]
                    w7r: T.let = TW[7 * e, 0]
                    w7i: T.let = TW[7 * e, 1]
                    for l in T.vectorized(VL):
                        i0: T.let = 2 * (cb + g * 8 * s + j)
                        a0r: T.let = up(ld(Z, i0, l, None, 0), ld(Z, i0 + 8 * s, l, (w4r, w4i), 0))
                        a0i: T.let = up(ld(Z, i0, l, None, 1), ld(Z, i0 + 8 * s, l, (w4r, w4i), 1))
                        b0r: T.let = un(ld(Z, i0, l, None, 0), ld(Z, i0 + 8 * s, l, (w4r, w4i), 0))
                        b0i: T.let = un(ld(Z, i0, l, None, 1), ld(Z, i0 + 8 * s, l, (w4r, w4i), 1))
                        a1r: T.let = up(ld(Z, i0 + 2 * s, l, (w1r, w1i), 0), ld(Z, i0 + 10 * s, l, (w5r, w5i), 0))
                        a1i: T.let = up(ld(Z, i0 + 2 * s, l, (w1r, w1i), 1), ld(Z, i0 + 10 * s, l, (w5r, w5i), 1))
                        d1r: T.let = un(ld(Z, i0 + 2 * s, l, (w1r, w1i), 0), ld(Z, i0 + 10 * s, l, (w5r, w5i), 0))
                        d1i: T.let = un(ld(Z, i0 + 2 * s, l, (w1r, w1i), 1), ld(Z, i0 + 10 * s, l, (w5r, w5i), 1))
                        a2r: T.let = up(ld(Z, i0 + 4 * s, l, (w2r, w2i), 0), ld(Z, i0 + 12 * s, l, (w6r, w6i), 0))
                        a2i: T.let = up(ld(Z, i0 + 4 * s, l, (w2r, w2i), 1), ld(Z, i0 + 12 * s, l, (w6r, w6i), 1))
                        d2r: T.let = un(ld(Z, i0 + 4 * s, l, (w2r, w2i), 0), ld(Z, i0 + 12 * s, l, (w6r, w6i), 0))
                        d2i: T.let = un(ld(Z, i0 + 4 * s, l, (w2r, w2i), 1), ld(Z, i0 + 12 * s, l, (w6r, w6i), 1))
                        a3r: T.let = up(ld(Z, i0 + 6 * s, l, (w3r, w3i), 0), ld(Z, i0 + 14 * s, l, (w7r, w7i), 0))
                        a3i: T.let = up(ld(Z, i0 + 6 * s, l, (w3r, w3i), 1), ld(Z, i0 + 14 * s, l, (w7r, w7i), 1))
                        d3r: T.let = un(ld(Z, i0 + 6 * s, l, (w3r, w3i), 0), ld(Z, i0 + 14 * s, l, (w7r, w7i), 0))
                        d3i: T.let = un(ld(Z, i0 + 6 * s, l, (w3r, w3i), 1), ld(Z, i0 + 14 * s, l, (w7r, w7i), 1))
                        # b_r = d_r·W_8^r: W_8 = (1 ∓ i)/√2, W_8^2 = ∓i, W_8^3 = (−1 ∓ i)/√2
                        b1r: T.let = pm(d1r, d1i) * c8
                        b1i: T.let = mp(d1i, d1r) * c8
                        b2r: T.let = sel(d2i, -d2i)
                        b2i: T.let = sel(-d2r, d2r)
                        b3r: T.let = sel(d3i - d3r, -(d3r + d3i)) * c8
                        b3i: T.let = sel(-(d3r + d3i), d3r - d3i) * c8
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
                        y1r: T.let = g0r + h0r
                        y1i: T.let = g0i + h0i
                        y2r: T.let = pm(e1r, f1i)
                        y2i: T.let = mp(e1i, f1r)
                        y3r: T.let = pm(g1r, h1i)
                        y3i: T.let = mp(g1i, h1r)
                        Z[i0, l] = e0r + f0r
                        Z[i0 + 1, l] = e0i + f0i
                        Z[i0 + 2 * s, l] = out((y1r, y1i), (w1r, w1i), 0)
                        Z[i0 + 2 * s + 1, l] = out((y1r, y1i), (w1r, w1i), 1)
                        Z[i0 + 4 * s, l] = out((y2r, y2i), (w2r, w2i), 0)
                        Z[i0 + 4 * s + 1, l] = out((y2r, y2i), (w2r, w2i), 1)
                        Z[i0 + 6 * s, l] = out((y3r, y3i), (w3r, w3i), 0)
                        Z[i0 + 6 * s + 1, l] = out((y3r, y3i), (w3r, w3i), 1)
                        if not low_out:
                            Z[i0 + 8 * s, l] = out((e0r - f0r, e0i - f0i), (w4r, w4i), 0)
                            Z[i0 + 8 * s + 1, l] = out((e0r - f0r, e0i - f0i), (w4r, w4i), 1)
                            Z[i0 + 10 * s, l] = out((g0r - h0r, g0i - h0i), (w5r, w5i), 0)
                            Z[i0 + 10 * s + 1, l] = out((g0r - h0r, g0i - h0i), (w5r, w5i), 1)
                            Z[i0 + 12 * s, l] = out((mp(e1r, f1i), pm(e1i, f1r)), (w6r, w6i), 0)
                            Z[i0 + 12 * s + 1, l] = out((mp(e1r, f1i), pm(e1i, f1r)), (w6r, w6i), 1)
                            Z[i0 + 14 * s, l] = out((mp(g1r, h1i), pm(g1i, h1r)), (w7r, w7i), 0)
                            Z[i0 + 14 * s + 1, l] = out((mp(g1r, h1i), pm(g1i, h1r)), (w7r, w7i), 1)

        return stage8

    @T.macro
    def stage4(Z, cb, groups):
        """Radix-4, span 1 (unit twiddles): y = (a+c)+(b+d), (a−c)∓i(b−d), (a+c)−(b+d), (a−c)±i(b−d)."""
        for g in range(groups):
            for l in T.vectorized(VL):
                i0: T.let = 2 * (cb + 4 * g)
                apcr: T.let = Z[i0, l] + Z[i0 + 4, l]
                apci: T.let = Z[i0 + 1, l] + Z[i0 + 5, l]
                amcr: T.let = Z[i0, l] - Z[i0 + 4, l]
                amci: T.let = Z[i0 + 1, l] - Z[i0 + 5, l]
                bpdr: T.let = Z[i0 + 2, l] + Z[i0 + 6, l]
                bpdi: T.let = Z[i0 + 3, l] + Z[i0 + 7, l]
                bmdr: T.let = Z[i0 + 2, l] - Z[i0 + 6, l]
                bmdi: T.let = Z[i0 + 3, l] - Z[i0 + 7, l]
                Z[i0, l] = apcr + bpdr
                Z[i0 + 1, l] = apci + bpdi
                Z[i0 + 2, l] = pm(amcr, bmdi)
                Z[i0 + 3, l] = mp(amci, bmdr)
                Z[i0 + 4, l] = apcr - bpdr
                Z[i0 + 5, l] = apci - bpdi
                Z[i0 + 6, l] = mp(amcr, bmdi)
                Z[i0 + 7, l] = pm(amci, bmdr)

    @T.macro
    def stage2(Z, cb, groups):
        """Radix-2, span 1: y = a + b, a − b."""
        for g in range(groups):
            for l in T.vectorized(VL):
                i0: T.let = 2 * (cb + 2 * g)
                ar: T.let = Z[i0, l]
                ai: T.let = Z[i0 + 1, l]
                br: T.let = Z[i0 + 2, l]
                bi: T.let = Z[i0 + 3, l]
                Z[i0, l] = ar + br
                Z[i0 + 1, l] = ai + bi
                Z[i0 + 2, l] = ar - br
                Z[i0 + 3, l] = ai - bi

    return stage8_of, stage4, stage2, twiddles


def convolver(dtype: str, VL: int, block_bytes: int = BLOCK_BYTES):
    """Macros (setup, spectrum, convolve, correlation) and run_of over Z (2L, VL) work buffers
    (module docstring):

        setup(TW, TWi, L)             twiddle tables W_L^{±k}, k < L, (L, 2) each
        spectrum(CC, CH, Zs, H, TW, L)
                                      CH[h] (L, 2) = FFT(CC[h]) / L in the transform's
                                      (digit-reversed) order, CC (H, L) real; Zs (2L, VL) scratch
        convolve(Z, CH, h, TW, TWi, L)
                                      rows of points t < L/2 of Z: z -> (c_h ⊛ z)[t], z zero past
                                      L/2 (those rows are not read), c_h the circular sequence of
                                      CH[h]; the rest of Z is scratch (scores_forward)
        run_of(pair, learn)           the same for one or two buffers, the second correlated,
                                      and their cross-spectrum summed (scores_backward)
        correlation(DC, DCC, Zs, H, TWi, L)
                                      DCC (H, L) real, natural order, from such summed spectra"""
    f8, f4, f2, tw_f = _stages(dtype, VL, False)
    i8, i4, i2, tw_i = _stages(dtype, VL, True)
    fwd8, fwd8_zero_in = f8(False, False), f8(True, False)
    inv8, inv8_low_out = i8(False, False), i8(False, True)
    zero = T.cast(0, dtype)
    point = 2 * VL * (4 if dtype == "float32" else 8)      # bytes of one point of Z

    @T.macro
    def setup(TW, TWi, L):
        tw_f(TW, L)
        tw_i(TWi, L)

    @T.macro
    def forward_from(Z, cb, first, TW, L):
        """Forward stages first.. on the L/8^first points from cb (span L/8^(st+1) each)."""
        for st in range(first, _log2(L) // 3):
            fwd8(Z, cb, T.shift_right(L, 3 * st + 3), T.shift_left(T.int64(1), 3 * (st - first)), TW,
                 T.shift_left(T.int64(1), 3 * st))
        if _log2(L) % 3 == 2:
            f4(Z, cb, T.shift_right(L, 3 * first) // 4)
        if _log2(L) % 3 == 1:
            f2(Z, cb, T.shift_right(L, 3 * first) // 2)

    @T.macro
    def inverse_from(Z, cb, first, TWi, L):
        """The adjoint of forward_from, stages in reverse order."""
        if _log2(L) % 3 == 2:
            i4(Z, cb, T.shift_right(L, 3 * first) // 4)
        if _log2(L) % 3 == 1:
            i2(Z, cb, T.shift_right(L, 3 * first) // 2)
        for r in range(_log2(L) // 3 - first):
            inv8(Z, cb, T.shift_right(L, 3 * (_log2(L) // 3 - r)),
                 T.shift_left(T.int64(1), 3 * (_log2(L) // 3 - 1 - r - first)), TWi,
                 T.shift_left(T.int64(1), 3 * (_log2(L) // 3 - 1 - r)))

    def run_of(pair: bool, learn: bool):
        """T.macro run(ZZ, CH, h, DCV, TW, TWi, L), ZZ (2L·W, VL) holding W = 1 or 2 (`pair`) work
        buffers one after the other (z1 from point 0, z2 from point L): z1 <- c_h ⊛ z1 and, with
        `pair`, z2 <- c_h ⋆ z2 (the correlation Σ_i c(i − j) z2_i: conj ĉ), both transforms
        interleaved block by block; with `learn`, DCV (2L, VL) += FFT(z2)·conj(FFT(z1)) per
        lane, in the transform's order (`correlation` takes it back). Each stage is instantiated
        once: a pair's buffers are point offsets w·L in a loop, and one or two levels of blocks
        are a runtime choice."""
        ways = 2 if pair else 1

        @T.macro
        def middle(ZZ, CH, h, DCV, cb, first, TW, TWi, L):
            """On the L/8^first points from cb, whose outer stages are done: the remaining forward
            stages, the products with ĉ_h (in the same digit-reversed order), the inverse stages."""
            for w in range(ways):
                forward_from(ZZ, w * L + cb, first, TW, L)
            for t in range(T.shift_right(L, 3 * first)):
                cr: T.let = CH[h, cb + t, 0]
                ci: T.let = CH[h, cb + t, 1]
                for l in T.vectorized(VL):
                    zr: T.let = ZZ[2 * (cb + t), l]
                    zi: T.let = ZZ[2 * (cb + t) + 1, l]
                    ZZ[2 * (cb + t), l] = zr * cr - zi * ci
                    ZZ[2 * (cb + t) + 1, l] = zr * ci + zi * cr
                    if pair:
                        ar: T.let = ZZ[2 * (L + cb + t), l]
                        ai: T.let = ZZ[2 * (L + cb + t) + 1, l]
                        if learn:
                            DCV[2 * (cb + t), l] += ar * zr + ai * zi
                            DCV[2 * (cb + t) + 1, l] += ai * zr - ar * zi
                        ZZ[2 * (L + cb + t), l] = ar * cr + ai * ci
                        ZZ[2 * (L + cb + t) + 1, l] = ai * cr - ar * ci
            for w in range(ways):
                inverse_from(ZZ, w * L + cb, first, TWi, L)

        @T.macro
        def run(ZZ, CH, h, DCV, TW, TWi, L):
            # levels of blocks: 2 (blocks of L/8, then of L/64 points) or 1
            lv: T.let = T.Select(tirx.And(L >= 64, L // 8 * point > block_bytes), 2, 1)
            for w in range(ways):
                fwd8_zero_in(ZZ, w * L, L // 8, 1, TW, T.int64(1))
            for b in range(8):
                if lv == 2:
                    for w in range(ways):
                        fwd8(ZZ, w * L + b * (L // 8), L // 64, 1, TW, T.int64(8))
                for b2 in range(T.Select(lv == 2, 8, 1)):
                    middle(ZZ, CH, h, DCV, b * (L // 8) + b2 * (L // 64), lv, TW, TWi, L)
                if lv == 2:
                    for w in range(ways):
                        inv8(ZZ, w * L + b * (L // 8), L // 64, 1, TWi, T.int64(8))
            for w in range(ways):
                inv8_low_out(ZZ, w * L, L // 8, 1, TWi, T.int64(1))

        return run

    @T.macro
    def spectrum(CC, CH, Zs, H, TW, L):
        for hb in range((H + VL - 1) // VL):
            for t in range(L):
                for l in range(VL):
                    Zs[2 * t, l] = T.Select(hb * VL + l < H, CC[T.min(hb * VL + l, H - 1), t], zero)
                    Zs[2 * t + 1, l] = zero
            fwd8(Zs, 0, L // 8, 1, TW, T.int64(1))
            for b in range(8):
                forward_from(Zs, b * (L // 8), 1, TW, L)
            for l in range(VL):
                if hb * VL + l < H:
                    for t in range(L):
                        CH[hb * VL + l, t, 0] = Zs[2 * t, l] / T.cast(L, dtype)
                        CH[hb * VL + l, t, 1] = Zs[2 * t + 1, l] / T.cast(L, dtype)

    @T.macro
    def correlation(DC, DCC, Zs, H, TWi, L):
        """DCC[h, p] = Re(FFT⁻¹(DC[h]))[p], p < L (natural order), DC (H, L, 2) cross-spectra
        summed in the transform's order (run's DCV)."""
        for hb in range((H + VL - 1) // VL):
            for t in range(L):
                for l in range(VL):
                    Zs[2 * t, l] = T.Select(hb * VL + l < H, DC[T.min(hb * VL + l, H - 1), t, 0], zero)
                    Zs[2 * t + 1, l] = T.Select(hb * VL + l < H, DC[T.min(hb * VL + l, H - 1), t, 1], zero)
            for b in range(8):
                inverse_from(Zs, b * (L // 8), 1, TWi, L)
            inv8(Zs, 0, L // 8, 1, TWi, T.int64(1))
            for l in range(VL):
                if hb * VL + l < H:
                    for t in range(L):
                        DCC[hb * VL + l, t] = Zs[2 * t, l] / T.cast(L, dtype)

    run_single = run_of(False, False)

    @T.macro
    def convolve(Z, CH, h, TW, TWi, L):
        run_single(Z, CH, h, Z, TW, TWi, L)

    return setup, spectrum, convolve, correlation, run_of

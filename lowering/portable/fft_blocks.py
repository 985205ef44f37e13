"""The Toeplitz-FFT forms as portable kernels: one thread block per FFT sequence.

toeplitz.py's kernels are written for one CPU vector unit (fft/convolve.py's depth-first blocks
in the vector lanes). These are the same maths for thread parallelism, in the style of
softmax_rows.py: every stage is a loop nest `for task in blocks(...): for lane in threads(R)`,
bound to blockIdx.x / threadIdx.x for CUDA (a hand schedule, which dlight leaves alone), or a
parallel and a serial loop on llvm (how they are tested on a machine without a GPU). Inside a
task the R threads share one work row of L complex points in global memory and run a radix-2
transform over it, a barrier (`__syncthreads`) between stages; on a CPU the lane loop of a stage
finishes before the next starts, which is the same order. Separate stages of a kernel (twiddles,
spectra, the per-task transforms, the contractions) are separate launches.

Shapes and maths as toeplitz.py's (same signatures, so attndsl.ops calls either): Qf, Kf (BH, N,
M); V, O, dO (BH, N, D); DEN (BH, N); TAB (H, P); n_fft = L, a power of two ≥ 2N − 1.
Transforms: the forward is decimation in frequency, natural order in, bit-reversed out; ĉ/L (the
weights' spectrum with the inverse's 1/L) comes out of the same transform, so products are taken
in the bit-reversed order, and the inverse (decimation in time, conjugate twiddles) takes it back
to natural order. Two real sequences ride in one complex one (z = u + i·u'): c is real, so
Re and Im of the product are the two products. Stage s of log2 L, half-size h = L >> (s + 1):
    DIF:  (x_a, x_b) <- (x_a + x_b, (x_a − x_b)·w^(k << s))          w = e^(−2πi/L), a = 2h·g + k
    DIT:  (x_a, x_b) <- (x_a + x_b·conj w^(k << s), x_a − x_b·conj w^(k << s))   in reverse order.
"""
from __future__ import annotations

import functools
import math

from tvm import tirx
from tvm.script import tirx as T

from ..tir.position import bias_builder, rel

THREADS = 256        # threads per block (per FFT work row)


def _loops(gpu: bool):
    """(blocks, threads, sync): a stage's task loop, lane loop and the barrier between stages."""
    if gpu:
        @T.macro
        def sync():
            T.evaluate(T.tvm_storage_sync("shared"))
        return (functools.partial(T.thread_binding, thread="blockIdx.x"),
                functools.partial(T.thread_binding, thread="threadIdx.x"), sync)

    @T.macro
    def no_sync():
        T.evaluate(0)
    return T.parallel, T.serial, no_sync


def _ceil(n, r):
    return (n + r - 1) // r


def _log2(L):
    """log2 of the power of two L (int64)."""
    return T.Cast("int64", T.round(T.log2(T.Cast("float64", L))))


def _valid(causal: bool):
    """Whether slot p of the circular weights holds an r that the mask keeps."""
    def valid(p, N, L):
        if causal:
            return p < N
        return tirx.Or(p < N, p > L - N)
    return valid


def transforms(dtype: str, R: int, gpu: bool):
    """The macros shared by the four kernels (see the module docstring)."""
    blocks, threads, sync = _loops(gpu)
    zero = T.cast(0, dtype)

    @T.macro
    def twiddles(TW, Lf):
        """TW[t] = w^t = e^(−2πi t/L), t < L/2, computed in float64."""
        for task in blocks(_ceil(Lf // 2, R)):
            for lane in threads(R):
                t = task * R + lane
                if t < Lf // 2:
                    ang = T.Cast("float64", t) * T.float64(-2 * math.pi) / T.Cast("float64", Lf)
                    TW[t, 0] = T.Cast(dtype, T.cos(ang))
                    TW[t, 1] = T.Cast(dtype, T.sin(ang))

    @T.macro
    def dif(Z, row0, rows, TW, Lf):
        """Forward transform of Z[row0 .. row0 + rows) in place (inside a task)."""
        for s in range(_log2(Lf)):
            for lane in threads(R):
                for it in range(_ceil(rows * (Lf // 2), R)):
                    j = it * R + lane
                    if j < rows * (Lf // 2):
                        row = row0 + j // (Lf // 2)
                        jj = j % (Lf // 2)
                        k = jj & ((Lf >> (s + 1)) - 1)
                        a = ((jj >> (_log2(Lf) - 1 - s)) << (_log2(Lf) - s)) + k
                        b = a + (Lf >> (s + 1))
                        ar: T.let = Z[row, a, 0]
                        ai: T.let = Z[row, a, 1]
                        dr: T.let = ar - Z[row, b, 0]
                        di: T.let = ai - Z[row, b, 1]
                        wr: T.let = TW[k << s, 0]
                        wi: T.let = TW[k << s, 1]
                        Z[row, a, 0] = ar + Z[row, b, 0]
                        Z[row, a, 1] = ai + Z[row, b, 1]
                        Z[row, b, 0] = dr * wr - di * wi
                        Z[row, b, 1] = dr * wi + di * wr
            sync()

    @T.macro
    def dit(Z, row0, rows, TW, Lf):
        """Inverse (unnormalized) of dif, in place."""
        for s_ in range(_log2(Lf)):
            for lane in threads(R):
                for it in range(_ceil(rows * (Lf // 2), R)):
                    j = it * R + lane
                    if j < rows * (Lf // 2):
                        row = row0 + j // (Lf // 2)
                        jj = j % (Lf // 2)
                        s = _log2(Lf) - 1 - s_
                        k = jj & ((Lf >> (s + 1)) - 1)
                        a = ((jj >> (_log2(Lf) - 1 - s)) << (_log2(Lf) - s)) + k
                        b = a + (Lf >> (s + 1))
                        wr: T.let = TW[k << s, 0]
                        wi: T.let = TW[k << s, 1]
                        br: T.let = Z[row, b, 0] * wr + Z[row, b, 1] * wi
                        bi: T.let = Z[row, b, 1] * wr - Z[row, b, 0] * wi
                        ar: T.let = Z[row, a, 0]
                        ai: T.let = Z[row, a, 1]
                        Z[row, a, 0] = ar + br
                        Z[row, a, 1] = ai + bi
                        Z[row, b, 0] = ar - br
                        Z[row, b, 1] = ai - bi
            sync()

    @T.macro
    def product(Z, row, CH, h, Lf, conj):
        """Z[row] *= CH[h] (or conj CH[h]), pointwise (inside a task)."""
        for lane in threads(R):
            for it in range(_ceil(Lf, R)):
                p = it * R + lane
                if p < Lf:
                    zr: T.let = Z[row, p, 0]
                    zi: T.let = Z[row, p, 1]
                    cr: T.let = CH[h, p, 0]
                    ci: T.let = CH[h, p, 1]
                    if conj:
                        Z[row, p, 0] = zr * cr + zi * ci
                        Z[row, p, 1] = zi * cr - zr * ci
                    else:
                        Z[row, p, 0] = zr * cr - zi * ci
                        Z[row, p, 1] = zi * cr + zr * ci
        sync()

    @T.macro
    def cross(DCS, task, Z, ra, rb, Lf):
        """DCS[task] += Z[ra] · conj(Z[rb]), pointwise: the table gradient's spectrum."""
        for lane in threads(R):
            for it in range(_ceil(Lf, R)):
                p = it * R + lane
                if p < Lf:
                    DCS[task, p, 0] += Z[ra, p, 0] * Z[rb, p, 0] + Z[ra, p, 1] * Z[rb, p, 1]
                    DCS[task, p, 1] += Z[ra, p, 1] * Z[rb, p, 0] - Z[ra, p, 0] * Z[rb, p, 1]
        sync()

    @T.macro
    def clear(X, row, Lf):
        """X[row] = 0 (L complex points, inside a task)."""
        for lane in threads(R):
            for it in range(_ceil(Lf, R)):
                p = it * R + lane
                if p < Lf:
                    X[row, p, 0] = zero
                    X[row, p, 1] = zero
        sync()

    return twiddles, dif, dit, product, cross, clear


def position_macros(dtype: str, causal: bool, position, exp_c: bool, R: int, gpu: bool):
    """(spectrum, table_grad): the weights' spectrum CH (H, L, 2), bit-reversed, with 1/L; and the
    table's gradient from the summed cross-spectra. c = exp(b − max b) when `exp_c` (scores), b
    (values). MX (H, R) holds each head's max."""
    blocks, threads, sync = _loops(gpu)
    _, dif, dit, _, _, _ = transforms(dtype, R, gpu)
    bias = bias_builder(position, dtype)
    valid = _valid(causal)
    zero = T.cast(0, dtype)

    def nearest(N):
        """The smallest kept r: 0 when causal, else 1 − N."""
        return T.int64(0) if causal else 1 - N

    def weight(TAB, MX, h, r, W):
        if exp_c:
            return T.exp(bias(TAB, h, r, W) - MX[h, 0])
        return bias(TAB, h, r, W)

    @T.macro
    def head_max(MX, TAB, H, N, Lf, W):
        """MX[h, 0] = max_r b_h(r) over the kept r (a block per head)."""
        for h in blocks(H):
            for lane in threads(R):
                MX[h, lane] = T.min_value(dtype)
                for it in range(_ceil(Lf, R)):
                    p = it * R + lane
                    if p < Lf:
                        if valid(p, N, Lf):
                            MX[h, lane] = T.max(MX[h, lane], bias(TAB, h, rel(p, N, Lf), W))
            sync()
            for lane in threads(R):
                if lane == 0:
                    for t in range(R - 1):
                        MX[h, 0] = T.max(MX[h, 0], MX[h, t + 1])

    @T.macro
    def spectrum(CH, MX, TAB, TW, H, N, Lf, W):
        if exp_c:
            head_max(MX, TAB, H, N, Lf, W)
        for h in blocks(H):
            for lane in threads(R):
                for it in range(_ceil(Lf, R)):
                    p = it * R + lane
                    if p < Lf:
                        CH[h, p, 1] = zero
                        if valid(p, N, Lf):
                            CH[h, p, 0] = weight(TAB, MX, h, rel(p, N, Lf), W) / T.Cast(dtype, Lf)
                        else:
                            CH[h, p, 0] = zero
            sync()
            dif(CH, h, 1, TW, Lf)

    @T.macro
    def table_grad(DC, DCS, dTAB, TAB, MX, TW, BH, H, P, N, Lf, W, PER):
        """DC[h] = Σ over the tasks of head h (PER per batch·head) of DCS, inverted: dc(r); then
        dTAB[h, t] = Σ_{r: slot(r) = t} dc(r)·c(r) (scores) or dc(r) (values) over kept r."""
        for task in blocks(H * _ceil(Lf, R)):
            for lane in threads(R):
                h = task // _ceil(Lf, R)
                p = task % _ceil(Lf, R) * R + lane
                if p < Lf:
                    DC[h, p, 0] = zero
                    DC[h, p, 1] = zero
                    for bb in range(BH // H):
                        for u in range(PER):
                            DC[h, p, 0] += DCS[(bb * H + h) * PER + u, p, 0]
                            DC[h, p, 1] += DCS[(bb * H + h) * PER + u, p, 1]
        for h in blocks(H):
            dit(DC, h, 1, TW, Lf)
        for task in blocks(H * _ceil(P, R)):
            for lane in threads(R):
                h = task // _ceil(P, R)
                t = task % _ceil(P, R) * R + lane
                if t < P:
                    lo = T.Select(t > 0, t - W, T.int64(1 - 2 ** 62))
                    hi = T.Select(t < 2 * W, t - W, T.int64(2 ** 62))
                    first = T.max(lo, nearest(N))
                    last = T.min(hi, N - 1)
                    dTAB[h, t] = zero
                    for i in range(T.max(last - first + 1, T.int64(0))):
                        if exp_c:
                            dTAB[h, t] += (DC[h, (first + i + Lf) % Lf, 0] / T.Cast(dtype, Lf)
                                           * weight(TAB, MX, h, first + i, W))
                        else:
                            dTAB[h, t] += DC[h, (first + i + Lf) % Lf, 0] / T.Cast(dtype, Lf)

    return spectrum, table_grad


def _pair(X, b, n, m, M: int, dtype: str):
    """X[b, n, m], 0 for m ≥ M (the second half of an odd pair)."""
    if M % 2 == 0:
        return X[b, n, m]
    return tirx.Select(m < M, X[b, n, tirx.min(m, M - 1)], T.cast(0, dtype))


def scores_forward(name: str, M: int, D: int, dtype: str, causal: bool, position, gpu: bool,
                   rows: int = THREADS, eps: float | None = None):
    """Luo et al.: (Qf, Kf, V, TAB, O out, DEN out, n_fft), as toeplitz.scores_forward. A task per
    (batch·head, value channel d ≤ D) runs the ⌈M/2⌉ feature pairs through its work row,
    z = (Kf_m + i·Kf_m')·v_aug_d convolved with c, and sums Qf_m·Re z + Qf_m'·Im z into NUM.
    With `eps`, DEN_i gets + eps·exp(−max b) (c = exp(b − max b))."""
    R = rows
    D1 = D + 1
    MP = (M + 1) // 2
    blocks, threads, sync = _loops(gpu)
    twiddles, dif, dit, product, _, _ = transforms(dtype, R, gpu)
    spectrum, _ = position_macros(dtype, causal, position, True, R, gpu)
    zero = T.cast(0, dtype)
    one = T.cast(1, dtype)
    floored = bool(eps)

    @T.prim_func
    def kernel(q: T.handle, k: T.handle, v: T.handle, tab: T.handle, o: T.handle, dn: T.handle,
               Lf: T.int64):
        T.func_attr({"global_symbol": name, "tirx.noalias": True, "tirx.is_scheduled": gpu})
        BH, N, H, P = T.int64(), T.int64(), T.int64(), T.int64()
        Q = T.match_buffer(q, (BH, N, M), dtype)
        K = T.match_buffer(k, (BH, N, M), dtype)
        Vv = T.match_buffer(v, (BH, N, D), dtype)
        TAB = T.match_buffer(tab, (H, P), dtype)
        O = T.match_buffer(o, (BH, N, D), dtype)
        DEN = T.match_buffer(dn, (BH, N), dtype)
        W = (P - 1) // 2
        TW = T.alloc_buffer((Lf // 2, 2), dtype)
        MX = T.alloc_buffer((H, R), dtype)
        CH = T.alloc_buffer((H, Lf, 2), dtype)
        Z = T.alloc_buffer((BH * D1, Lf, 2), dtype)
        NT = T.alloc_buffer((BH * D1, N), dtype)
        twiddles(TW, Lf)
        spectrum(CH, MX, TAB, TW, H, N, Lf, W)
        for task in blocks(BH * D1):
            for lane in threads(R):
                for it in range(_ceil(N, R)):
                    if it * R + lane < N:
                        NT[task, it * R + lane] = zero
            for mp in range(MP):
                for lane in threads(R):
                    for it in range(_ceil(Lf, R)):
                        n = it * R + lane
                        if n < Lf:
                            if n < N:
                                vd: T.let = T.Select(task % D1 < D, Vv[task // D1, T.min(n, N - 1),
                                                                       T.min(task % D1, D - 1)], one)
                                Z[task, n, 0] = K[task // D1, T.min(n, N - 1), 2 * mp] * vd
                                Z[task, n, 1] = _pair(K, task // D1, T.min(n, N - 1), 2 * mp + 1, M, dtype) * vd
                            else:
                                Z[task, n, 0] = zero
                                Z[task, n, 1] = zero
                sync()
                dif(Z, task, 1, TW, Lf)
                product(Z, task, CH, task // D1 % H, Lf, False)
                dit(Z, task, 1, TW, Lf)
                for lane in threads(R):
                    for it in range(_ceil(N, R)):
                        n = it * R + lane
                        if n < N:
                            NT[task, n] += (Q[task // D1, n, 2 * mp] * Z[task, n, 0]
                                            + _pair(Q, task // D1, n, 2 * mp + 1, M, dtype) * Z[task, n, 1])
                sync()
        for task in blocks(_ceil(BH * N, R)):
            for lane in threads(R):
                b = (task * R + lane) // N
                i = (task * R + lane) % N
                if b < BH:
                    if floored:
                        NT[b * D1 + D, i] += T.exp(T.cast(math.log(eps), dtype) - MX[b % H, 0])
                    DEN[b, i] = NT[b * D1 + D, i]
                    for d in range(D):
                        O[b, i, d] = NT[b * D1 + d, i] / NT[b * D1 + D, i]

    return kernel


def scores_backward(name: str, M: int, D: int, dtype: str, causal: bool, position, learn: bool,
                    gpu: bool, rows: int = THREADS):
    """Exact gradient, as toeplitz.scores_backward: (Qf, Kf, V, TAB, O, DEN, dO, dQf, dKf, dV, dTAB,
    n_fft). g = [dO/DEN, −(dO·O)/DEN] (D+1 channels). A task per (batch·head, feature pair mp) runs,
    for each channel d, z1 = (Kf_m + i·Kf_m')·v_aug_d convolved and z2 = (Qf_m + i·Qf_m')·g_d
    correlated (conj ĉ) in its two work rows: dQf += g_d·z1, dKf += v_aug_d·z2 (the task's own
    columns), Kf·z2 a per-pair partial of dV; with `learn`, Σ_d Z2·conj(Z1) per task, summed per
    head and inverted, is dc(r)."""
    R = rows
    D1 = D + 1
    MP = (M + 1) // 2
    blocks, threads, sync = _loops(gpu)
    twiddles, dif, dit, product, cross, clear = transforms(dtype, R, gpu)
    spectrum, table_grad = position_macros(dtype, causal, position, True, R, gpu)
    zero = T.cast(0, dtype)
    one = T.cast(1, dtype)

    @T.prim_func
    def kernel(q: T.handle, k: T.handle, v: T.handle, tab: T.handle, o: T.handle, dn: T.handle,
               do: T.handle, dq: T.handle, dk: T.handle, dv: T.handle, dtab: T.handle, Lf: T.int64):
        T.func_attr({"global_symbol": name, "tirx.noalias": True, "tirx.is_scheduled": gpu})
        BH, N, H, P = T.int64(), T.int64(), T.int64(), T.int64()
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
        TW = T.alloc_buffer((Lf // 2, 2), dtype)
        MX = T.alloc_buffer((H, R), dtype)
        CH = T.alloc_buffer((H, Lf, 2), dtype)
        G = T.alloc_buffer((BH, N, D1), dtype)
        Z = T.alloc_buffer((BH * MP * 2, Lf, 2), dtype)
        DVP = T.alloc_buffer((BH * MP, N, D), dtype)
        DCS = T.alloc_buffer((BH * MP if learn else 1, Lf, 2), dtype)
        DC = T.alloc_buffer((H, Lf, 2), dtype)
        twiddles(TW, Lf)
        spectrum(CH, MX, TAB, TW, H, N, Lf, W)
        for task in blocks(_ceil(BH * N, R)):
            for lane in threads(R):
                b = (task * R + lane) // N
                i = (task * R + lane) % N
                if b < BH:
                    G[b, i, D] = zero
                    for d in range(D):
                        G[b, i, d] = dO[b, i, d] / DEN[b, i]
                        G[b, i, D] -= dO[b, i, d] * O[b, i, d] / DEN[b, i]
        for task in blocks(BH * MP):
            for lane in threads(R):
                for it in range(_ceil(N, R)):
                    n = it * R + lane
                    if n < N:
                        dQ[task // MP, n, 2 * (task % MP)] = zero
                        dK[task // MP, n, 2 * (task % MP)] = zero
                        if 2 * (task % MP) + 1 < M:
                            dQ[task // MP, n, T.min(2 * (task % MP) + 1, M - 1)] = zero
                            dK[task // MP, n, T.min(2 * (task % MP) + 1, M - 1)] = zero
            if learn:
                clear(DCS, task, Lf)
            for d in range(D1):
                for lane in threads(R):
                    for it in range(_ceil(Lf, R)):
                        n = it * R + lane
                        if n < Lf:
                            if n < N:
                                vd: T.let = T.Select(d < D, Vv[task // MP, T.min(n, N - 1), T.min(d, D - 1)], one)
                                gd: T.let = G[task // MP, T.min(n, N - 1), d]
                                Z[2 * task, n, 0] = K[task // MP, T.min(n, N - 1), 2 * (task % MP)] * vd
                                Z[2 * task, n, 1] = _pair(K, task // MP, T.min(n, N - 1),
                                                          2 * (task % MP) + 1, M, dtype) * vd
                                Z[2 * task + 1, n, 0] = Q[task // MP, T.min(n, N - 1), 2 * (task % MP)] * gd
                                Z[2 * task + 1, n, 1] = _pair(Q, task // MP, T.min(n, N - 1),
                                                              2 * (task % MP) + 1, M, dtype) * gd
                            else:
                                Z[2 * task, n, 0] = zero
                                Z[2 * task, n, 1] = zero
                                Z[2 * task + 1, n, 0] = zero
                                Z[2 * task + 1, n, 1] = zero
                sync()
                dif(Z, 2 * task, 2, TW, Lf)
                if learn:
                    cross(DCS, task, Z, 2 * task + 1, 2 * task, Lf)
                product(Z, 2 * task, CH, task // MP % H, Lf, False)
                product(Z, 2 * task + 1, CH, task // MP % H, Lf, True)
                dit(Z, 2 * task, 2, TW, Lf)
                for lane in threads(R):
                    for it in range(_ceil(N, R)):
                        n = it * R + lane
                        if n < N:
                            vd: T.let = T.Select(d < D, Vv[task // MP, n, T.min(d, D - 1)], one)
                            gd: T.let = G[task // MP, n, d]
                            dQ[task // MP, n, 2 * (task % MP)] += gd * Z[2 * task, n, 0]
                            dK[task // MP, n, 2 * (task % MP)] += vd * Z[2 * task + 1, n, 0]
                            if 2 * (task % MP) + 1 < M:
                                dQ[task // MP, n, T.min(2 * (task % MP) + 1, M - 1)] += gd * Z[2 * task, n, 1]
                                dK[task // MP, n, T.min(2 * (task % MP) + 1, M - 1)] += vd * Z[2 * task + 1, n, 1]
                            if d < D:
                                DVP[task, n, T.min(d, D - 1)] = (
                                    K[task // MP, n, 2 * (task % MP)] * Z[2 * task + 1, n, 0]
                                    + _pair(K, task // MP, n, 2 * (task % MP) + 1, M, dtype) * Z[2 * task + 1, n, 1])
                sync()
        for task in blocks(_ceil(BH * N, R)):
            for lane in threads(R):
                b = (task * R + lane) // N
                i = (task * R + lane) % N
                if b < BH:
                    for d in range(D):
                        dV[b, i, d] = zero
                        for mp in range(MP):
                            dV[b, i, d] += DVP[b * MP + mp, i, d]
        if learn:
            table_grad(DC, DCS, dTAB, TAB, MX, TW, BH, H, P, N, Lf, W, MP)

    return kernel


def values_forward(name: str, D: int, dtype: str, causal: bool, position, gpu: bool, rows: int = THREADS):
    """FastRPB: (V, TAB, Y out, n_fft), Y_i = Σ_j b(i−j) V_j; a task per (batch·head, channel pair)."""
    R = rows
    DP = (D + 1) // 2
    blocks, threads, sync = _loops(gpu)
    twiddles, dif, dit, product, _, _ = transforms(dtype, R, gpu)
    spectrum, _ = position_macros(dtype, causal, position, False, R, gpu)
    zero = T.cast(0, dtype)

    @T.prim_func
    def kernel(v: T.handle, tab: T.handle, y: T.handle, Lf: T.int64):
        T.func_attr({"global_symbol": name, "tirx.noalias": True, "tirx.is_scheduled": gpu})
        BH, N, H, P = T.int64(), T.int64(), T.int64(), T.int64()
        Vv = T.match_buffer(v, (BH, N, D), dtype)
        TAB = T.match_buffer(tab, (H, P), dtype)
        Y = T.match_buffer(y, (BH, N, D), dtype)
        W = (P - 1) // 2
        TW = T.alloc_buffer((Lf // 2, 2), dtype)
        MX = T.alloc_buffer((H, R), dtype)
        CH = T.alloc_buffer((H, Lf, 2), dtype)
        Z = T.alloc_buffer((BH * DP, Lf, 2), dtype)
        twiddles(TW, Lf)
        spectrum(CH, MX, TAB, TW, H, N, Lf, W)
        for task in blocks(BH * DP):
            for lane in threads(R):
                for it in range(_ceil(Lf, R)):
                    n = it * R + lane
                    if n < Lf:
                        if n < N:
                            Z[task, n, 0] = Vv[task // DP, T.min(n, N - 1), 2 * (task % DP)]
                            Z[task, n, 1] = _pair(Vv, task // DP, T.min(n, N - 1), 2 * (task % DP) + 1, D, dtype)
                        else:
                            Z[task, n, 0] = zero
                            Z[task, n, 1] = zero
            sync()
            dif(Z, task, 1, TW, Lf)
            product(Z, task, CH, task // DP % H, Lf, False)
            dit(Z, task, 1, TW, Lf)
            for lane in threads(R):
                for it in range(_ceil(N, R)):
                    n = it * R + lane
                    if n < N:
                        Y[task // DP, n, 2 * (task % DP)] = Z[task, n, 0]
                        if 2 * (task % DP) + 1 < D:
                            Y[task // DP, n, T.min(2 * (task % DP) + 1, D - 1)] = Z[task, n, 1]

    return kernel


def values_backward(name: str, D: int, dtype: str, causal: bool, position, learn: bool, gpu: bool,
                    rows: int = THREADS):
    """(V, TAB, dY, dV out, dTAB out, n_fft): dV_j = Σ_i b(i−j) dY_i (correlation), and with `learn`
    db(r) = Σ_i dY_i·V_{i−r} from Σ FFT(dY)·conj(FFT(V)) per head."""
    R = rows
    DP = (D + 1) // 2
    blocks, threads, sync = _loops(gpu)
    twiddles, dif, dit, product, cross, clear = transforms(dtype, R, gpu)
    spectrum, table_grad = position_macros(dtype, causal, position, False, R, gpu)
    zero = T.cast(0, dtype)

    @T.prim_func
    def kernel(v: T.handle, tab: T.handle, dy: T.handle, dv: T.handle, dtab: T.handle, Lf: T.int64):
        T.func_attr({"global_symbol": name, "tirx.noalias": True, "tirx.is_scheduled": gpu})
        BH, N, H, P = T.int64(), T.int64(), T.int64(), T.int64()
        Vv = T.match_buffer(v, (BH, N, D), dtype)
        TAB = T.match_buffer(tab, (H, P), dtype)
        dY = T.match_buffer(dy, (BH, N, D), dtype)
        dV = T.match_buffer(dv, (BH, N, D), dtype)
        dTAB = T.match_buffer(dtab, (H, P), dtype)
        W = (P - 1) // 2
        TW = T.alloc_buffer((Lf // 2, 2), dtype)
        MX = T.alloc_buffer((H, R), dtype)
        CH = T.alloc_buffer((H, Lf, 2), dtype)
        Z = T.alloc_buffer((BH * DP * 2, Lf, 2), dtype)
        DCS = T.alloc_buffer((BH * DP if learn else 1, Lf, 2), dtype)
        DC = T.alloc_buffer((H, Lf, 2), dtype)
        twiddles(TW, Lf)
        spectrum(CH, MX, TAB, TW, H, N, Lf, W)
        for task in blocks(BH * DP):
            for lane in threads(R):
                for it in range(_ceil(Lf, R)):
                    n = it * R + lane
                    if n < Lf:
                        if n < N:
                            Z[2 * task, n, 0] = dY[task // DP, T.min(n, N - 1), 2 * (task % DP)]
                            Z[2 * task, n, 1] = _pair(dY, task // DP, T.min(n, N - 1), 2 * (task % DP) + 1, D, dtype)
                            Z[2 * task + 1, n, 0] = Vv[task // DP, T.min(n, N - 1), 2 * (task % DP)]
                            Z[2 * task + 1, n, 1] = _pair(Vv, task // DP, T.min(n, N - 1), 2 * (task % DP) + 1,
                                                          D, dtype)
                        else:
                            Z[2 * task, n, 0] = zero
                            Z[2 * task, n, 1] = zero
                            Z[2 * task + 1, n, 0] = zero
                            Z[2 * task + 1, n, 1] = zero
            sync()
            dif(Z, 2 * task, 2 if learn else 1, TW, Lf)
            if learn:
                clear(DCS, task, Lf)
                cross(DCS, task, Z, 2 * task, 2 * task + 1, Lf)
            product(Z, 2 * task, CH, task // DP % H, Lf, True)
            dit(Z, 2 * task, 1, TW, Lf)
            for lane in threads(R):
                for it in range(_ceil(N, R)):
                    n = it * R + lane
                    if n < N:
                        dV[task // DP, n, 2 * (task % DP)] = Z[2 * task, n, 0]
                        if 2 * (task % DP) + 1 < D:
                            dV[task // DP, n, T.min(2 * (task % DP) + 1, D - 1)] = Z[2 * task, n, 1]
        if learn:
            table_grad(DC, DCS, dTAB, TAB, MX, TW, BH, H, P, N, Lf, W, DP)

    return kernel

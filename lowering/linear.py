"""Linear-attention kernels (forward and exact backward), chunked, in TVMScript for CPUs.

Shapes: Qf, Kf (BH, N, M); V, O, dO (BH, N, D); DEN (BH, N). M, D and dtype are baked in, BH and
N are symbolic, so one build serves every batch·heads and length (N = 1 and ragged tails too).

Formulation. The sequence is cut into chunks of C rows. Per chunk every product is a small dense
matmul whose output tile (R rows × a full row of columns) lives in vector registers while the
contraction loop streams one operand row and broadcasts the other's scalars; carried state (S =
Σ Kf⊗V, z = Σ Kf, and their backward twins) is updated once per chunk, not once per token.
Causal masks only ever touch the intra-chunk C×C block. The one awkward product is Qf Kfᵀ (both
operands contiguous along the contraction), so one operand is transposed per chunk, with vector
shuffles where the widths allow it. Chunk buffers are zero-padded: padded K/V rows add nothing to
state or scores, padded Q rows are computed but never stored, so the tail chunk needs no
special GEMM code.
"""
from __future__ import annotations

from tvm.script import tirx as T


def _lanes(dtype: str) -> int:
    """Elements per 512-bit vector register."""
    return 16 if dtype == "float32" else 8


def _rows(cols: int, lanes: int, cap: int) -> int:
    """Row tile for an accumulator (rows × cols): ~16 vector registers, a power of two ≤ cap."""
    regs = -(-cols // lanes)
    r = 1
    while r * 2 * regs <= 16 and r * 2 <= cap:
        r *= 2
    return r


def _pad(n: int, m: int) -> int:
    return -(-n // m) * m


def _shuffle_idx(lanes: int, bit: int, hi: bool) -> list:
    """Lane picks from concat(a, b) for one butterfly stage of a lanes×lanes transpose:
    it swaps bit `bit` of the row index with the same bit of the lane index."""
    if hi:
        return [(m + bit) if not m & bit else lanes + m for m in range(lanes)]
    return [m if not m & bit else lanes + m - bit for m in range(lanes)]


@T.macro
def mm(acc, A, a_t, B, row0, R, k0, k1, ncols):
    """acc[r, :] += Σ_{k0 ≤ k < k1} A(row0 + r, k) B[k, :], A read as A[k, row] when a_t
    (broadcast either way); acc is a register tile, so only operands stream from memory."""
    for k in range(k0, k1):
        for r in T.unroll(R):
            for j in T.vectorized(ncols):
                if a_t:
                    acc[r, j] = acc[r, j] + A[k, row0 + r] * B[k, j]
                else:
                    acc[r, j] = acc[r, j] + A[row0 + r, k] * B[k, j]


@T.macro
def fill(acc, R, ncols):
    """Zero an R × ncols register tile."""
    for r in T.unroll(R):
        for j in T.vectorized(ncols):
            acc[r, j] = T.cast(0, acc.dtype)


def _helpers(dtype: str, C: int, phi=None):
    """Chunk loaders shared by the kernels (closures over dtype, chunk C, vector width, and the
    fused elementwise map φ, a PrimExpr -> PrimExpr builder, when there is one)."""
    L = _lanes(dtype)
    zero = T.cast(0, dtype)
    stages = [(b, _shuffle_idx(L, b, False), _shuffle_idx(L, b, True)) for b in (8, 4, 2, 1) if b < L]

    @T.macro
    def stage(X, Y, bit, lo, hi):
        for t in T.unroll(L):
            if t & bit == 0:
                Y[t, T.Ramp(0, 1, L)] = T.Shuffle([X[t, T.Ramp(0, 1, L)], X[t + bit, T.Ramp(0, 1, L)]], lo)
            else:
                Y[t, T.Ramp(0, 1, L)] = T.Shuffle([X[t - bit, T.Ramp(0, 1, L)], X[t, T.Ramp(0, 1, L)]], hi)

    @T.macro
    def load(dst, src, b, base, N, ncols):
        """dst[t, :ncols] = src[b, base + t, :], rows past N zeroed."""
        for t in range(C):
            if base + t < N:
                for j in T.vectorized(ncols):
                    dst[t, j] = src[b, base + t, j]
            else:
                for j in T.vectorized(ncols):
                    dst[t, j] = zero

    @T.macro
    def load_t(dst, src, b, base, N, ncols, X, Y):
        """dst[j, t] = src[b, base + t, j] (rows past N zeroed). Full chunks of lane-multiple
        width go through an in-register butterfly transpose (scalar/scatter copies cost as much
        as a GEMM here); everything else takes the plain guarded loop."""
        if ncols % L == 0 and C % L == 0 and base + C <= N:
            for t0 in range(C // L):
                for j0 in range(ncols // L):
                    for t in T.unroll(L):
                        X[t, T.Ramp(0, 1, L)] = src[b, base + t0 * L + t, T.Ramp(j0 * L, 1, L)]
                    if L == 16:
                        stage(X, Y, stages[0][0], stages[0][1], stages[0][2])
                        stage(Y, X, stages[1][0], stages[1][1], stages[1][2])
                        stage(X, Y, stages[2][0], stages[2][1], stages[2][2])
                        stage(Y, X, stages[3][0], stages[3][1], stages[3][2])
                    else:
                        stage(X, Y, stages[0][0], stages[0][1], stages[0][2])
                        stage(Y, X, stages[1][0], stages[1][1], stages[1][2])
                        stage(X, Y, stages[2][0], stages[2][1], stages[2][2])
                        for t in T.unroll(L):
                            X[t, T.Ramp(0, 1, L)] = Y[t, T.Ramp(0, 1, L)]
                    for j in T.unroll(L):
                        dst[j0 * L + j, T.Ramp(t0 * L, 1, L)] = X[j, T.Ramp(0, 1, L)]
        else:
            for t in range(C):
                if base + t < N:
                    for j in range(ncols):
                        dst[j, t] = src[b, base + t, j]
                else:
                    for j in range(ncols):
                        dst[j, t] = zero

    @T.macro
    def phi_rows(dst, base, N, ncols):
        """dst[t, :ncols] = φ(dst[t, :ncols]) for the chunk's rows before N (padding stays 0)."""
        for t in range(C):
            if base + t < N:
                for j in T.vectorized(ncols):
                    dst[t, j] = phi(dst[t, j])

    @T.macro
    def phi_cols(dst, base, N, nrows):
        """The same on a transposed chunk dst[j, t]."""
        for j in range(nrows):
            for t in T.vectorized(C):
                dst[j, t] = T.Select(base + t < N, phi(dst[j, t]), zero)

    return L, zero, load, load_t, phi_rows, phi_cols


def _decay_tables(dtype: str, C: int, slope):
    """Per-head powers of γ = exp(−slope(TAB, h)) for a chunk: G0[t] = γ^t, G1[t] = γ^(t+1),
    GR[t] = γ^(C−1−t),
    Dec[s, t] = γ^(t−s) (t ≥ s, else 0), gC = γ^C. Exponents are never negative (no overflow)."""

    @T.macro
    def decay_tables(TAB, h, G0, G1, GR, Dec, gC):
        a: T.let = slope(TAB, h)
        for t in range(C):
            G0[t] = T.exp(T.cast(-t, dtype) * a)
            G1[t] = T.exp(T.cast(-(t + 1), dtype) * a)
            GR[t] = T.exp(T.cast(t + 1 - C, dtype) * a)
            for u in range(C):
                Dec[t, u] = T.Select(u >= t, T.exp(T.cast(t - u, dtype) * a), T.cast(0, dtype))
        gC[0] = T.exp(T.cast(-C, dtype) * a)
    return decay_tables


def linear_forward(name: str, M: int, D: int, dtype: str, causal: bool, phi=None, slope=None):
    """Linear attention forward: (Qf (BH,N,M), Kf (BH,N,M), V (BH,N,D), TAB (H,P), O (BH,N,D) out,
    DEN (BH,N) out). With a_ij = Qf_i·Kf_j over j ∈ mask(i) ({j ≤ i} causal, all j otherwise):
    DEN_i = Σ_j a_ij and O_i = (Σ_j a_ij V_j) / DEN_i.
    With `phi` (fused elementwise map) the inputs are raw q, k and Qf = φ(q), Kf = φ(k) per chunk.
    With `slope` (causal only: the decayed form), a_ij carries γ^(i−j), γ = exp(−slope(TAB, h)),
    h = bh mod H: the state decays by γ per token (ALiBi as a recurrence); TAB is unused otherwise."""
    C = 32
    fused = phi is not None
    decayed = slope is not None
    assert causal or not decayed
    decay_tables = _decay_tables(dtype, C, slope) if decayed else None
    L, zero, load, load_t, phi_rows, phi_cols = _helpers(dtype, C, phi)
    R = _rows(D, L, C)            # rows of an output/state tile (D columns)
    R1 = _rows(C, L, C)           # rows of a score tile (C columns)
    Mp = _pad(M, R)               # state rows padded to whole tiles; padded rows stay zero

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
        for b in T.parallel(BH):
            G0 = T.alloc_buffer((C,), dtype)
            G1 = T.alloc_buffer((C,), dtype)
            GR = T.alloc_buffer((C,), dtype)
            Dec = T.alloc_buffer((C, C), dtype)
            gC = T.alloc_buffer((1,), dtype)
            if decayed:
                decay_tables(TAB, b % H, G0, G1, GR, Dec, gC)
            QcT = T.alloc_buffer((Mp, C), dtype)   # chunk of Qf, transposed
            Kc = T.alloc_buffer((C, Mp), dtype)
            Vc = T.alloc_buffer((C, D), dtype)
            AT = T.alloc_buffer((C, C), dtype)     # masked scores, AT[s, t] = Kf_s·Qf_t
            S = T.alloc_buffer((Mp, D), dtype)     # Σ Kf⊗V over earlier chunks (all, if full)
            z = T.alloc_buffer((Mp,), dtype, scope="local")
            den = T.alloc_buffer((C,), dtype, scope="local")
            acc = T.alloc_buffer((R, D), dtype, scope="local")
            acc1 = T.alloc_buffer((R1, C), dtype, scope="local")
            X = T.alloc_buffer((L, L), dtype, scope="local")
            Y = T.alloc_buffer((L, L), dtype, scope="local")
            for m in range(Mp):
                z[m] = zero
                for d in T.vectorized(D):
                    S[m, d] = zero
                for t in T.vectorized(C):
                    QcT[m, t] = zero
            for t in range(C):
                for m in T.vectorized(Mp):
                    Kc[t, m] = zero
            if not causal:
                # S = Kfᵀ V and z = Σ Kf over the whole sequence, then O = Qf S / Qf·z.
                for c in range((N + C - 1) // C):
                    load(Kc, K, b, c * C, N, M)
                    if fused:
                        phi_rows(Kc, c * C, N, M)
                    load(Vc, V, b, c * C, N, D)
                    for t in range(C):
                        for m in T.vectorized(Mp):
                            z[m] = z[m] + Kc[t, m]
                    for m0 in range(Mp // R):
                        for r in T.unroll(R):
                            for d in T.vectorized(D):
                                acc[r, d] = S[m0 * R + r, d]
                        mm(acc, Kc, True, Vc, m0 * R, R, 0, C, D)
                        for r in T.unroll(R):
                            for d in T.vectorized(D):
                                S[m0 * R + r, d] = acc[r, d]
            for c in range((N + C - 1) // C):
                load_t(QcT, Q, b, c * C, N, M, X, Y)
                if fused:
                    phi_cols(QcT, c * C, N, M)
                for t in T.vectorized(C):
                    den[t] = zero
                for m in range(Mp):
                    for t in T.vectorized(C):
                        den[t] = den[t] + QcT[m, t] * z[m]
                if decayed:
                    for t in T.vectorized(C):
                        den[t] = den[t] * G1[t]
                if causal:
                    load(Kc, K, b, c * C, N, M)
                    if fused:
                        phi_rows(Kc, c * C, N, M)
                    load(Vc, V, b, c * C, N, D)
                    # Intra-chunk scores AT[s, t] = Kf_s·Qf_t (·γ^(t−s) when decayed), kept for
                    # t ≥ s; den gets their column sums while the tile is still in registers.
                    for s0 in range(C // R1):
                        fill(acc1, R1, C)
                        mm(acc1, Kc, False, QcT, s0 * R1, R1, 0, Mp, C)
                        for r in T.unroll(R1):
                            for t in T.vectorized(C):
                                if decayed:
                                    AT[s0 * R1 + r, t] = acc1[r, t] * Dec[s0 * R1 + r, t]
                                else:
                                    AT[s0 * R1 + r, t] = T.Select(t >= s0 * R1 + r, acc1[r, t], zero)
                                den[t] = den[t] + AT[s0 * R1 + r, t]
                for t0 in range(C // R):
                    fill(acc, R, D)
                    mm(acc, QcT, True, S, t0 * R, R, 0, Mp, D)
                    if decayed:
                        for r in T.unroll(R):
                            for d in T.vectorized(D):
                                acc[r, d] = acc[r, d] * G1[t0 * R + r]
                    if causal:
                        # rows t0*R.. only see keys s < (t0+1)R; AT is zero above the diagonal
                        mm(acc, AT, True, Vc, t0 * R, R, 0, t0 * R + R, D)
                    for r in T.unroll(R):
                        if c * C + t0 * R + r < N:
                            DEN[b, c * C + t0 * R + r] = den[t0 * R + r]
                            for d in T.vectorized(D):
                                O[b, c * C + t0 * R + r, d] = acc[r, d] * (T.cast(1, dtype) / den[t0 * R + r])
                if causal:
                    # fold this chunk into the state only after its queries have used it
                    if decayed:        # S ← γ^C S + Σ_s γ^(C−1−s) Kf_s⊗V_s
                        for m in range(Mp):
                            z[m] = z[m] * gC[0]
                            for d in T.vectorized(D):
                                S[m, d] = S[m, d] * gC[0]
                        for t in range(C):
                            for m in T.vectorized(Mp):
                                Kc[t, m] = Kc[t, m] * GR[t]
                    for t in range(C):
                        for m in T.vectorized(Mp):
                            z[m] = z[m] + Kc[t, m]
                    for m0 in range(Mp // R):
                        for r in T.unroll(R):
                            for d in T.vectorized(D):
                                acc[r, d] = S[m0 * R + r, d]
                        mm(acc, Kc, True, Vc, m0 * R, R, 0, C, D)
                        for r in T.unroll(R):
                            for d in T.vectorized(D):
                                S[m0 * R + r, d] = acc[r, d]

    return kernel


def linear_backward(name: str, M: int, D: int, dtype: str, causal: bool, phi=None, dphi=None,
                    slope=None):
    """Exact gradient of linear_forward's O: (Qf, Kf, V, O, DEN, dO (BH,N,D), dQf (BH,N,M) out,
    dKf (BH,N,M) out, dV (BH,N,D) out). With g_i = dO_i/DEN_i, c_i = −(dO_i·O_i)/DEN_i and
    b_ij = g_i·V_j + c_i over j ∈ mask(i):
    dQf_i = Σ_j b_ij Kf_j,  dKf_j = Σ_{i∋j} b_ij Qf_i,  dV_j = Σ_{i∋j} (Qf_i·Kf_j) g_i.
    Carried state: Sᵀ = Σ V⊗Kf and z = Σ Kf (earlier chunks) give dQf = Sᵀ-product + c z;
    R = Σ Qf⊗g, its transpose, and r = Σ c Qf (later chunks) give dKf = V Rᵀ + r, dV = Kf R.
    With `phi` fused, the inputs are raw q, k and the outputs dq = dQf ⊙ dphi(q), dk likewise
    (`dphi` is d/dx φ(c·x), the prescale included). With `slope` (decayed, causal) every pair
    carries γ^(i−j): intra-chunk tiles are weighted by Dec, state products by γ^(t+1) (earlier
    chunks, forward in time) or γ^(C−s) (later chunks, backward in time), and both states decay by
    γ^C per chunk. Signature: (Qf, Kf, V, TAB, O, DEN, dO, dQf, dKf, dV); TAB only read when decayed."""
    C = 32
    fused = phi is not None
    decayed = slope is not None
    assert causal or not decayed
    decay_tables = _decay_tables(dtype, C, slope) if decayed else None
    L, zero, load, load_t, phi_rows, phi_cols = _helpers(dtype, C, phi)

    def dq_scale(x):  # passed to the macros: a non-hygienic macro sees only the kernel's names
        return dphi(x) if fused else T.cast(1, dtype)
    RM = _rows(M, L, C)           # row tile of an M-column output
    RD = _rows(D, L, C)           # row tile of a D-column output
    R1 = _rows(C, L, C)           # row tile of a score tile
    Mp = _pad(M, RD)              # rows of R (M×D) padded to whole tiles
    Dp = _pad(D, RM)              # rows of Sᵀ, Rᵀ (D×M) padded to whole tiles

    # Macros over one head's buffers: non-hygienic, so the names resolve inside the kernel.
    @T.macro(hygienic=False)
    def load_g(base):
        """Gc, GcT = dO/DEN and cc = −(dO·O)/DEN for the chunk; zero past N."""
        for t in range(C):
            if base + t < N:
                inv[t] = T.cast(1, dtype) / DEN[b, base + t]
                dot[0] = zero
                for d in range(D):
                    dot[0] = dot[0] + dO[b, base + t, d] * O[b, base + t, d]
                cc[t] = zero - dot[0] * inv[t]
                for d in T.vectorized(D):
                    Gc[t, d] = dO[b, base + t, d] * inv[t]
            else:
                inv[t] = zero
                cc[t] = zero
                for d in T.vectorized(D):
                    Gc[t, d] = zero
        load_t(GcT, dO, b, base, N, D, X, Y)
        for d in range(D):
            for t in T.vectorized(C):
                GcT[d, t] = GcT[d, t] * inv[t]

    @T.macro(hygienic=False)
    def scores_b():
        """BT[s, t] = Vc_s·g_t + c_t, kept for t ≥ s."""
        for s0 in range(C // R1):
            fill(acc1, R1, C)
            mm(acc1, Vc, False, GcT, s0 * R1, R1, 0, D, C)
            for r in T.unroll(R1):
                for t in T.vectorized(C):
                    if decayed:
                        BT[s0 * R1 + r, t] = (acc1[r, t] + cc[t]) * Dec[s0 * R1 + r, t]
                    else:
                        BT[s0 * R1 + r, t] = T.Select(t >= s0 * R1 + r, acc1[r, t] + cc[t], zero)

    @T.macro(hygienic=False)
    def scores_a():
        """AT[s, t] = Kf_s·Qf_t, kept for t ≥ s."""
        for s0 in range(C // R1):
            fill(acc1, R1, C)
            mm(acc1, Kc, False, QcT, s0 * R1, R1, 0, M, C)
            for r in T.unroll(R1):
                for t in T.vectorized(C):
                    if decayed:
                        AT[s0 * R1 + r, t] = acc1[r, t] * Dec[s0 * R1 + r, t]
                    else:
                        AT[s0 * R1 + r, t] = T.Select(t >= s0 * R1 + r, acc1[r, t], zero)

    @T.macro(hygienic=False)
    def fold_kv():
        """Sᵀ += Vcᵀ Kc, z += Σ Kc (decayed: Sᵀ ← γ^C Sᵀ + Σ_s γ^(C−1−s) V_s⊗Kf_s, z likewise)."""
        if decayed:
            for d in range(Dp):
                for m in T.vectorized(M):
                    ST[d, m] = ST[d, m] * gC[0]
            for m in range(Mp):
                z[m] = z[m] * gC[0]
            for t in range(C):
                for m in T.vectorized(Mp):
                    Kc[t, m] = Kc[t, m] * GR[t]
        for t in range(C):
            for m in T.vectorized(Mp):
                z[m] = z[m] + Kc[t, m]
        for d0 in range(Dp // RM):
            for r in T.unroll(RM):
                for m in T.vectorized(M):
                    accM[r, m] = ST[d0 * RM + r, m]
            mm(accM, Vc, True, Kc, d0 * RM, RM, 0, C, M)
            for r in T.unroll(RM):
                for m in T.vectorized(M):
                    ST[d0 * RM + r, m] = accM[r, m]

    @T.macro(hygienic=False)
    def fold_qg():
        """R += Qcᵀ Gc, Rᵀ += Gcᵀ Qc, r += Qcᵀ cc (decayed: the states ← γ^C · states + the
        chunk's rows weighted γ^t)."""
        if decayed:
            for m in range(Mp):
                rv[m] = rv[m] * gC[0]
                for d in T.vectorized(D):
                    Rm[m, d] = Rm[m, d] * gC[0]
            for d in range(Dp):
                for m in T.vectorized(M):
                    RT[d, m] = RT[d, m] * gC[0]
            for t in range(C):
                for m in T.vectorized(Mp):
                    Qc[t, m] = Qc[t, m] * G0[t]
        for t in range(C):
            for m in T.vectorized(Mp):
                rv[m] = rv[m] + Qc[t, m] * cc[t]
        for m0 in range(Mp // RD):
            for r in T.unroll(RD):
                for d in T.vectorized(D):
                    accD[r, d] = Rm[m0 * RD + r, d]
            mm(accD, Qc, True, Gc, m0 * RD, RD, 0, C, D)
            for r in T.unroll(RD):
                for d in T.vectorized(D):
                    Rm[m0 * RD + r, d] = accD[r, d]
        for d0 in range(Dp // RM):
            for r in T.unroll(RM):
                for m in T.vectorized(M):
                    accM[r, m] = RT[d0 * RM + r, m]
            mm(accM, Gc, True, Qc, d0 * RM, RM, 0, C, M)
            for r in T.unroll(RM):
                for m in T.vectorized(M):
                    RT[d0 * RM + r, m] = accM[r, m]

    @T.macro(hygienic=False)
    def emit_dq(base, dq_scale):
        """dQf rows of the chunk: intra (causal) + g Sᵀ + c z."""
        for t0 in range(C // RM):
            fill(accM, RM, M)
            mm(accM, GcT, True, ST, t0 * RM, RM, 0, D, M)
            for r in T.unroll(RM):
                for m in T.vectorized(M):
                    if decayed:
                        accM[r, m] = (accM[r, m] + cc[t0 * RM + r] * z[m]) * G1[t0 * RM + r]
                    else:
                        accM[r, m] = accM[r, m] + cc[t0 * RM + r] * z[m]
            if causal:
                mm(accM, BT, True, Kc, t0 * RM, RM, 0, t0 * RM + RM, M)
            for r in T.unroll(RM):
                if base + t0 * RM + r < N:
                    for m in T.vectorized(M):
                        dQ[b, base + t0 * RM + r, m] = accM[r, m] * dq_scale(Q[b, base + t0 * RM + r, m])

    @T.macro(hygienic=False)
    def emit_dkv(base, dq_scale):
        """dKf and dV rows of the chunk: intra (causal) + state products."""
        for s0 in range(C // RM):
            fill(accM, RM, M)
            mm(accM, Vc, False, RT, s0 * RM, RM, 0, D, M)
            for r in T.unroll(RM):
                for m in T.vectorized(M):
                    if decayed:
                        accM[r, m] = (accM[r, m] + rv[m]) * G1[C - 1 - s0 * RM - r]
                    else:
                        accM[r, m] = accM[r, m] + rv[m]
            if causal:
                mm(accM, BT, False, Qc, s0 * RM, RM, s0 * RM, C, M)
            for r in T.unroll(RM):
                if base + s0 * RM + r < N:
                    for m in T.vectorized(M):
                        dK[b, base + s0 * RM + r, m] = accM[r, m] * dq_scale(K[b, base + s0 * RM + r, m])
        for s0 in range(C // RD):
            fill(accD, RD, D)
            mm(accD, Kc, False, Rm, s0 * RD, RD, 0, M, D)
            if decayed:
                for r in T.unroll(RD):
                    for d in T.vectorized(D):
                        accD[r, d] = accD[r, d] * G1[C - 1 - s0 * RD - r]
            if causal:
                mm(accD, AT, False, Gc, s0 * RD, RD, s0 * RD, C, D)
            for r in T.unroll(RD):
                if base + s0 * RD + r < N:
                    for d in T.vectorized(D):
                        dV[b, base + s0 * RD + r, d] = accD[r, d]

    @T.prim_func
    def kernel(q: T.handle, k: T.handle, v: T.handle, tab: T.handle, o: T.handle, dn: T.handle,
               do: T.handle, dq: T.handle, dk: T.handle, dv: T.handle):
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
        for b in T.parallel(BH):
            Qc = T.alloc_buffer((C, Mp), dtype)
            QcT = T.alloc_buffer((Mp, C), dtype)
            Kc = T.alloc_buffer((C, Mp), dtype)
            Vc = T.alloc_buffer((C, Dp), dtype)
            Gc = T.alloc_buffer((C, Dp), dtype)    # g rows of the chunk
            GcT = T.alloc_buffer((Dp, C), dtype)   # the same, transposed
            cc = T.alloc_buffer((C,), dtype)
            inv = T.alloc_buffer((C,), dtype)
            BT = T.alloc_buffer((C, C), dtype)     # BT[s, t] = b_ts (masked)
            AT = T.alloc_buffer((C, C), dtype)     # AT[s, t] = Kf_s·Qf_t (masked)
            ST = T.alloc_buffer((Dp, M), dtype)
            z = T.alloc_buffer((Mp,), dtype)
            Rm = T.alloc_buffer((Mp, D), dtype)
            RT = T.alloc_buffer((Dp, M), dtype)
            rv = T.alloc_buffer((Mp,), dtype)
            dot = T.alloc_buffer((1,), dtype, scope="local")
            accM = T.alloc_buffer((RM, M), dtype, scope="local")
            accD = T.alloc_buffer((RD, D), dtype, scope="local")
            acc1 = T.alloc_buffer((R1, C), dtype, scope="local")
            X = T.alloc_buffer((L, L), dtype, scope="local")
            Y = T.alloc_buffer((L, L), dtype, scope="local")
            G0 = T.alloc_buffer((C,), dtype)
            G1 = T.alloc_buffer((C,), dtype)
            GR = T.alloc_buffer((C,), dtype)
            Dec = T.alloc_buffer((C, C), dtype)
            gC = T.alloc_buffer((1,), dtype)
            if decayed:
                decay_tables(TAB, b % H, G0, G1, GR, Dec, gC)
            # zero everything once: padded rows/columns are never written again, so stay zero
            for t in range(C):
                for m in T.vectorized(Mp):
                    Qc[t, m] = zero
                    Kc[t, m] = zero
                for d in T.vectorized(Dp):
                    Vc[t, d] = zero
                    Gc[t, d] = zero
            for m in range(Mp):
                z[m] = zero
                rv[m] = zero
                for t in T.vectorized(C):
                    QcT[m, t] = zero
                for d in T.vectorized(D):
                    Rm[m, d] = zero
            for d in range(Dp):
                for t in T.vectorized(C):
                    GcT[d, t] = zero
                for m in T.vectorized(M):
                    ST[d, m] = zero
                    RT[d, m] = zero
            nc = (N + C - 1) // C

            if causal:
                # forward in time: dQf needs the state of earlier chunks
                for c in range(nc):
                    load(Kc, K, b, c * C, N, M)
                    if fused:
                        phi_rows(Kc, c * C, N, M)
                    load(Vc, V, b, c * C, N, D)
                    load_g(c * C)
                    scores_b()
                    emit_dq(c * C, dq_scale)
                    fold_kv()
                # backward in time: dKf, dV need the state of later chunks
                for ci in range(nc):
                    base = (nc - 1 - ci) * C
                    load(Qc, Q, b, base, N, M)
                    if fused:
                        phi_rows(Qc, base, N, M)
                    load_t(QcT, Q, b, base, N, M, X, Y)
                    if fused:
                        phi_cols(QcT, base, N, M)
                    load(Kc, K, b, base, N, M)
                    if fused:
                        phi_rows(Kc, base, N, M)
                    load(Vc, V, b, base, N, D)
                    load_g(base)
                    scores_b()
                    scores_a()
                    emit_dkv(base, dq_scale)
                    fold_qg()
            else:
                # totals first, then every chunk against them
                for c in range(nc):
                    load(Qc, Q, b, c * C, N, M)
                    if fused:
                        phi_rows(Qc, c * C, N, M)
                    load(Kc, K, b, c * C, N, M)
                    if fused:
                        phi_rows(Kc, c * C, N, M)
                    load(Vc, V, b, c * C, N, D)
                    load_g(c * C)
                    fold_kv()
                    fold_qg()
                for c in range(nc):
                    load(Kc, K, b, c * C, N, M)
                    if fused:
                        phi_rows(Kc, c * C, N, M)
                    load(Vc, V, b, c * C, N, D)
                    load_g(c * C)
                    emit_dq(c * C, dq_scale)
                    emit_dkv(c * C, dq_scale)

    return kernel

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

from attndsl.schedules.knobs import resolve as knobs_of

from ..tir.tiles import chunk_loaders, fill, mm, mm_into, pad, reg_rows


# rows of a direction's decay table G (see _decay_tables)
WQ, WK, FK, FQ, GC = 0, 1, 2, 3, 4


def _decay_tables(dtype: str, C: int, slope, later: bool):
    """Per-head powers of γ = exp(−slope(TAB, h, later)) for one direction of the decayed
    recurrence: the keys at or before each query (later=False) or the keys strictly after it
    (later=True, non-causal only). For query row t and key row s of a chunk:
      Dec[s, t]  γ^|t−s| on the pairs of this direction (t ≥ s | s > t), else 0
      G[WQ, t]   γ^(distance from query row t to the carried state):  γ^(t+1)   | γ^(C−t)
      G[WK, s]   the same for a key row (the backward's query state):   γ^(C−s)   | γ^(s+1)
      G[FK, s]   a key row's weight when folded into the state:          γ^(C−1−s) | γ^s
      G[FQ, t]   a query row's weight when folded (backward):            γ^t       | γ^(C−1−t)
      G[GC, :]   γ^C, the decay of a carried state over one chunk.
    The later direction is the mirror image (t ↔ C−1−t). Exponents are never positive."""
    if later:
        exps = {WQ: lambda t: C - t, WK: lambda t: t + 1, FK: lambda t: t, FQ: lambda t: C - 1 - t}

        def lag(s, t):          # how far key s lies after query t
            return s - t
    else:
        exps = {WQ: lambda t: t + 1, WK: lambda t: C - t, FK: lambda t: C - 1 - t, FQ: lambda t: t}

        def lag(s, t):          # how far key s lies before query t
            return t - s
    first = 1 if later else 0   # smallest lag of the direction: strictly later keys, or the diagonal

    @T.macro
    def decay_tables(TAB, h, G, Dec):
        a: T.let = slope(TAB, h, later)
        for t in range(C):
            G[WQ, t] = T.exp(T.cast(-exps[WQ](t), dtype) * a)
            G[WK, t] = T.exp(T.cast(-exps[WK](t), dtype) * a)
            G[FK, t] = T.exp(T.cast(-exps[FK](t), dtype) * a)
            G[FQ, t] = T.exp(T.cast(-exps[FQ](t), dtype) * a)
            G[GC, t] = T.exp(T.cast(-C, dtype) * a)
            for s in range(C):
                Dec[s, t] = T.Select(lag(s, t) >= first, T.exp(T.cast(-lag(s, t), dtype) * a),
                                     T.cast(0, dtype))
    return decay_tables


def linear_forward(name: str, M: int, D: int, dtype: str, causal: bool, phi=None, slope=None,
                   knobs=None, eps: float | None = None):
    """Linear attention forward: (Qf (BH,N,M), Kf (BH,N,M), V (BH,N,D), TAB (H,P), O (BH,N,D) out,
    DEN (BH,N) out). With a_ij = Qf_i·Kf_j over j ∈ mask(i) ({j ≤ i} causal, all j otherwise):
    DEN_i = Σ_j a_ij and O_i = (Σ_j a_ij V_j) / DEN_i.
    With `phi` (fused elementwise map) the inputs are raw q, k and Qf = φ(q), Kf = φ(k) per chunk.
    With `slope` (the decayed form), a_ij carries γ_f^(i−j) for j ≤ i and γ_b^(j−i) for j > i,
    γ_f = exp(−slope(TAB, h, False)), γ_b = exp(−slope(TAB, h, True)), h = bh mod H: a state
    running forward in time decays by γ_f per token (ALiBi as a recurrence); without a causal mask
    a second one runs backward in time over the strictly later keys, and the two sums meet before
    the division:  O_i = (Σ_{j≤i} γ_f^(i−j) a_ij V_j + Σ_{j>i} γ_b^(j−i) a_ij V_j) / DEN_i.
    TAB is unused when not decayed. `knobs` (schedules/knobs.py, family "linear"): chunk, tile_regs.
    `eps` (the spec's floor, in the kernel's units): DEN_i gets + eps before the division."""
    kn = knobs_of("linear", knobs)
    C, regs = kn["chunk"], kn["tile_regs"]
    floored = bool(eps)           # a Python bool: TVMScript unrolls `if floored` at parse time
    decayed = slope is not None
    scan = causal or decayed      # a running state over chunks, not one total
    two_way = decayed and not causal
    tables = _decay_tables(dtype, C, slope, False) if decayed else None
    tables_later = _decay_tables(dtype, C, slope, True) if two_way else None
    L, zero, load, load_t, load_f, load_ft = chunk_loaders(dtype, C, phi)
    R = reg_rows(D, L, C, regs)      # rows of an output/state tile (D columns)
    R1 = reg_rows(C, L, C, regs)     # rows of a score tile (C columns)
    Mp = pad(M, R)               # state rows padded to whole tiles; padded rows stay zero

    # Macros over one head's buffers: non-hygienic, so the names resolve inside the kernel, which
    # does not see this function's locals: helpers the kernel itself never names come in as
    # default arguments.
    @T.macro(hygienic=False)
    def load_kv(base, load_f=load_f, load=load):
        load_f(Kc, K, b, base, N, M)
        load(Vc, V, b, base, N, D)

    @T.macro(hygienic=False)
    def clear_state():
        for m in range(Mp):
            z[m] = zero
            for d in T.vectorized(D):
                S[m, d] = zero

    @T.macro(hygienic=False)
    def fold(G):
        """S += Kfᵀ V, z += Σ Kf over the chunk (decayed: S ← γ^C S + Σ_s G[FK, s] Kf_s⊗V_s, z
        likewise); done after the chunk's queries have used the state."""
        if decayed:
            for m in range(Mp):
                z[m] = z[m] * G[GC, 0]
                for d in T.vectorized(D):
                    S[m, d] = S[m, d] * G[GC, 0]
            for t in range(C):
                for m in T.vectorized(Mp):
                    Kc[t, m] = Kc[t, m] * G[FK, t]
        for t in range(C):
            for m in T.vectorized(Mp):
                z[m] = z[m] + Kc[t, m]
        for m0 in range(Mp // R):
            mm_into(S, acc, Kc, True, Vc, m0 * R, R, 0, C, D)

    @T.macro(hygienic=False)
    def query_rows(base, G, Dec, later, first, last, load_ft=load_ft, floored=floored, eps=eps):
        """The chunk's rows against the state (·G[WQ, t] when decayed) plus, when scanning, the
        intra-chunk pairs of the direction (Kc, Vc loaded). Unless `first`, added to the sums
        already in O and DEN; divided by DEN when `last`, else O keeps the raw sum."""
        load_ft(QcT, Q, b, base, N, M, X, Y)
        for t in T.vectorized(C):
            den[t] = zero
        for m in range(Mp):
            for t in T.vectorized(C):
                den[t] = den[t] + QcT[m, t] * z[m]
        if decayed:
            for t in T.vectorized(C):
                den[t] = den[t] * G[WQ, t]
        if scan:
            # Intra-chunk scores AT[s, t] = Kf_s·Qf_t (·γ^|t−s| when decayed), kept for the pairs
            # of this direction; den gets their column sums while the tile is in registers.
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
                        acc[r, d] = acc[r, d] * G[WQ, t0 * R + r]
            if scan:
                # rows t0*R.. only see keys s < (t0+1)R (or s ≥ t0*R, later); AT is zero elsewhere
                if later:
                    mm(acc, AT, True, Vc, t0 * R, R, t0 * R, C, D)
                else:
                    mm(acc, AT, True, Vc, t0 * R, R, 0, t0 * R + R, D)
            for r in T.unroll(R):
                if base + t0 * R + r < N:
                    if not first:
                        den[t0 * R + r] = den[t0 * R + r] + DEN[b, base + t0 * R + r]
                    if last and floored:
                        den[t0 * R + r] = den[t0 * R + r] + T.cast(eps, dtype)
                    DEN[b, base + t0 * R + r] = den[t0 * R + r]
                    for d in T.vectorized(D):
                        if not first:
                            acc[r, d] = acc[r, d] + O[b, base + t0 * R + r, d]
                        if last:
                            O[b, base + t0 * R + r, d] = acc[r, d] * (T.cast(1, dtype) / den[t0 * R + r])
                        else:
                            O[b, base + t0 * R + r, d] = acc[r, d]

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
            G = T.alloc_buffer((5, C), dtype)      # decay tables, keys at or before the query
            Dec = T.alloc_buffer((C, C), dtype)
            Gl = T.alloc_buffer((5, C), dtype)     # the same for later keys (two-way)
            Decl = T.alloc_buffer((C, C), dtype)
            if decayed:
                tables(TAB, b % H, G, Dec)
            if two_way:
                tables_later(TAB, b % H, Gl, Decl)
            QcT = T.alloc_buffer((Mp, C), dtype)   # chunk of Qf, transposed
            Kc = T.alloc_buffer((C, Mp), dtype)
            Vc = T.alloc_buffer((C, D), dtype)
            AT = T.alloc_buffer((C, C), dtype)     # masked scores, AT[s, t] = Kf_s·Qf_t
            S = T.alloc_buffer((Mp, D), dtype)     # Σ Kf⊗V over the chunks seen (all, if a total)
            z = T.alloc_buffer((Mp,), dtype, scope="local")
            den = T.alloc_buffer((C,), dtype, scope="local")
            acc = T.alloc_buffer((R, D), dtype, scope="local")
            acc1 = T.alloc_buffer((R1, C), dtype, scope="local")
            X = T.alloc_buffer((L, L), dtype, scope="local")
            Y = T.alloc_buffer((L, L), dtype, scope="local")
            clear_state()
            for m in range(Mp):
                for t in T.vectorized(C):
                    QcT[m, t] = zero
            for t in range(C):
                for m in T.vectorized(Mp):
                    Kc[t, m] = zero
            nc = (N + C - 1) // C
            if not scan:
                # S = Kfᵀ V and z = Σ Kf over the whole sequence, then O = Qf S / Qf·z.
                for c in range(nc):
                    load_kv(c * C)
                    fold(G)
                for c in range(nc):
                    query_rows(c * C, G, Dec, False, True, True)
            else:
                # forward in time over the keys at or before each query
                for c in range(nc):
                    load_kv(c * C)
                    query_rows(c * C, G, Dec, False, True, not two_way)
                    fold(G)
                if two_way:
                    # backward in time over the later keys, added to the sums above, then divided
                    clear_state()
                    for ci in range(nc):
                        load_kv((nc - 1 - ci) * C)
                        query_rows((nc - 1 - ci) * C, Gl, Decl, True, False, True)
                        fold(Gl)

    return kernel


def linear_backward(name: str, M: int, D: int, dtype: str, causal: bool, phi=None, dphi=None,
                    slope=None, knobs=None):
    """Exact gradient of linear_forward's O: (Qf, Kf, V, O, DEN, dO (BH,N,D), dQf (BH,N,M) out,
    dKf (BH,N,M) out, dV (BH,N,D) out). With g_i = dO_i/DEN_i, c_i = −(dO_i·O_i)/DEN_i and
    b_ij = g_i·V_j + c_i over j ∈ mask(i):
    dQf_i = Σ_j b_ij Kf_j,  dKf_j = Σ_{i∋j} b_ij Qf_i,  dV_j = Σ_{i∋j} (Qf_i·Kf_j) g_i.
    Carried state: Sᵀ = Σ V⊗Kf and z = Σ Kf (earlier chunks) give dQf = Sᵀ-product + c z;
    R = Σ Qf⊗g, its transpose, and r = Σ c Qf (later chunks) give dKf = V Rᵀ + r, dV = Kf R.
    With `phi` fused, the inputs are raw q, k and the outputs dq = dQf ⊙ dphi(q), dk likewise
    (`dphi` is d/dx φ(c·x), the prescale included). With `slope` (decayed) every pair carries
    γ^|i−j| (γ_f for j ≤ i, γ_b for j > i; see linear_forward): intra-chunk tiles are weighted by
    Dec, state products by G[WQ] / G[WK], and both states decay by γ^C per chunk. Keys at or before
    the query: dQf forward in time, then dKf, dV backward in time; without a causal mask the
    strictly later keys then run the mirror image (dQf backward, dKf, dV forward in time), added
    to the gradients. Signature: (Qf, Kf, V, TAB, O, DEN, dO, dQf, dKf, dV); TAB only read when
    decayed. `knobs` as linear_forward's."""
    kn = knobs_of("linear", knobs)
    C, regs = kn["chunk"], kn["tile_regs"]
    fused = phi is not None
    decayed = slope is not None
    scan = causal or decayed      # running states over chunks, not totals
    two_way = decayed and not causal
    tables = _decay_tables(dtype, C, slope, False) if decayed else None
    tables_later = _decay_tables(dtype, C, slope, True) if two_way else None
    L, zero, load, load_t, load_f, load_ft = chunk_loaders(dtype, C, phi)

    def dq_scale(x):  # passed to the macros: a non-hygienic macro sees only the kernel's names
        return dphi(x) if fused else T.cast(1, dtype)
    RM = reg_rows(M, L, C, regs)     # row tile of an M-column output
    RD = reg_rows(D, L, C, regs)     # row tile of a D-column output
    R1 = reg_rows(C, L, C, regs)     # row tile of a score tile
    Mp = pad(M, RD)              # rows of R (M×D) padded to whole tiles
    Dp = pad(D, RM)              # rows of Sᵀ, Rᵀ (D×M) padded to whole tiles

    # Macros over one head's buffers: non-hygienic, so the names resolve inside the kernel (helpers
    # it never names come in as default arguments).
    @T.macro(hygienic=False)
    def load_g(base, transposed, load_t=load_t):
        """Gc, GcT (when `transposed`) = dO/DEN and cc = −(dO·O)/DEN for the chunk; zero past N."""
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
        if transposed:
            load_t(GcT, dO, b, base, N, D, X, Y)
            for d in range(D):
                for t in T.vectorized(C):
                    GcT[d, t] = GcT[d, t] * inv[t]

    @T.macro(hygienic=False)
    def load_chunk(base, queries, transposed, load_f=load_f, load_ft=load_ft, load=load, load_g=load_g):
        """Kf, V and g rows of the chunk at `base` (and Qf when `queries`; the transposed Qfᵀ, gᵀ
        when `transposed`)."""
        if queries:
            load_f(Qc, Q, b, base, N, M)
            if transposed:
                load_ft(QcT, Q, b, base, N, M, X, Y)
        load_f(Kc, K, b, base, N, M)
        load(Vc, V, b, base, N, D)
        load_g(base, transposed)

    @T.macro(hygienic=False)
    def clear_states():
        for m in range(Mp):
            z[m] = zero
            rv[m] = zero
            for d in T.vectorized(D):
                Rm[m, d] = zero
        for d in range(Dp):
            for m in T.vectorized(M):
                ST[d, m] = zero
                RT[d, m] = zero

    @T.macro(hygienic=False)
    def scores_b(Dec):
        """BT[s, t] = Vc_s·g_t + c_t, kept for the pairs of the direction (weighted by Dec)."""
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
    def scores_a(Dec):
        """AT[s, t] = Kf_s·Qf_t, kept for the pairs of the direction (weighted by Dec)."""
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
    def fold_kv(G):
        """Sᵀ += Vcᵀ Kc, z += Σ Kc (decayed: Sᵀ ← γ^C Sᵀ + Σ_s G[FK, s] V_s⊗Kf_s, z likewise)."""
        if decayed:
            for d in range(Dp):
                for m in T.vectorized(M):
                    ST[d, m] = ST[d, m] * G[GC, 0]
            for m in range(Mp):
                z[m] = z[m] * G[GC, 0]
            for t in range(C):
                for m in T.vectorized(Mp):
                    Kc[t, m] = Kc[t, m] * G[FK, t]
        for t in range(C):
            for m in T.vectorized(Mp):
                z[m] = z[m] + Kc[t, m]
        for d0 in range(Dp // RM):
            mm_into(ST, accM, Vc, True, Kc, d0 * RM, RM, 0, C, M)

    @T.macro(hygienic=False)
    def fold_qg(G, transposed):
        """R += Qcᵀ Gc, Rᵀ += Gcᵀ Qc (when `transposed`), r += Qcᵀ cc (decayed: the states ←
        γ^C · states + the chunk's rows weighted G[FQ, t])."""
        if decayed:
            for m in range(Mp):
                rv[m] = rv[m] * G[GC, 0]
                for d in T.vectorized(D):
                    Rm[m, d] = Rm[m, d] * G[GC, 0]
            for d in range(Dp):
                for m in T.vectorized(M):
                    RT[d, m] = RT[d, m] * G[GC, 0]
            for t in range(C):
                for m in T.vectorized(Mp):
                    Qc[t, m] = Qc[t, m] * G[FQ, t]
        for t in range(C):
            for m in T.vectorized(Mp):
                rv[m] = rv[m] + Qc[t, m] * cc[t]
        for m0 in range(Mp // RD):
            mm_into(Rm, accD, Qc, True, Gc, m0 * RD, RD, 0, C, D)
        if transposed:
            for d0 in range(Dp // RM):
                mm_into(RT, accM, Gc, True, Qc, d0 * RM, RM, 0, C, M)

    @T.macro(hygienic=False)
    def emit_dq(base, dq_scale, G, later, first):
        """dQf rows of the chunk: g Sᵀ + c z (·G[WQ, t] when decayed) + the intra-chunk pairs of
        the direction when scanning; added to dQ unless `first`."""
        for t0 in range(C // RM):
            fill(accM, RM, M)
            mm(accM, GcT, True, ST, t0 * RM, RM, 0, D, M)
            for r in T.unroll(RM):
                for m in T.vectorized(M):
                    if decayed:
                        accM[r, m] = (accM[r, m] + cc[t0 * RM + r] * z[m]) * G[WQ, t0 * RM + r]
                    else:
                        accM[r, m] = accM[r, m] + cc[t0 * RM + r] * z[m]
            if scan:
                if later:
                    mm(accM, BT, True, Kc, t0 * RM, RM, t0 * RM, C, M)
                else:
                    mm(accM, BT, True, Kc, t0 * RM, RM, 0, t0 * RM + RM, M)
            for r in T.unroll(RM):
                if base + t0 * RM + r < N:
                    for m in T.vectorized(M):
                        if first:
                            dQ[b, base + t0 * RM + r, m] = accM[r, m] * dq_scale(Q[b, base + t0 * RM + r, m])
                        else:
                            dQ[b, base + t0 * RM + r, m] = (dQ[b, base + t0 * RM + r, m]
                                                            + accM[r, m] * dq_scale(Q[b, base + t0 * RM + r, m]))

    @T.macro(hygienic=False)
    def emit_dkv(base, dq_scale, G, later, first):
        """dKf and dV rows of the chunk: state products (·G[WK, s] when decayed) + the intra-chunk
        pairs of the direction when scanning; added to dK, dV unless `first`."""
        for s0 in range(C // RM):
            fill(accM, RM, M)
            mm(accM, Vc, False, RT, s0 * RM, RM, 0, D, M)
            for r in T.unroll(RM):
                for m in T.vectorized(M):
                    if decayed:
                        accM[r, m] = (accM[r, m] + rv[m]) * G[WK, s0 * RM + r]
                    else:
                        accM[r, m] = accM[r, m] + rv[m]
            if scan:
                if later:
                    mm(accM, BT, False, Qc, s0 * RM, RM, 0, s0 * RM + RM, M)
                else:
                    mm(accM, BT, False, Qc, s0 * RM, RM, s0 * RM, C, M)
            for r in T.unroll(RM):
                if base + s0 * RM + r < N:
                    for m in T.vectorized(M):
                        if first:
                            dK[b, base + s0 * RM + r, m] = accM[r, m] * dq_scale(K[b, base + s0 * RM + r, m])
                        else:
                            dK[b, base + s0 * RM + r, m] = (dK[b, base + s0 * RM + r, m]
                                                            + accM[r, m] * dq_scale(K[b, base + s0 * RM + r, m]))
        for s0 in range(C // RD):
            fill(accD, RD, D)
            mm(accD, Kc, False, Rm, s0 * RD, RD, 0, M, D)
            if decayed:
                for r in T.unroll(RD):
                    for d in T.vectorized(D):
                        accD[r, d] = accD[r, d] * G[WK, s0 * RD + r]
            if scan:
                if later:
                    mm(accD, AT, False, Gc, s0 * RD, RD, 0, s0 * RD + RD, D)
                else:
                    mm(accD, AT, False, Gc, s0 * RD, RD, s0 * RD, C, D)
            for r in T.unroll(RD):
                if base + s0 * RD + r < N:
                    for d in T.vectorized(D):
                        if first:
                            dV[b, base + s0 * RD + r, d] = accD[r, d]
                        else:
                            dV[b, base + s0 * RD + r, d] = dV[b, base + s0 * RD + r, d] + accD[r, d]

    @T.macro(hygienic=False)
    def dq_pass(base, dq_scale, G, Dec, later, first, scores_b=scores_b):
        """One chunk of a dQf scan: emit against the state, then fold the chunk's keys in."""
        load_chunk(base, False, True)
        scores_b(Dec)
        emit_dq(base, dq_scale, G, later, first)
        fold_kv(G)

    @T.macro(hygienic=False)
    def dkv_pass(base, dq_scale, G, Dec, later, first, scores_b=scores_b, scores_a=scores_a):
        """One chunk of a dKf, dV scan: emit against the state, then fold the chunk's queries in."""
        load_chunk(base, True, True)
        scores_b(Dec)
        scores_a(Dec)
        emit_dkv(base, dq_scale, G, later, first)
        fold_qg(G, True)

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
            G = T.alloc_buffer((5, C), dtype)      # decay tables, keys at or before the query
            Dec = T.alloc_buffer((C, C), dtype)
            Gl = T.alloc_buffer((5, C), dtype)     # the same for later keys (two-way)
            Decl = T.alloc_buffer((C, C), dtype)
            if decayed:
                tables(TAB, b % H, G, Dec)
            if two_way:
                tables_later(TAB, b % H, Gl, Decl)
            # zero everything once: padded rows/columns are never written again, so stay zero
            for t in range(C):
                for m in T.vectorized(Mp):
                    Qc[t, m] = zero
                    Kc[t, m] = zero
                for d in T.vectorized(Dp):
                    Vc[t, d] = zero
                    Gc[t, d] = zero
            for m in range(Mp):
                for t in T.vectorized(C):
                    QcT[m, t] = zero
            for d in range(Dp):
                for t in T.vectorized(C):
                    GcT[d, t] = zero
            clear_states()
            nc = (N + C - 1) // C

            if scan:
                # keys at or before each query: dQf forward in time (state of earlier chunks),
                # then dKf, dV backward in time (state of later chunks)
                for c in range(nc):
                    dq_pass(c * C, dq_scale, G, Dec, False, True)
                for ci in range(nc):
                    dkv_pass((nc - 1 - ci) * C, dq_scale, G, Dec, False, True)
                if two_way:
                    # keys strictly after each query: the mirror image, added to the gradients
                    clear_states()
                    for ci in range(nc):
                        dq_pass((nc - 1 - ci) * C, dq_scale, Gl, Decl, True, False)
                    for c in range(nc):
                        dkv_pass(c * C, dq_scale, Gl, Decl, True, False)
            else:
                # totals first (Sᵀ, z, R, r: two GEMMs a chunk, no transposed rows), Rᵀ from R once,
                # then every chunk against them
                for c in range(nc):
                    load_chunk(c * C, True, False)
                    fold_kv(G)
                    fold_qg(G, False)
                for m in range(M):
                    for d in range(D):
                        RT[d, m] = Rm[m, d]
                for c in range(nc):
                    load_chunk(c * C, False, True)
                    emit_dq(c * C, dq_scale, G, False, True)
                    emit_dkv(c * C, dq_scale, G, False, True)

    return kernel

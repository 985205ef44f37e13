"""Register tiles for the CPU kernels: vector widths, tile sizes, the accumulate-into-registers
GEMM idiom (`fill`, then `mm` / `mmc` streaming one operand and broadcasting the other), and the
chunk loaders (with in-register transposes) that the chunked kernels share."""
from __future__ import annotations

from tvm.script import tirx as T

from attndsl.schedules import cpu


def vector_lanes(dtype: str) -> int:
    """Elements per 512-bit vector register."""
    return 16 if dtype == "float32" else 8


def reg_rows(cols: int, lanes: int, cap: int, budget: int = 16) -> int:
    """Row tile for an accumulator (rows × cols): about `budget` vector registers (the tile_regs
    knob), a power of two ≤ cap."""
    regs = -(-cols // lanes)
    r = 1
    while r * 2 * regs <= budget and r * 2 <= cap:
        r *= 2
    return r


def pad(n: int, m: int) -> int:
    return -(-n // m) * m


def shuffle_idx(lanes: int, bit: int, hi: bool) -> list:
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
def mm_into(X, acc, A, a_t, B, row0, R, k0, k1, ncols):
    """X[row0 + r, :] += Σ_{k0 ≤ k < k1} A(row0 + r, k) B[k, :] for r < R, through the register
    tile acc: `mm` on rows of a 2-D buffer that keeps its sum."""
    for r in T.unroll(R):
        for j in T.vectorized(ncols):
            acc[r, j] = X[row0 + r, j]
    mm(acc, A, a_t, B, row0, R, k0, k1, ncols)
    for r in T.unroll(R):
        for j in T.vectorized(ncols):
            X[row0 + r, j] = acc[r, j]


@T.macro
def fill(acc, R, ncols):
    """Zero an R × ncols register tile."""
    for r in T.unroll(R):
        for j in T.vectorized(ncols):
            acc[r, j] = T.cast(0, acc.dtype)


def chunk_loaders(dtype: str, C: int, phi=None):
    """Chunk loaders shared by the kernels (closures over dtype, chunk C, vector width, and the
    fused elementwise map φ, a PrimExpr -> PrimExpr builder, when there is one)."""
    L = vector_lanes(dtype)
    zero = T.cast(0, dtype)
    stages = [(b, shuffle_idx(L, b, False), shuffle_idx(L, b, True)) for b in (8, 4, 2, 1) if b < L]

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

    @T.macro
    def load_f(dst, src, b, base, N, ncols):
        """load, then φ when one is fused."""
        load(dst, src, b, base, N, ncols)
        if phi is not None:
            phi_rows(dst, base, N, ncols)

    @T.macro
    def load_ft(dst, src, b, base, N, ncols, X, Y):
        """load_t, then φ when one is fused."""
        load_t(dst, src, b, base, N, ncols, X, Y)
        if phi is not None:
            phi_cols(dst, base, N, ncols)

    return L, zero, load, load_t, load_f, load_ft


def tile(dtype: str, knobs: dict | None = None, narrow: bool = False) -> int:
    """Query rows and keys per tile of the O(N²) kernels: the tile knob's vector registers of query
    lanes (schedules/knobs.py, family "quadratic"), or one register when `narrow` (the kernels a
    call of at most that many query rows takes: a wider tile would compute absent rows' scores)."""
    from attndsl.schedules.knobs import resolve
    return cpu.lanes(dtype) * (1 if narrow else resolve("quadratic", knobs)["tile"])


@T.macro
def mmc(acc, A, a_t, B, row0, R, k0, k1, col0, ncols):
    """acc[r, :] += Σ_{k0 ≤ k < k1} A(row0 + r, k) B[k, col0 + :] (A read as A[k, row] when
    a_t): `mm` on a window of B's columns."""
    for k in range(k0, k1):
        for r in T.unroll(R):
            for j in T.vectorized(ncols):
                if a_t:
                    acc[r, j] = acc[r, j] + A[k, row0 + r] * B[k, col0 + j]
                else:
                    acc[r, j] = acc[r, j] + A[row0 + r, k] * B[k, col0 + j]


@T.macro
def mm3(acc, A, a_t, B3, b, base, row0, R, k0, k1, col0, ncols):
    """acc[r, :] += Σ_{k0 ≤ k < k1} A(row0 + r, k) B3[b, base + k, col0 + :] (A read as A[k, row]
    when a_t): `mmc` with the streamed operand rows taken from a (BH, rows, cols) buffer."""
    for k in range(k0, k1):
        for r in T.unroll(R):
            for j in T.vectorized(ncols):
                if a_t:
                    acc[r, j] = acc[r, j] + A[k, row0 + r] * B3[b, base + k, col0 + j]
                else:
                    acc[r, j] = acc[r, j] + A[row0 + r, k] * B3[b, base + k, col0 + j]


@T.macro
def mm_cols(acc, A, B3, b, col0, row0, R, k0, k1, ncols):
    """acc[r, :] += Σ_k A[row0 + r, k] B3[b, k, col0 + :] (a column window of a transposed
    (BH, cols, N) operand)."""
    for k in range(k0, k1):
        for r in T.unroll(R):
            for j in T.vectorized(ncols):
                acc[r, j] = acc[r, j] + A[row0 + r, k] * B3[b, k, col0 + j]


def out_cols(width: int, lanes: int) -> int:
    """Columns of an output register tile: the largest divisor of `width` ≤ four vectors."""
    return max(c for c in range(1, min(width, 4 * lanes) + 1) if width % c == 0)


def flash_backward(Tt: int, causal: bool):
    """The accumulation steps of a flash-style backward (quadratic.py, pairwise.py) for one (key
    tile kt, query tile qt) of Tt rows each, with the weights of the tile transposed (P[j, i]),
    of which the first `rows` query rows exist (fewer than Tt in the last tile, or in a
    cross-attention call of few queries):

        key_rows(acc, Acc, P, X, b, qbase, rows, R, C, width, qt, kt)
            Acc[j, :] += Σ_i P[j, i] X[b, qbase + i, :]      (a key tile's rows; only i ≥ j on a
                                                             causal diagonal tile)
        query_rows(acc, Acc, P, Kc, b, qbase, rows, R, C, width, qt, kt)
            Acc[b, qbase + i, :] += Σ_j P[j, i] Kc[j, :]      (the query rows; only j ≤ i on it)

    through R × C register tiles acc, C columns of `width` at a time."""

    def last(i0, R, kt, qt):            # causal diagonal: rows i0*R.. see keys j < (i0+1)*R
        return T.Select(qt == kt, i0 * R + R, Tt) if causal else Tt

    @T.macro
    def key_rows(acc, Acc, P, X, b, qbase, rows, R, C, width, qt, kt):
        for j0, c0 in T.grid(Tt // R, width // C):
            for r in T.unroll(R):
                for d in T.vectorized(C):
                    acc[r, d] = Acc[j0 * R + r, c0 * C + d]
            if causal and qt == kt:
                mm3(acc, P, False, X, b, qbase, j0 * R, R, j0 * R, T.max(T.min(Tt, rows), T.int64(j0 * R)), c0 * C, C)
            else:
                mm3(acc, P, False, X, b, qbase, j0 * R, R, 0, T.min(Tt, rows), c0 * C, C)
            for r in T.unroll(R):
                for d in T.vectorized(C):
                    Acc[j0 * R + r, c0 * C + d] = acc[r, d]

    @T.macro
    def query_rows(acc, Acc, P, Kc, b, qbase, rows, R, C, width, qt, kt):
        for i0, c0 in T.grid(Tt // R, width // C):
            if T.int64(i0 * R) < rows:
                for r in T.unroll(R):
                    for c in T.vectorized(C):
                        acc[r, c] = Acc[b, qbase + i0 * R + r, c0 * C + c]
                mmc(acc, P, True, Kc, i0 * R, R, 0, last(i0, R, kt, qt), c0 * C, C)
                for r in T.unroll(R):
                    for c in T.vectorized(C):
                        Acc[b, qbase + i0 * R + r, c0 * C + c] = acc[r, c]

    return key_rows, query_rows

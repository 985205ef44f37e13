"""The forms as TE tensor expressions: target-independent kernels, scheduled for GPUs.

The CPU kernels (featuremap.py, linear.py, ...) are TVMScript written for one vector unit. These
are the same maths as dataflow — each stage a `te.compute` over whole tensors — with no
schedule: built as they are for llvm (how the tests check them against the reference on a
machine without a GPU), or scheduled by `schedules/cuda.py` (dlight's rules bind every stage to
thread blocks) for CUDA. Same names, signatures and outputs as the CPU kernels, so `attndsl.ops`
calls either.

Shapes: X (BH, N, Dk), W' (width, Dk), Wt = W'ᵀ, F (BH, N, width); Qf, Kf (BH, N, M),
V, O, dO (BH, N, D), DEN (BH, N); BH and N symbolic. Causal linear attention and the decayed form
are chunked (C rows, the `chunk` knob of schedules/knobs.py): per chunk c the state
Sc = Σ_t Kf_t ⊗ V_t, the exclusive prefix P_c = Σ_{c' < c} S_c' (a masked reduction over chunk
indices, O((N/C)²·M·D); decayed: weighted by powers of γ, and a second scan over later chunks
without a causal mask), and the C×C block inside the chunk — O(N·C·(M + D) + (N/C)²·M·D) work,
never an N×N tensor.
"""
from __future__ import annotations

import math

from tvm import te, tirx

from attndsl.expr import diff
from attndsl.schedules.knobs import defaults

from ..tir.expr import to_tir

CHUNK = defaults("portable_linear")["chunk"]    # rows per chunk of the causal, decayed and banded scans


def _i64(n: int) -> tirx.IntImm:
    """Constant extents as int64 like the symbolic ones (dlight refuses mixed-width bindings)."""
    return tirx.IntImm("int64", n)


def _dims():
    return tirx.Var("BH", "int64"), tirx.Var("N", "int64")


def _unused(name: str, dtype: str, ndim: int = 2):
    """An argument a kernel ignores (kept for the shared signature), of any `ndim`-d shape."""
    return te.placeholder(tuple(tirx.Var(f"{name}_{i}", "int64") for i in range(ndim)), dtype, name)


def _func(name: str, args: list):
    return te.create_prim_func(args).with_attr("global_symbol", name)


def _zero(dtype):
    return tirx.const(0, dtype)


# --- feature maps (featuremap.py's families; MapKernel carries the constants) ---------------------

def _raw(k, X, Wt, BH, N, dtype):
    """u = W'(c x) − |c x|²/2 (exp family) or W'(c x) (cos) when projected, else c x: (BH, N, width)."""
    c = tirx.const(k.c, dtype)
    if not k.projected:
        return te.compute((BH, N, _i64(k.width)), lambda b, i, w: X[b, i, w] * c, "u")
    d = te.reduce_axis((0, _i64(k.dk)), "d")
    proj = te.compute((BH, N, _i64(k.width)), lambda b, i, w: te.sum(X[b, i, d] * c * Wt[d, w], axis=d),
                      "proj")
    if k.family != "exp":
        return proj
    e = te.reduce_axis((0, _i64(k.dk)), "e")
    sq = te.compute((BH, N), lambda b, i: te.sum(X[b, i, e] * X[b, i, e], axis=e), "sq")
    half_c2 = tirx.const(0.5 * k.c * k.c, dtype)
    return te.compute((BH, N, _i64(k.width)), lambda b, i, w: proj[b, i, w] - sq[b, i] * half_c2, "u")


def _map_placeholders(k, dtype):
    BH, N = _dims()
    X = te.placeholder((BH, N, _i64(k.dk)), dtype, "x")
    W = te.placeholder((_i64(k.width), _i64(k.dk)), dtype, "w")
    Wt = te.placeholder((_i64(k.dk), _i64(k.width)), dtype, "wt")
    return BH, N, X, W, Wt


def _phase(w, width: int, dtype: str):
    """0 on the cos half of a trig map's columns, π/2 on the sin half — arithmetic, not a Select:
    TVM's CUDA codegen miscompiles a vectorized Select on an index (a bool vector into float2)."""
    return tirx.Cast(dtype, tirx.floordiv(w, _i64(width // 2))) * tirx.const(math.pi / 2, dtype)


def map_forward(name: str, k, role: str, dtype: str):
    """φ(x) for every family: (X, Wt, F out)."""
    BH, N, X, _, Wt = _map_placeholders(k, dtype)
    shape = (BH, N, _i64(k.width))
    if k.family == "elementwise":
        c = tirx.const(k.c, dtype)
        F = te.compute(shape, lambda b, i, w: to_tir(k.expr, X[b, i, w] * c, dtype), "f")
        return _func(name, [X, _unused("wt", dtype), F])
    u = _raw(k, X, Wt, BH, N, dtype)
    norm = tirx.const(k.norm, dtype)
    if k.family == "cos":                    # [cos u, sin u] halves: sin u = cos(u − π/2)
        F = te.compute(shape, lambda b, i, w: tirx.cos(u[b, i, w] - _phase(w, k.width, dtype)) * norm, "f")
        return _func(name, [X, Wt, F])
    w_ = te.reduce_axis((0, _i64(k.width)), "w_")
    if k.stabilize and role == "q":          # a row's max
        mx = te.compute((BH, N), lambda b, i: te.max(u[b, i, w_], axis=w_), "mx")
        F = te.compute(shape, lambda b, i, w: tirx.exp(u[b, i, w] - mx[b, i]) * norm, "f")
    elif k.stabilize and role == "k":        # one max per batch·head
        i_ = te.reduce_axis((0, N), "i_")
        mx = te.compute((BH,), lambda b: te.max(u[b, i_, w_], axis=[i_, w_]), "mx")
        F = te.compute(shape, lambda b, i, w: tirx.exp(u[b, i, w] - mx[b]) * norm, "f")
    else:
        F = te.compute(shape, lambda b, i, w: tirx.exp(u[b, i, w]) * norm, "f")
    return _func(name, [X, Wt if k.projected else _unused("wt", dtype), F])


def map_backward(name: str, k, dtype: str):
    """dx from dφ: (X, W', Wt, F, dF, dX out); see featuremap.py for each family's formula."""
    BH, N, X, W, Wt = _map_placeholders(k, dtype)
    wshape = (BH, N, _i64(k.width))
    xshape = (BH, N, _i64(k.dk))
    F = te.placeholder(wshape, dtype, "f")
    dF = te.placeholder(wshape, dtype, "df")
    c = tirx.const(k.c, dtype)
    if k.family == "elementwise":
        dexpr = diff(k.expr, "x")
        dX = te.compute(xshape, lambda b, i, d: to_tir(dexpr, X[b, i, d] * c, dtype) * c * dF[b, i, d], "dx")
        return _func(name, [X, _unused("w", dtype), _unused("wt", dtype), _unused("f", dtype, 3), dF, dX])
    if k.family == "cos":                    # g = dφ · d/du cos(u − phase) · norm
        u = _raw(k, X, Wt, BH, N, dtype)
        norm = tirx.const(-k.norm, dtype)
        g = te.compute(wshape, lambda b, i, w: dF[b, i, w] * norm * tirx.sin(
            u[b, i, w] - _phase(w, k.width, dtype)), "g")
        w_ = te.reduce_axis((0, _i64(k.width)), "w_")
        dX = te.compute(xshape, lambda b, i, d: te.sum(g[b, i, w_] * W[w_, d] * c, axis=w_), "dx")
        return _func(name, [X, W, Wt, _unused("f", dtype, 3), dF, dX])
    g = te.compute(wshape, lambda b, i, w: dF[b, i, w] * F[b, i, w], "g")
    if not k.projected:
        dX = te.compute(xshape, lambda b, i, d: g[b, i, d] * c, "dx")
        return _func(name, [X, _unused("w", dtype), _unused("wt", dtype), F, dF, dX])
    w1 = te.reduce_axis((0, _i64(k.width)), "w1")
    gs = te.compute((BH, N), lambda b, i: te.sum(g[b, i, w1], axis=w1), "gs")
    w2 = te.reduce_axis((0, _i64(k.width)), "w2")
    wg = te.compute(xshape, lambda b, i, d: te.sum(g[b, i, w2] * W[w2, d], axis=w2), "wg")
    dX = te.compute(xshape, lambda b, i, d: (wg[b, i, d] - X[b, i, d] * c * gs[b, i]) * c, "dx")
    return _func(name, [X, W, _unused("wt", dtype), F, dF, dX])


# --- linear attention (linear.py's maths: a_ij = w_ij Qf_i·Kf_j over j ∈ mask(i)) -----------------
#
# w_ij = 1, or for the decayed form γ_f^(i−j) (j ≤ i) and γ_b^(j−i) (j > i), γ = e^(−rate) per head.
# A *direction* (rate, later) says how a running state over chunks carries rows to another chunk:
# with i = c·C + t, j = c'·C + s and c' < c ("earlier" keys of a query),
#     γ^(i−j) = γ^(t+1) · γ^(C·(c−1−c')) · γ^(C−1−s)        (row · carry · fold)
# and mirrored for c' > c ("later"): γ^(j−i) = γ^(C−t) · γ^(C·(c'−c−1)) · γ^s. Rate None: γ = 1.

def _linear_inputs(M, D, dtype, phi, decayed):
    """Placeholders (qf, kf, v, tab), the mapped Qf, Kf (φ applied when fused) and the rates
    rate(b, later) = TAB[b mod H, later] of the decayed form (None otherwise)."""
    BH, N = _dims()
    q = te.placeholder((BH, N, _i64(M)), dtype, "qf")
    k = te.placeholder((BH, N, _i64(M)), dtype, "kf")
    v = te.placeholder((BH, N, _i64(D)), dtype, "v")
    if decayed:
        tab = te.placeholder((tirx.Var("H", "int64"), _i64(2)), dtype, "tab")

        def rate(b, later):
            return tab[tirx.floormod(b, tab.shape[0]), 1 if later else 0]
    else:
        tab, rate = _unused("tab", dtype), None
    if phi is None:
        return BH, N, q, k, v, tab, q, k, rate
    Qf = te.compute(q.shape, lambda b, i, m: phi(q[b, i, m]), "phi_q")
    Kf = te.compute(k.shape, lambda b, i, m: phi(k[b, i, m]), "phi_k")
    return BH, N, q, k, v, tab, Qf, Kf, rate


class _Dir:
    """One direction of the chunk scans: states of earlier (later=False) or later chunks, decayed
    by γ = e^(−rate(b, rate_later)) per row (rate None: γ = 1, and the weights are omitted)."""

    def __init__(self, rate, later: bool, rate_later: bool, C: int):
        self.rate, self.later, self.rate_later, self.C = rate, later, rate_later, C

    def _pow(self, b, k):
        """γ^k, k ≥ 0 an index expression (clamped at 0: a masked-out power never overflows)."""
        if self.rate is None:
            return None
        rate = self.rate(b, self.rate_later)
        return tirx.exp(-rate * tirx.Cast(rate.dtype, tirx.max(k, _i64(0))))

    def fold(self, b, s):
        return self._pow(b, s if self.later else _i64(self.C - 1) - s)

    def carry(self, b, c, c2):
        return self._pow(b, _i64(self.C) * ((c2 - c - 1) if self.later else (c - 1 - c2)))

    def row(self, b, t):
        return self._pow(b, (_i64(self.C) - t) if self.later else t + 1)


def _times(w, x):
    return x if w is None else w * x


def _chunked(X, N, dtype, name, chunk: int):
    """X (BH, N, w) as chunks (BH, nc, C, w), rows past N zero."""
    C = _i64(chunk)
    nc = tirx.floordiv(N + C - 1, C)
    return te.compute((X.shape[0], nc, C, X.shape[2]), lambda b, c, t, w: tirx.if_then_else(
        c * C + t < N, X[b, c * C + t, w], _zero(dtype)), name)


def _chunk_states(Ac, Bc, d: _Dir, name):
    """Per chunk Σ_t fold(t)·Ac[t, :] ⊗ Bc[t, :]: (BH, nc, wa, wb)."""
    t = te.reduce_axis((0, Ac.shape[2]), "t")
    BH, nc, _, wa = Ac.shape
    return te.compute((BH, nc, wa, Bc.shape[3]), lambda b, c, m, e: te.sum(
        _times(d.fold(b, t), Ac[b, c, t, m] * Bc[b, c, t, e]), axis=t), name)


def _chunk_sums(Ac, d: _Dir, name, weight=None):
    """Per chunk Σ_t fold(t)·weight[t]·Ac[t, :]: (BH, nc, wa)."""
    t = te.reduce_axis((0, Ac.shape[2]), "t")
    BH, nc, _, wa = Ac.shape
    return te.compute((BH, nc, wa), lambda b, c, m: te.sum(_times(d.fold(b, t), _times(
        None if weight is None else weight[b, c, t], Ac[b, c, t, m])), axis=t), name)


def _total_state(A, B, N, name):
    """Σ_n A[n, :] ⊗ B[n, :] over the whole sequence: (BH, wa, wb)."""
    n = te.reduce_axis((0, N), name + "_n")
    return te.compute((A.shape[0], A.shape[2], B.shape[2]), lambda b, m, e: te.sum(
        A[b, n, m] * B[b, n, e], axis=n), name)


def _total_sum(A, N, name, weight=None):
    """Σ_n weight[n]·A[n, :] over the whole sequence: (BH, wa)."""
    n = te.reduce_axis((0, N), name + "_n")
    return te.compute((A.shape[0], A.shape[2]), lambda b, m: te.sum(
        _times(None if weight is None else weight[b, n], A[b, n, m]), axis=n), name)


def _scanned(Ac, Bc, d: _Dir, name, weight=None):
    """(states, sums) of direction d: the exclusive scans of Σ Ac ⊗ Bc and Σ weight·Ac per chunk."""
    return (_scan(_chunk_states(Ac, Bc, d, name + "_chunk"), d, name),
            _scan(_chunk_sums(Ac, d, name + "z_chunk", weight=weight), d, name + "z"))


def _plus_rows(base, parts, C: int, name):
    """base + Σ_d row_d(t_i)·X_d over parts [(direction d, X_d)], X_d shaped like base (BH, N, ...)."""
    def body(*idx):
        b, i = idx[0], idx[1]
        acc = base[idx]
        for d, X in parts:
            acc = acc + _times(d.row(b, _chunk_of(i, C)[1]), X[idx])
        return acc
    return te.compute(base.shape, body, name)


def _scan(S, d: _Dir, name):
    """Exclusive scan over chunk indices: Σ_{c' < c} carry·S[c'] (Σ_{c' > c} when d.later)."""
    nc = S.shape[1]
    c2 = te.reduce_axis((0, nc), "c2")

    def term(b, c, idx):
        before = c2 > c if d.later else c2 < c
        return tirx.Select(before, _times(d.carry(b, c, c2), S[(b, c2, *idx)]), _zero(S.dtype))
    if len(S.shape) == 4:
        return te.compute(S.shape, lambda b, c, m, e: te.sum(term(b, c, (m, e)), axis=c2), name)
    return te.compute(S.shape, lambda b, c, m: te.sum(term(b, c, (m,)), axis=c2), name)


def _chunk_of(i, chunk: int):
    """(chunk index, row in the chunk) of row i."""
    C = _i64(chunk)
    return tirx.floordiv(i, C), tirx.floormod(i, C)


def _pair(rate, b, t, s, causal: bool):
    """The in-chunk weight of query row t and key row s: γ_f^(t−s) (s ≤ t), γ_b^(s−t) (s > t;
    causal: masked elsewhere, so 1); None when undecayed. Arithmetic, no Select (see _phase)."""
    if rate is None:
        return None
    af = rate(b, False)
    e = af * tirx.Cast(af.dtype, tirx.max(t - s, _i64(0)))
    if not causal:
        e = e + rate(b, True) * tirx.Cast(af.dtype, tirx.max(s - t, _i64(0)))
    return tirx.exp(-e)


def _contract(A, B, idx_a, idx_b, shape, width, name):
    """(BH, N, ·) = Σ_x A[idx_a(b, i, x)] · B[idx_b(b, i, x, ·)] over x < width."""
    x = te.reduce_axis((0, _i64(width)), name + "_x")
    return te.compute(shape, lambda b, i, e: te.sum(A[idx_a(b, i, x)] * B[idx_b(b, i, x, e)], axis=x), name)


def _in_chunk(Rows, Chunks, N, mask, name):
    """Rows i against the rows of i's chunk: (BH, N, C), Σ_w Rows[i, w]·Chunks[c_i, s, w],
    zero where mask(t_i, s) is false (mask None: every pair)."""
    w = te.reduce_axis((0, Rows.shape[2]), name + "_w")

    def body(b, i, s):
        c, t = _chunk_of(i, int(Chunks.shape[2]))
        prod = Rows[b, i, w] * Chunks[b, c, s, w]
        return prod if mask is None else tirx.Select(mask(t, s), prod, _zero(Rows.dtype))
    return te.compute((Rows.shape[0], N, Chunks.shape[2]), lambda b, i, s: te.sum(body(b, i, s), axis=w), name)


def _scans(rate, causal, C: int):
    """The key-side directions of a query (earlier keys; and later keys without a causal mask,
    decayed) and their mirrors, the query-side directions of a key (backward)."""
    keys = [_Dir(rate, False, False, C)] + ([_Dir(rate, True, True, C)] if not causal else [])
    queries = [_Dir(rate, True, False, C)] + ([_Dir(rate, False, True, C)] if not causal else [])
    return keys, queries


def linear_forward(name: str, M: int, D: int, dtype: str, causal: bool, phi=None, decayed=False,
                   chunk: int = CHUNK, eps: float | None = None):
    """(Qf, Kf, V, TAB, O out, DEN out): DEN_i = Σ_{j∈mask(i)} w_ij a_ij (+ eps), O_i = Σ w_ij a_ij V_j / DEN_i;
    TAB (H, 2) the decay rates (earlier, later) of the decayed form, else unused."""
    BH, N, q, k, v, tab, Qf, Kf, rate = _linear_inputs(M, D, dtype, phi, decayed)
    Mi, Di = _i64(M), _i64(D)
    if not (causal or decayed):            # one total state
        S, z = _total_state(Kf, v, N, "S"), _total_sum(Kf, N, "z")
        num = _contract(Qf, S, lambda b, i, x: (b, i, x), lambda b, i, x, e: (b, x, e), (BH, N, Di), M, "num")
        m2 = te.reduce_axis((0, Mi), "m2")
        den = te.compute((BH, N), lambda b, i: te.sum(Qf[b, i, m2] * z[b, m2], axis=m2), "den")
    else:                                   # chunk scans, one per direction
        C = chunk
        Kc, Vc = _chunked(Kf, N, dtype, "kc", C), _chunked(v, N, dtype, "vc", C)
        keys, _ = _scans(rate, causal, C)
        nums, dens = [], []
        for n_, d in enumerate(keys):
            P, Pz = _scanned(Kc, Vc, d, f"P{n_}")
            nums.append((d, _contract(Qf, P, lambda b, i, x: (b, i, x),
                                      lambda b, i, x, e: (b, _chunk_of(i, C)[0], x, e), (BH, N, Di), M, f"inter{n_}")))
            m2 = te.reduce_axis((0, Mi), f"m2_{n_}")
            dens.append((d, te.compute((BH, N), lambda b, i: te.sum(
                Qf[b, i, m2] * Pz[b, _chunk_of(i, C)[0], m2], axis=m2), f"den_inter{n_}")))
        A0 = _in_chunk(Qf, Kc, N, (lambda t, s: s <= t) if causal else None, "scores")
        A = A0 if rate is None else te.compute(A0.shape, lambda b, i, s: A0[b, i, s] * _pair(
            rate, b, _chunk_of(i, C)[1], s, causal), "scores_w")
        intra = _contract(A, Vc, lambda b, i, x: (b, i, x),
                          lambda b, i, x, e: (b, _chunk_of(i, C)[0], x, e), (BH, N, Di), C, "intra")
        s2 = te.reduce_axis((0, _i64(C)), "s2")
        den_a = te.compute((BH, N), lambda b, i: te.sum(A[b, i, s2], axis=s2), "den_intra")
        num, den = _plus_rows(intra, nums, C, "num"), _plus_rows(den_a, dens, C, "den")
    if eps:
        raw = den
        den = te.compute((BH, N), lambda b, i: raw[b, i] + tirx.const(eps, dtype), "den_floored")
    out = te.compute((BH, N, Di), lambda b, i, d: num[b, i, d] / den[b, i], "out")
    return _func(name, [q, k, v, tab, out, den])


def linear_backward(name: str, M: int, D: int, dtype: str, causal: bool, phi=None, dphi=None,
                    decayed=False, chunk: int = CHUNK):
    """(Qf, Kf, V, TAB, O, DEN, dO, dQf out, dKf out, dV out), linear.py's formulas: with
    g_i = dO_i/DEN_i, r_i = (dO_i·O_i)/DEN_i and b_ij = g_i·V_j − r_i over j ∈ mask(i):
    dQf_i = Σ_j w_ij b_ij Kf_j,  dKf_j = Σ_{i∋j} w_ij b_ij Qf_i,  dV_j = Σ_{i∋j} w_ij (Qf_i·Kf_j) g_i;
    with φ fused the outputs are d(raw q) = dQf ⊙ dφ(q), d(raw k) likewise. The rates get no
    gradient (they are not parameters)."""
    BH, N, q, k, v, tab, Qf, Kf, rate = _linear_inputs(M, D, dtype, phi, decayed)
    Mi, Di = _i64(M), _i64(D)
    O = te.placeholder((BH, N, Di), dtype, "o")
    DEN = te.placeholder((BH, N), dtype, "den")
    dO = te.placeholder((BH, N, Di), dtype, "do")
    g = te.compute((BH, N, Di), lambda b, i, d: dO[b, i, d] / DEN[b, i], "g")
    d0 = te.reduce_axis((0, Di), "d0")
    r = te.compute((BH, N), lambda b, i: te.sum(dO[b, i, d0] * O[b, i, d0] / DEN[b, i], axis=d0), "r")
    d1, d2, m1 = (te.reduce_axis((0, e), n) for e, n in ((Di, "d1"), (Di, "d2"), (Mi, "m1")))
    if not (causal or decayed):
        S, z = _total_state(Kf, v, N, "S"), _total_sum(Kf, N, "z")
        dS, dz = _total_state(Qf, g, N, "dS"), _total_sum(Qf, N, "dz", weight=r)
        sg = te.compute(Qf.shape, lambda b, i, m: te.sum(S[b, m, d1] * g[b, i, d1], axis=d1), "sg")
        dsv = te.compute(Kf.shape, lambda b, j, m: te.sum(dS[b, m, d2] * v[b, j, d2], axis=d2), "dsv")
        dQf = te.compute(Qf.shape, lambda b, i, m: sg[b, i, m] - r[b, i] * z[b, m], "dqf")
        dKf = te.compute(Kf.shape, lambda b, j, m: dsv[b, j, m] - dz[b, m], "dkf")
        dV = te.compute(v.shape, lambda b, j, d: te.sum(Kf[b, j, m1] * dS[b, m1, d], axis=m1), "dv_")
    else:
        C, Ci = chunk, _i64(chunk)
        Qc, Kc, Vc = (_chunked(X, N, dtype, n, C) for X, n in ((Qf, "qc"), (Kf, "kc"), (v, "vc")))
        gc = _chunked(g, N, dtype, "gc", C)
        rc = te.compute(gc.shape[:3], lambda b, c, t: tirx.if_then_else(
            c * Ci + t < N, r[b, c * Ci + t], _zero(dtype)), "rc")
        cq = lambda i: _chunk_of(i, C)[0]                                       # noqa: E731
        at_c = lambda b, i, x, e: (b, cq(i), x, e)                           # noqa: E731
        own = lambda b, i, x: (b, i, x)                                      # noqa: E731
        keys, queries = _scans(rate, causal, C)
        q_parts, k_parts, v_parts = [], [], []
        for n_, d in enumerate(keys):      # states of the keys a query sees: dQf
            P, Pz = _scanned(Kc, Vc, d, f"P{n_}")
            pg = _contract(g, P, own, lambda b, i, x, m: (b, cq(i), m, x), Qf.shape, D, f"pg{n_}")
            q_parts.append((d, te.compute(Qf.shape, lambda b, i, m: pg[b, i, m] - r[b, i] * Pz[b, cq(i), m],
                                          f"dq_inter{n_}")))
        for n_, d in enumerate(queries):   # states of the queries that see a key: dKf, dV
            R, Rz = _scanned(Qc, gc, d, f"R{n_}", weight=rc)
            rv = _contract(v, R, own, lambda b, j, x, m: (b, cq(j), m, x), Kf.shape, D, f"rv{n_}")
            k_parts.append((d, te.compute(Kf.shape, lambda b, j, m: rv[b, j, m] - Rz[b, cq(j), m],
                                          f"dk_inter{n_}")))
            v_parts.append((d, _contract(Kf, R, own, at_c, v.shape, M, f"dv_inter{n_}")))
        # b_is for the keys s of i's chunk, and b_tj for the queries t of j's chunk (masked, weighted)
        rows_mask = (lambda t, s: s <= t) if causal else None
        cols_mask = (lambda s, t: t >= s) if causal else None
        gv_q = _in_chunk(g, Vc, N, None, "gv_rows")
        gv_k = _in_chunk(v, gc, N, None, "gv_cols")
        Ak0 = _in_chunk(Kf, Qc, N, cols_mask, "a_cols")

        def masked(keep, x):
            return x if keep is None else tirx.Select(keep, x, _zero(dtype))

        def pair_rows(b, i, s):            # query i, key s of its chunk
            return _pair(rate, b, _chunk_of(i, C)[1], s, causal)

        def pair_cols(b, j, t):            # key j, query t of its chunk
            return _pair(rate, b, t, _chunk_of(j, C)[1], causal)
        Bq = te.compute((BH, N, Ci), lambda b, i, s: _times(pair_rows(b, i, s), masked(
            None if rows_mask is None else rows_mask(_chunk_of(i, C)[1], s), gv_q[b, i, s] - r[b, i])), "b_rows")
        Bk = te.compute((BH, N, Ci), lambda b, j, t: _times(pair_cols(b, j, t), masked(
            None if cols_mask is None else cols_mask(_chunk_of(j, C)[1], t), gv_k[b, j, t] - rc[b, cq(j), t])),
            "b_cols")
        Ak = Ak0 if rate is None else te.compute(Ak0.shape, lambda b, j, t: Ak0[b, j, t] * pair_cols(b, j, t),
                                                 "a_cols_w")
        dq_in = _contract(Bq, Kc, own, at_c, Qf.shape, C, "dq_intra")
        dk_in = _contract(Bk, Qc, own, at_c, Kf.shape, C, "dk_intra")
        dv_in = _contract(Ak, gc, own, at_c, v.shape, C, "dv_intra")

        dQf = _plus_rows(dq_in, q_parts, C, "dqf")
        dKf = _plus_rows(dk_in, k_parts, C, "dkf")
        dV = _plus_rows(dv_in, v_parts, C, "dv_")
    if phi is not None:
        dQf = te.compute(q.shape, lambda b, i, m: dQf[b, i, m] * dphi(q[b, i, m]), "dq")
        dKf = te.compute(k.shape, lambda b, j, m: dKf[b, j, m] * dphi(k[b, j, m]), "dk")
    return _func(name, [q, k, v, tab, O, DEN, dO, dQf, dKf, dV])


# --- banded + constant (banded.py's maths for a table clipped at W) -------------------------------
#
# c(r) = c₊ = c(W) for r ≥ W, c₋ = c(−W) for r ≤ −W (0 when causal), the table inside (|r| < W).
# With v̄ = [v, 1], a query i sums the band |i − j| < W pair by pair, indexed by offset r = i − j
# (so the table's gradient is a sum per offset), and the far keys j ≤ i − W and j ≥ i + W through
# chunk prefix states shifted by W:
#     Σ_j c(i−j) κ_ij v̄_j = Σ_{|r|<W} c(r) κ_{i,i−r} v̄_{i−r} + c₊ F_<(i − W) + c₋ F_>(i + W)
# F_<(p) = φq_i·Σ_{j ≤ p} φk_j⊗v̄_j = φq_i·P[chunk(p)] + Σ_{s ≤ t(p)} (φq_i·φk_s) v̄_s over p's
# chunk (F_> mirrored). O(N·W·(M + D)) for the band, O(N·C·(M + D) + (N/C)²·M·D) for the rest.

def _ones_col(X, dtype, name, sign=1.0, extra=None):
    """[X, sign·extra] (BH, N, w + 1): X with one more column, `extra` (BH, N) or 1."""
    w = X.shape[2]
    last = (lambda b, i: tirx.const(sign, dtype)) if extra is None else (
        lambda b, i: extra[b, i] * tirx.const(sign, dtype))
    return te.compute((X.shape[0], X.shape[1], w + 1), lambda b, i, e: tirx.if_then_else(
        e < w, X[b, i, tirx.min(e, w - 1)], last(b, i)), name)


def _clamp(x, hi):
    """x clipped to [0, hi]: an index that is safe to read (masked where it was outside)."""
    return tirx.max(tirx.min(x, hi), _i64(0))


def _far(Rows, X, Y, N, pos, later: bool, C: int, name):
    """F[b, i, :] = Σ_{j ≤ p} (Rows_i·X_j) Y_j, p = pos(i) (later: over j ≥ p); zero where p is
    outside [0, N). Chunk states of X⊗Y, their exclusive scan, and p's chunk row by row."""
    dtype = Rows.dtype
    Xc, Yc = _chunked(X, N, dtype, name + "_xc", C), _chunked(Y, N, dtype, name + "_yc", C)
    d = _Dir(None, later, later, C)
    P = _scan(_chunk_states(Xc, Yc, d, name + "_chunk"), d, name + "_scan")
    BH, Ci = Rows.shape[0], _i64(C)

    def at(i):                     # (valid, chunk, row) of p = pos(i)
        p = pos(i)
        pc = _clamp(p, N - 1)
        return tirx.And(p >= 0, p < N), tirx.floordiv(pc, Ci), tirx.floormod(pc, Ci)
    w = te.reduce_axis((0, Rows.shape[2]), name + "_w")

    def score(b, i, s):
        ok, c, t = at(i)
        keep = tirx.And(ok, s >= t if later else s <= t)
        return te.sum(tirx.Select(keep, Rows[b, i, w] * Xc[b, c, s, w], _zero(dtype)), axis=w)
    A = te.compute((BH, N, Ci), score, name + "_scores")
    s2 = te.reduce_axis((0, Ci), name + "_s")
    intra = te.compute((BH, N, Y.shape[2]), lambda b, i, e: te.sum(
        A[b, i, s2] * Yc[b, at(i)[1], s2, e], axis=s2), name + "_intra")
    w2 = te.reduce_axis((0, Rows.shape[2]), name + "_w2")
    inter = te.compute((BH, N, Y.shape[2]), lambda b, i, e: te.sum(tirx.Select(
        at(i)[0], Rows[b, i, w2] * P[b, at(i)[1], w2, e], _zero(dtype)), axis=w2), name + "_inter")
    return te.compute(intra.shape, lambda b, i, e: intra[b, i, e] + inter[b, i, e], name)


class _Band:
    """The table's geometry: W = (P − 1)/2, the offsets u < U of the band (r = u when causal, else
    r = u − (Wn − 1), Wn = min(W, N)) and the weights c = exp(b − max b) over the r that occur
    (clamped at 1: an entry no r reaches may exceed the max; it multiplies 0)."""

    def __init__(self, TAB, BH, N, causal: bool, dtype: str):
        H, P = TAB.shape
        self.TAB, self.N, self.causal, self.dtype = TAB, N, causal, dtype
        self.W = tirx.floordiv(P - 1, _i64(2))
        self.Wn = tirx.min(self.W, N)
        self.U = self.Wn if causal else 2 * self.Wn - 1

        def occurs(r):
            return tirx.And(r >= 0, r < N) if causal else tirx.And(r > -N, r < N)
        # per batch·head, not per head: an intermediate indexed by bh mod H would be compacted by
        # TVM to a size that depends on the thread indices
        t = te.reduce_axis((0, P), "t")
        self.mx = mx = te.compute((BH,), lambda b: te.max(tirx.Select(
            occurs(t - self.W), TAB[tirx.floormod(b, H), t], tirx.min_value(dtype)), axis=t), "tab_max")
        self.cw = te.compute((BH, P), lambda b, p: tirx.exp(tirx.min(
            TAB[tirx.floormod(b, H), p] - mx[b], _zero(dtype))), "cw")

    def r(self, u):
        return u if self.causal else u - (self.Wn - 1)

    def c(self, b, u):
        """c(r(u)) of batch·head b."""
        return self.cw[b, self.r(u) + self.W]

    def far(self, b, later: bool):
        """c₊ (keys at r ≥ W) or c₋ (r ≤ −W; 0 when causal)."""
        if later and self.causal:
            return _zero(self.dtype)
        return self.cw[b, 0 if later else 2 * self.W]

    def other(self, i, u, sign: int):
        """(valid, clamped index) of row i − sign·r(u): the key of query i (sign 1) or the query
        of key i (sign −1)."""
        j = i - sign * self.r(u)
        return tirx.And(j >= 0, j < self.N), _clamp(j, self.N - 1)

    def pairs(self, A, B, sign: int, name):
        """(BH, N, U): Σ_w A[i, w]·B[i − sign·r(u), w], zero where that row is outside."""
        w = te.reduce_axis((0, A.shape[2]), name + "_w")

        def body(b, i, u):
            ok, j = self.other(i, u, sign)
            return te.sum(tirx.Select(ok, A[b, i, w] * B[b, j, w], _zero(self.dtype)), axis=w)
        return te.compute((A.shape[0], self.N, self.U), body, name)

    def gather(self, S, X, sign: int, name):
        """(BH, N, w): Σ_u S[row, u]·X[other row, :] — with sign 1, S indexed by this query and X by
        its keys; with sign −1, S and X both indexed by the query i = j + r(u) of key j."""
        u = te.reduce_axis((0, self.U), name + "_u")

        def body(b, i, e):
            ok, j = self.other(i, u, sign)
            s = S[b, i, u] if sign == 1 else S[b, j, u]
            return te.sum(tirx.Select(ok, s * X[b, j, e], _zero(self.dtype)), axis=u)
        return te.compute((X.shape[0], self.N, X.shape[2]), body, name)


def _banded_inputs(M, D, dtype):
    BH, N = _dims()
    q = te.placeholder((BH, N, _i64(M)), dtype, "qf")
    k = te.placeholder((BH, N, _i64(M)), dtype, "kf")
    v = te.placeholder((BH, N, _i64(D)), dtype, "v")
    tab = te.placeholder((tirx.Var("H", "int64"), tirx.Var("P", "int64")), dtype, "tab")
    return BH, N, q, k, v, tab


def _weighted_sum(parts, shape, name):
    """Σ over parts [(c(b) or None, X)] of c·X, X (BH, N, w)."""
    def body(b, i, e):
        acc = None
        for w, X in parts:
            term = _times(w(b) if w is not None else None, X[b, i, e])
            acc = term if acc is None else acc + term
        return acc
    return te.compute(shape, body, name)


def banded_forward(name: str, M: int, D: int, dtype: str, causal: bool, chunk: int = CHUNK,
                   eps: float | None = None, far: bool = True):
    """(Qf, Kf, V, TAB, O out, DEN out): DEN_i = Σ_j c(i−j) κ_ij (+ eps·exp(−max TAB)),
    O_i = Σ_j c(i−j) κ_ij V_j / DEN_i; TAB (H, 2W+1) the learned table, c = exp(TAB − max) clipped at ±W.
    `far` False: the keys beyond ±W weigh 0 (a sliding window), no chunk prefix sums."""
    BH, N, q, k, v, tab = _banded_inputs(M, D, dtype)
    band = _Band(tab, BH, N, causal, dtype)
    Vb = _ones_col(v, dtype, "vb")
    kappa = band.pairs(q, k, 1, "kappa")
    A = te.compute(kappa.shape, lambda b, i, u: band.c(b, u) * kappa[b, i, u], "a")
    parts = [(None, band.gather(A, Vb, 1, "near"))]
    if far:
        parts.append((lambda b: band.far(b, False), _far(q, k, Vb, N, lambda i: i - band.W, False, chunk, "before")))
    if far and not causal:
        parts.append((lambda b: band.far(b, True), _far(q, k, Vb, N, lambda i: i + band.W, True, chunk, "after")))
    num = _weighted_sum(parts, (BH, N, _i64(D + 1)), "num")
    if eps:                                 # eps in the units of c: eps·exp(−max TAB)
        log_eps = tirx.const(math.log(eps), dtype)
        den = te.compute((BH, N), lambda b, i: num[b, i, D] + tirx.exp(log_eps - band.mx[b]), "den")
    else:
        den = te.compute((BH, N), lambda b, i: num[b, i, D], "den")
    out = te.compute((BH, N, _i64(D)), lambda b, i, d: num[b, i, d] / den[b, i], "out")
    return _func(name, [q, k, v, tab, out, den])


def banded_backward(name: str, M: int, D: int, dtype: str, causal: bool, chunk: int = CHUNK, far: bool = True):
    """(Qf, Kf, V, TAB, O, DEN, dO, dQf out, dKf out, dV out, dTAB out). With g_i = dO_i/DEN_i,
    r_i = (dO_i·O_i)/DEN_i, b_ij = g_i·V_j − r_i = ḡ_i·v̄_j (ḡ = [g, −r]) and w_ij = c(i − j):
        dQf_i = Σ_j w_ij b_ij Kf_j,  dKf_j = Σ_i w_ij b_ij Qf_i,  dV_j = Σ_i w_ij κ_ij g_i,
        dTAB[h, r + W] = c(r) Σ_{bh ≡ h} Σ_{i − j = r} κ_ij b_ij  (band offsets; the far slots 2W and 0
    collect c₊ Σ_i Qf_i·F_<(i) and c₋ Σ_i Qf_i·F_>(i) of dQf's far parts; none when not `far`)."""
    BH, N, q, k, v, tab = _banded_inputs(M, D, dtype)
    Mi, Di = _i64(M), _i64(D)
    O = te.placeholder((BH, N, Di), dtype, "o")
    DEN = te.placeholder((BH, N), dtype, "den")
    dO = te.placeholder((BH, N, Di), dtype, "do")
    band = _Band(tab, BH, N, causal, dtype)
    g = te.compute((BH, N, Di), lambda b, i, d: dO[b, i, d] / DEN[b, i], "g")
    d0 = te.reduce_axis((0, Di), "d0")
    r = te.compute((BH, N), lambda b, i: te.sum(dO[b, i, d0] * O[b, i, d0] / DEN[b, i], axis=d0), "r")
    gb, Vb = _ones_col(g, dtype, "gb", -1.0, r), _ones_col(v, dtype, "vb")
    # the band, by offset: κ and b for query i and its key i − r(u)
    kappa = band.pairs(q, k, 1, "kappa")
    bq = band.pairs(gb, Vb, 1, "b_band")
    Bw = te.compute(kappa.shape, lambda b, i, u: band.c(b, u) * bq[b, i, u], "bw")
    Aw = te.compute(kappa.shape, lambda b, i, u: band.c(b, u) * kappa[b, i, u], "aw")
    sides = [(False, lambda b: band.far(b, False))] + ([] if causal else [(True, lambda b: band.far(b, True))])
    sides = sides if far else []
    shift = {False: lambda i: i - band.W, True: lambda i: i + band.W}    # a query's far keys from p
    mirror = {False: lambda j: j + band.W, True: lambda j: j - band.W}   # a key's far queries from p
    q_parts, k_parts, v_parts, fars = [(None, band.gather(Bw, k, 1, "dq_band"))], \
        [(None, band.gather(Bw, q, -1, "dk_band"))], [(None, band.gather(Aw, g, -1, "dv_band"))], []
    for later, c in sides:
        tag = "after" if later else "before"
        Fq = _far(gb, Vb, k, N, shift[later], later, chunk, f"dq_{tag}")
        q_parts.append((c, Fq))
        k_parts.append((c, _far(Vb, gb, q, N, mirror[later], not later, chunk, f"dk_{tag}")))
        v_parts.append((c, _far(k, q, g, N, mirror[later], not later, chunk, f"dv_{tag}")))
        i_, m_ = te.reduce_axis((0, N), f"i_{tag}"), te.reduce_axis((0, Mi), f"m_{tag}")
        fars.append((later, c, te.compute((BH,), lambda b: te.sum(q[b, i_, m_] * Fq[b, i_, m_], axis=[i_, m_]),
                                          f"far_{tag}")))
    dQf = _weighted_sum(q_parts, q.shape, "dqf")
    dKf = _weighted_sum(k_parts, k.shape, "dkf")
    dV = _weighted_sum(v_parts, v.shape, "dv_")
    # the table: per offset over (bh, i), then per slot over the batch·heads of a head
    i2 = te.reduce_axis((0, N), "i2")
    E = te.compute((BH, band.U), lambda b, u: te.sum(kappa[b, i2, u] * Bw[b, i2, u], axis=i2), "e_band")
    H, P = tab.shape
    per_h = te.reduce_axis((0, tirx.floordiv(BH, H)), "per_h")

    def slot(h, t):
        rr = t - band.W
        u = rr if causal else rr + band.Wn - 1
        inside = tirx.And(rr >= 0, rr < band.Wn) if causal else tirx.And(rr > -band.Wn, rr < band.Wn)
        val = tirx.Select(inside, E[per_h * H + h, _clamp(u, band.U - 1)], _zero(dtype))
        for later, c, F in fars:
            at = t == (0 if later else 2 * band.W)
            val = val + tirx.Select(at, c(per_h * H + h) * F[per_h * H + h], _zero(dtype))
        return te.sum(val, axis=per_h)
    dTAB = te.compute((H, P), slot, "dtab")
    return _func(name, [q, k, v, tab, O, DEN, dO, dQf, dKf, dV, dTAB])

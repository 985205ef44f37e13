"""The forms as TE tensor expressions: target-independent kernels, scheduled for GPUs.

The CPU kernels (featuremap.py, linear.py, ...) are TVMScript written for one vector unit. These
are the same maths as dataflow — each stage a `te.compute` over whole tensors — with no
schedule: built as they are for llvm (how the tests check them against the reference on a
machine without a GPU), or scheduled by `schedules/cuda.py` (dlight's rules bind every stage to
thread blocks) for CUDA. Same names, signatures and outputs as the CPU kernels, so `attndsl.ops`
calls either.

Shapes: X (BH, N, Dk), W' (width, Dk), Wt = W'ᵀ, F (BH, N, width); Qf, Kf (BH, N, M),
V, O, dO (BH, N, D), DEN (BH, N); BH and N symbolic. Causal linear attention is chunked (C rows):
per chunk c the state Sc = Σ_t Kf_t ⊗ V_t, the exclusive prefix P_c = Σ_{c' < c} S_c' (a masked
reduction over chunk indices, O((N/C)²·M·D)), and the masked C×C block inside the chunk —
O(N·C·(M + D) + (N/C)²·M·D) work, never an N×N tensor.
"""
from __future__ import annotations

import math

from tvm import te, tirx

from attndsl.expr import diff

from .expr_tir import to_tir

CHUNK = 64          # rows per chunk of the causal forms


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


# --- linear attention (linear.py's maths: a_ij = Qf_i·Kf_j over j ∈ mask(i)) ------------------------

def _linear_inputs(M, D, dtype, phi):
    """Placeholders (qf, kf, v, tab) and the mapped Qf, Kf (φ applied when fused)."""
    BH, N = _dims()
    q = te.placeholder((BH, N, _i64(M)), dtype, "qf")
    k = te.placeholder((BH, N, _i64(M)), dtype, "kf")
    v = te.placeholder((BH, N, _i64(D)), dtype, "v")
    if phi is None:
        return BH, N, q, k, v, q, k
    Qf = te.compute(q.shape, lambda b, i, m: phi(q[b, i, m]), "phi_q")
    Kf = te.compute(k.shape, lambda b, i, m: phi(k[b, i, m]), "phi_k")
    return BH, N, q, k, v, Qf, Kf


def _chunked(X, N, dtype, name):
    """X (BH, N, w) as chunks (BH, nc, C, w), rows past N zero."""
    C = _i64(CHUNK)
    nc = tirx.floordiv(N + C - 1, C)
    return te.compute((X.shape[0], nc, C, X.shape[2]), lambda b, c, t, w: tirx.if_then_else(
        c * C + t < N, X[b, c * C + t, w], _zero(dtype)), name)


def _chunk_states(Ac, Bc, name):
    """Per chunk Σ_t Ac[t, :] ⊗ Bc[t, :]: (BH, nc, wa, wb)."""
    t = te.reduce_axis((0, _i64(CHUNK)), "t")
    BH, nc, _, wa = Ac.shape
    return te.compute((BH, nc, wa, Bc.shape[3]), lambda b, c, m, d: te.sum(Ac[b, c, t, m] * Bc[b, c, t, d],
                                                                           axis=t), name)


def _chunk_sums(Ac, name, weight=None):
    """Per chunk Σ_t weight[t]·Ac[t, :]: (BH, nc, wa)."""
    t = te.reduce_axis((0, _i64(CHUNK)), "t")
    BH, nc, _, wa = Ac.shape
    if weight is None:
        return te.compute((BH, nc, wa), lambda b, c, m: te.sum(Ac[b, c, t, m], axis=t), name)
    return te.compute((BH, nc, wa), lambda b, c, m: te.sum(weight[b, c, t] * Ac[b, c, t, m], axis=t), name)


def _scan(S, name, later: bool):
    """Exclusive prefix over chunk indices: Σ_{c' < c} S[c'] (or Σ_{c' > c} when `later`)."""
    nc = S.shape[1]
    c2 = te.reduce_axis((0, nc), "c2")

    def before(c2, c):
        return c2 > c if later else c2 < c
    if len(S.shape) == 4:
        return te.compute(S.shape, lambda b, c, m, d: te.sum(
            tirx.Select(before(c2, c), S[b, c2, m, d], _zero(S.dtype)), axis=c2), name)
    return te.compute(S.shape, lambda b, c, m: te.sum(
        tirx.Select(before(c2, c), S[b, c2, m], _zero(S.dtype)), axis=c2), name)


def _chunk_of(i):
    C = _i64(CHUNK)
    return tirx.floordiv(i, C), tirx.floormod(i, C)


def linear_forward(name: str, M: int, D: int, dtype: str, causal: bool, phi=None):
    """(Qf, Kf, V, TAB (unused), O out, DEN out): DEN_i = Σ_{j∈mask(i)} a_ij, O_i = Σ a_ij V_j / DEN_i."""
    BH, N, q, k, v, Qf, Kf = _linear_inputs(M, D, dtype, phi)
    Mi, Di = _i64(M), _i64(D)
    if not causal:
        n = te.reduce_axis((0, N), "n")
        S = te.compute((BH, Mi, Di), lambda b, m, d: te.sum(Kf[b, n, m] * v[b, n, d], axis=n), "S")
        n2 = te.reduce_axis((0, N), "n2")
        z = te.compute((BH, Mi), lambda b, m: te.sum(Kf[b, n2, m], axis=n2), "z")
        m1, m2 = te.reduce_axis((0, Mi), "m1"), te.reduce_axis((0, Mi), "m2")
        num = te.compute((BH, N, Di), lambda b, i, d: te.sum(Qf[b, i, m1] * S[b, m1, d], axis=m1), "num")
        den = te.compute((BH, N), lambda b, i: te.sum(Qf[b, i, m2] * z[b, m2], axis=m2), "den")
    else:
        Kc, Vc = _chunked(Kf, N, dtype, "kc"), _chunked(v, N, dtype, "vc")
        P = _scan(_chunk_states(Kc, Vc, "s_chunk"), "P", later=False)
        Pz = _scan(_chunk_sums(Kc, "z_chunk"), "Pz", later=False)
        s = te.reduce_axis((0, _i64(CHUNK)), "s")
        m0 = te.reduce_axis((0, Mi), "m0")
        A = te.compute((BH, N, _i64(CHUNK)), lambda b, i, t: te.sum(tirx.Select(
            t <= _chunk_of(i)[1], Qf[b, i, m0] * Kc[b, _chunk_of(i)[0], t, m0], _zero(dtype)), axis=m0),
            "scores")
        m1, m2 = te.reduce_axis((0, Mi), "m1"), te.reduce_axis((0, Mi), "m2")
        inter = te.compute((BH, N, Di), lambda b, i, d: te.sum(
            Qf[b, i, m1] * P[b, _chunk_of(i)[0], m1, d], axis=m1), "inter")
        intra = te.compute((BH, N, Di), lambda b, i, d: te.sum(
            A[b, i, s] * Vc[b, _chunk_of(i)[0], s, d], axis=s), "intra")
        num = te.compute((BH, N, Di), lambda b, i, d: inter[b, i, d] + intra[b, i, d], "num")
        s2 = te.reduce_axis((0, _i64(CHUNK)), "s2")
        den_a = te.compute((BH, N), lambda b, i: te.sum(A[b, i, s2], axis=s2), "den_intra")
        den_p = te.compute((BH, N), lambda b, i: te.sum(
            Qf[b, i, m2] * Pz[b, _chunk_of(i)[0], m2], axis=m2), "den_inter")
        den = te.compute((BH, N), lambda b, i: den_p[b, i] + den_a[b, i], "den")
    out = te.compute((BH, N, Di), lambda b, i, d: num[b, i, d] / den[b, i], "out")
    return _func(name, [q, k, v, _unused("tab", dtype), out, den])


def linear_backward(name: str, M: int, D: int, dtype: str, causal: bool, phi=None, dphi=None):
    """(Qf, Kf, V, TAB, O, DEN, dO, dQf out, dKf out, dV out), linear.py's formulas: with
    g_i = dO_i/DEN_i, r_i = (dO_i·O_i)/DEN_i and b_ij = g_i·V_j − r_i over j ∈ mask(i):
    dQf_i = Σ_j b_ij Kf_j,  dKf_j = Σ_{i∋j} b_ij Qf_i,  dV_j = Σ_{i∋j} (Qf_i·Kf_j) g_i;
    with φ fused the outputs are d(raw q) = dQf ⊙ dφ(q), d(raw k) likewise."""
    BH, N, q, k, v, Qf, Kf = _linear_inputs(M, D, dtype, phi)
    Mi, Di = _i64(M), _i64(D)
    O = te.placeholder((BH, N, Di), dtype, "o")
    DEN = te.placeholder((BH, N), dtype, "den")
    dO = te.placeholder((BH, N, Di), dtype, "do")
    g = te.compute((BH, N, Di), lambda b, i, d: dO[b, i, d] / DEN[b, i], "g")
    d0 = te.reduce_axis((0, Di), "d0")
    r = te.compute((BH, N), lambda b, i: te.sum(dO[b, i, d0] * O[b, i, d0] / DEN[b, i], axis=d0), "r")
    d1, d2, m1 = (te.reduce_axis((0, e), n) for e, n in ((Di, "d1"), (Di, "d2"), (Mi, "m1")))
    if not causal:
        n = te.reduce_axis((0, N), "n")
        S = te.compute((BH, Mi, Di), lambda b, m, d: te.sum(Kf[b, n, m] * v[b, n, d], axis=n), "S")
        n2 = te.reduce_axis((0, N), "n2")
        z = te.compute((BH, Mi), lambda b, m: te.sum(Kf[b, n2, m], axis=n2), "z")
        n3 = te.reduce_axis((0, N), "n3")
        dS = te.compute((BH, Mi, Di), lambda b, m, d: te.sum(Qf[b, n3, m] * g[b, n3, d], axis=n3), "dS")
        n4 = te.reduce_axis((0, N), "n4")
        dz = te.compute((BH, Mi), lambda b, m: te.sum(r[b, n4] * Qf[b, n4, m], axis=n4), "dz")
        sg = te.compute(Qf.shape, lambda b, i, m: te.sum(S[b, m, d1] * g[b, i, d1], axis=d1), "sg")
        dsv = te.compute(Kf.shape, lambda b, j, m: te.sum(dS[b, m, d2] * v[b, j, d2], axis=d2), "dsv")
        dQf = te.compute(Qf.shape, lambda b, i, m: sg[b, i, m] - r[b, i] * z[b, m], "dqf")
        dKf = te.compute(Kf.shape, lambda b, j, m: dsv[b, j, m] - dz[b, m], "dkf")
        dV = te.compute(v.shape, lambda b, j, d: te.sum(Kf[b, j, m1] * dS[b, m1, d], axis=m1), "dv_")
    else:
        C = _i64(CHUNK)
        Qc, Kc, Vc = (_chunked(X, N, dtype, n) for X, n in ((Qf, "qc"), (Kf, "kc"), (v, "vc")))
        gc = _chunked(g, N, dtype, "gc")
        rc = te.compute(gc.shape[:3], lambda b, c, t: tirx.if_then_else(
            c * C + t < N, r[b, c * C + t], _zero(dtype)), "rc")
        P = _scan(_chunk_states(Kc, Vc, "s_chunk"), "P", later=False)        # earlier keys
        Pz = _scan(_chunk_sums(Kc, "z_chunk"), "Pz", later=False)
        R = _scan(_chunk_states(Qc, gc, "r_chunk"), "R", later=True)         # later queries
        Rz = _scan(_chunk_sums(Qc, "rz_chunk", weight=rc), "Rz", later=True)
        cq = lambda i: _chunk_of(i)[0]                                       # noqa: E731
        # b_is for the keys s ≤ i of i's chunk, and b_tj for the queries t ≥ j of j's chunk
        d3, d4 = te.reduce_axis((0, Di), "d3"), te.reduce_axis((0, Di), "d4")
        gv_q = te.compute((BH, N, C), lambda b, i, s: te.sum(g[b, i, d3] * Vc[b, cq(i), s, d3], axis=d3), "gv_rows")
        gv_k = te.compute((BH, N, C), lambda b, j, t: te.sum(gc[b, cq(j), t, d4] * v[b, j, d4], axis=d4), "gv_cols")
        Bq = te.compute((BH, N, C), lambda b, i, s: tirx.Select(
            s <= _chunk_of(i)[1], gv_q[b, i, s] - r[b, i], _zero(dtype)), "b_rows")
        Bk = te.compute((BH, N, C), lambda b, j, t: tirx.Select(
            t >= _chunk_of(j)[1], gv_k[b, j, t] - rc[b, cq(j), t], _zero(dtype)), "b_cols")
        m3 = te.reduce_axis((0, Mi), "m3")
        Ak = te.compute((BH, N, C), lambda b, j, t: te.sum(tirx.Select(
            t >= _chunk_of(j)[1], Qc[b, cq(j), t, m3] * Kf[b, j, m3], _zero(dtype)), axis=m3), "a_cols")
        s1, t1, t2 = (te.reduce_axis((0, C), n) for n in ("s1", "t1", "t2"))
        dq_in = te.compute(Qf.shape, lambda b, i, m: te.sum(Bq[b, i, s1] * Kc[b, cq(i), s1, m], axis=s1), "dq_intra")
        dk_in = te.compute(Kf.shape, lambda b, j, m: te.sum(Bk[b, j, t1] * Qc[b, cq(j), t1, m], axis=t1), "dk_intra")
        dv_in = te.compute(v.shape, lambda b, j, d: te.sum(Ak[b, j, t2] * gc[b, cq(j), t2, d], axis=t2), "dv_intra")
        pg = te.compute(Qf.shape, lambda b, i, m: te.sum(P[b, cq(i), m, d1] * g[b, i, d1], axis=d1), "pg")
        rv = te.compute(Kf.shape, lambda b, j, m: te.sum(R[b, cq(j), m, d2] * v[b, j, d2], axis=d2), "rv")
        kr = te.compute(v.shape, lambda b, j, d: te.sum(Kf[b, j, m1] * R[b, cq(j), m1, d], axis=m1), "kr")
        dQf = te.compute(Qf.shape, lambda b, i, m: pg[b, i, m] - r[b, i] * Pz[b, cq(i), m] + dq_in[b, i, m], "dqf")
        dKf = te.compute(Kf.shape, lambda b, j, m: rv[b, j, m] - Rz[b, cq(j), m] + dk_in[b, j, m], "dkf")
        dV = te.compute(v.shape, lambda b, j, d: kr[b, j, d] + dv_in[b, j, d], "dv_")
    if phi is not None:
        dQf = te.compute(q.shape, lambda b, i, m: dQf[b, i, m] * dphi(q[b, i, m]), "dq")
        dKf = te.compute(k.shape, lambda b, j, m: dKf[b, j, m] * dphi(k[b, j, m]), "dk")
    return _func(name, [q, k, v, _unused("tab", dtype), O, DEN, dO, dQf, dKf, dV])

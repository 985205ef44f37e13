"""Feature-map kernels φ(c·x) and their backward, in TVMScript, one per map family.

Families (the registry `FAMILIES` maps each kernel name of the language to one):
  elementwise  φ(x)_d = f(x_d) for an EXPR f (relu, elu1, user maps); dx = c·f'(c x)·dφ
  exp          φ(x)_w = exp(raw_w − stab)·norm with raw = c x (exp_shift) or
               raw = W'(c x) − |c x|²/2 (favor; hyperbolic with W' = [W; −W]);
               dx = c·(W'ᵀ g − c x Σ_w g_w) with g = dφ ⊙ φ (exp_shift: dx = c·g)
  cos          φ(x)_w = cos((W'(c x))_w + β_w)·norm, β = [0, −π/2] halves (trig: [cos, sin])
The stabilizer is a row max for queries and a (batch·head) max for keys: a constant factor of a
row's (or all rows') kernel values, so it cancels in the normalizer and needs no gradient.
Shapes: X (BH, N, Dk), W' (width, Dk) and its transpose Wt (Dk, width), F (BH, N, width).
Signatures: forward (X, Wt, F); backward (X, W', Wt, F, dF, dX) — unused arguments are ignored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T

from attndsl.check import MAX_MAP_PARAMS
from attndsl.expr import diff

from ..tir import vmath
from ..tir.expr import to_tir


@dataclass(frozen=True)
class MapKernel:
    """What lowering needs of one feature map: its family, width, constants."""
    family: str            # elementwise | exp | cos
    dk: int
    width: int
    c: float               # the prescale √s
    norm: float = 1.0
    projected: bool = False
    stabilize: bool = True
    expr: object = None    # elementwise: the EXPR
    params: tuple = ()     # elementwise: the params EXPR reads, in the order of PRM's columns


def _lowest(dtype):
    return tirx.min_value(dtype)


# --- elementwise: relu, elu1, user maps ------------------------------------------------------------

def elementwise_pair(k: MapKernel, dtype: str):
    """(x -> φ(c x), x -> c·φ'(c x)) as PrimExpr builders, for kernels that apply φ themselves."""
    c, dexpr = k.c, diff(k.expr, "x")

    def f(x):
        return to_tir(k.expr, x * tirx.const(c, dtype), dtype)

    def df(x):
        return to_tir(dexpr, x * tirx.const(c, dtype), dtype) * tirx.const(c, dtype)
    return f, df


def elementwise_forward(name: str, k: MapKernel, role: str, dtype: str):
    dk = k.dk
    f, _ = elementwise_pair(k, dtype)

    @T.prim_func
    def kernel(x: T.handle, wt: T.handle, out: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        BH = T.int64()
        N = T.int64()
        X = T.match_buffer(x, (BH, N, dk), dtype)
        F = T.match_buffer(out, (BH, N, dk), dtype)
        for b in T.parallel(BH):
            for i in range(N):
                for d in T.vectorized(dk):
                    F[b, i, d] = f(X[b, i, d])
    return kernel


def elementwise_backward(name: str, k: MapKernel, dtype: str):
    dk = k.dk
    _, df = elementwise_pair(k, dtype)          # c · f'(c x)

    @T.prim_func
    def kernel(x: T.handle, w: T.handle, wt: T.handle, f: T.handle, df_: T.handle, dx: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        BH = T.int64()
        N = T.int64()
        X = T.match_buffer(x, (BH, N, dk), dtype)
        dF = T.match_buffer(df_, (BH, N, dk), dtype)
        dX = T.match_buffer(dx, (BH, N, dk), dtype)
        for b in T.parallel(BH):
            for i in range(N):
                for d in T.vectorized(dk):
                    dX[b, i, d] = df(X[b, i, d]) * dF[b, i, d]
    return kernel


# --- elementwise maps reading params: φ(c x; p_h) ----------------------------------------------------

MAX_PARAMS = MAX_MAP_PARAMS      # the params one map may read (check.py refuses more)


def _param_env(k: MapKernel, PRM, h) -> dict:
    """The map's params as EXPR reads them: PRM[h, j], column j the j-th of k.params."""
    return {n: PRM[h, j] for j, n in enumerate(k.params)}


def param_forward(name: str, k: MapKernel, role: str, dtype: str):
    """(X, PRM, F): F = φ(c·X; p_h) elementwise, PRM (H, P) the values of the map's params per
    head (h = bh mod H; a scalar param is the same in every row)."""
    dk, P, c = k.dk, len(k.params), tirx.const(k.c, dtype)

    def f(x, PRM, h):
        return to_tir(k.expr, x * c, dtype, _param_env(k, PRM, h))

    @T.prim_func
    def kernel(x: T.handle, prm: T.handle, out: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        BH = T.int64()
        N = T.int64()
        H = T.int64()
        X = T.match_buffer(x, (BH, N, dk), dtype)
        PRM = T.match_buffer(prm, (H, P), dtype)
        F = T.match_buffer(out, (BH, N, dk), dtype)
        for b in T.parallel(BH):
            for i in range(N):
                for d in T.vectorized(dk):
                    F[b, i, d] = f(X[b, i, d], PRM, b % H)
    return kernel


def param_backward(name: str, k: MapKernel, dtype: str):
    """(X, PRM, dF, dX, dPRM, PART): dX = c·∂φ/∂x(c·X; p_h)·dF, and each row's share of the params'
    gradient PART[b, j] = Σ_{i, d} dF·∂φ/∂p_j(c·X; p_h) (BH, P), from EXPR's symbolic derivatives;
    the op folds PART into dPRM (H, P) (abi.py), which the kernel leaves alone. An element whose
    dF is 0 (a padded key's, a masked row's) adds nothing, whatever its φ."""
    dk, P, c = k.dk, len(k.params), tirx.const(k.c, dtype)
    zero = tirx.const(0, dtype)
    dx_expr = diff(k.expr, "x")
    dp = [diff(k.expr, n) for n in k.params] + [None] * (MAX_PARAMS - len(k.params))

    def fx(x, PRM, h):
        return to_tir(dx_expr, x * c, dtype, _param_env(k, PRM, h)) * c

    def share(j):
        def g(x, g_out, PRM, h):
            return tirx.Select(g_out != zero, g_out * to_tir(dp[j], x * c, dtype, _param_env(k, PRM, h)), zero)
        return g
    fp0, fp1, fp2, fp3 = (share(j) for j in range(MAX_PARAMS))

    @T.prim_func
    def kernel(x: T.handle, prm: T.handle, df_: T.handle, dx: T.handle, dprm: T.handle, part: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        BH = T.int64()
        N = T.int64()
        H = T.int64()
        X = T.match_buffer(x, (BH, N, dk), dtype)
        PRM = T.match_buffer(prm, (H, P), dtype)
        dF = T.match_buffer(df_, (BH, N, dk), dtype)
        dX = T.match_buffer(dx, (BH, N, dk), dtype)
        PART = T.match_buffer(part, (BH, P), dtype)
        for b in T.parallel(BH):
            acc = T.alloc_buffer((MAX_PARAMS, dk), dtype)
            for j, d in T.grid(MAX_PARAMS, dk):
                acc[j, d] = zero
            for i in range(N):
                for d in T.vectorized(dk):
                    dX[b, i, d] = fx(X[b, i, d], PRM, b % H) * dF[b, i, d]
                    if P > 0:
                        acc[0, d] = acc[0, d] + fp0(X[b, i, d], dF[b, i, d], PRM, b % H)
                    if P > 1:
                        acc[1, d] = acc[1, d] + fp1(X[b, i, d], dF[b, i, d], PRM, b % H)
                    if P > 2:
                        acc[2, d] = acc[2, d] + fp2(X[b, i, d], dF[b, i, d], PRM, b % H)
                    if P > 3:
                        acc[3, d] = acc[3, d] + fp3(X[b, i, d], dF[b, i, d], PRM, b % H)
            for j in range(P):
                PART[b, j] = zero
                for d in range(dk):
                    PART[b, j] = PART[b, j] + acc[j, d]
    return kernel


# --- exp and cos families: the projected row u = W'(c x) ------------------------------------------

def _raw_macro(k: MapKernel, dtype: str):
    """raw_w for one row into `u`: W'(c x) − |c x|²/2 when projected, else c x."""
    dk, width, c = k.dk, k.width, k.c
    half = 0.5 if k.family == "exp" else 0.0

    if not k.projected:
        @T.macro
        def raw(X, Wt, u, b, i):
            for w in T.vectorized(width):
                u[w] = X[b, i, w] * T.cast(c, dtype)
        return raw

    @T.macro
    def raw(X, Wt, u, b, i):
        hh = T.alloc_buffer((1,), dtype)
        hh[0] = T.cast(0, dtype)
        for w in T.vectorized(width):
            u[w] = T.cast(0, dtype)
        for d in range(dk):
            xd: T.let = X[b, i, d] * T.cast(c, dtype)
            hh[0] = hh[0] + xd * xd
            for w in T.vectorized(width):
                u[w] = u[w] + xd * Wt[d, w]
        for w in T.vectorized(width):
            u[w] = u[w] - hh[0] * T.cast(half, dtype)
    return raw


def exp_forward(name: str, k: MapKernel, role: str, dtype: str):
    """φ = exp(raw − stab)·norm; stab = row max (q), (batch·head) max (k), or 0."""
    dk, width, norm = k.dk, k.width, k.norm
    raw = _raw_macro(k, dtype)
    row_stab = k.stabilize and role == "q"
    global_stab = k.stabilize and role == "k"
    start = _lowest(dtype) if global_stab else tirx.const(0, dtype)

    @T.prim_func
    def kernel(x: T.handle, wt: T.handle, out: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        BH = T.int64()
        N = T.int64()
        X = T.match_buffer(x, (BH, N, dk), dtype)
        Wt = T.match_buffer(wt, (dk, width), dtype)
        F = T.match_buffer(out, (BH, N, width), dtype)
        for b in T.parallel(BH):
            u = T.alloc_buffer((width,), dtype)
            mx = T.alloc_buffer((1,), dtype)
            mx[0] = start
            for i in range(N):
                raw(X, Wt, u, b, i)
                if row_stab:
                    mx[0] = _lowest(dtype)
                    for w in range(width):
                        mx[0] = T.max(mx[0], u[w])
                    for w in T.vectorized(width):
                        F[b, i, w] = vmath.exp(u[w] - mx[0]) * T.cast(norm, dtype)
                else:
                    if global_stab:
                        for w in range(width):
                            mx[0] = T.max(mx[0], u[w])
                    for w in T.vectorized(width):
                        F[b, i, w] = u[w]
            if not row_stab:
                for i in range(N):
                    for w in T.vectorized(width):
                        F[b, i, w] = vmath.exp(F[b, i, w] - mx[0]) * T.cast(norm, dtype)
    return kernel


def exp_backward(name: str, k: MapKernel, dtype: str):
    """dx = c·(W'ᵀ g − c x Σ_w g_w), g = dφ ⊙ φ; unprojected: dx = c·g."""
    dk, width, c = k.dk, k.width, k.c
    projected = k.projected

    @T.prim_func
    def kernel(x: T.handle, w_: T.handle, wt: T.handle, f: T.handle, df: T.handle, dx: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        BH = T.int64()
        N = T.int64()
        X = T.match_buffer(x, (BH, N, dk), dtype)
        W = T.match_buffer(w_, (width, dk), dtype)
        F = T.match_buffer(f, (BH, N, width), dtype)
        dF = T.match_buffer(df, (BH, N, width), dtype)
        dX = T.match_buffer(dx, (BH, N, dk), dtype)
        for b in T.parallel(BH):
            g = T.alloc_buffer((width,), dtype)
            gs = T.alloc_buffer((1,), dtype)
            acc = T.alloc_buffer((dk,), dtype)
            for i in range(N):
                for w in T.vectorized(width):
                    g[w] = dF[b, i, w] * F[b, i, w]
                if projected:
                    gs[0] = T.cast(0, dtype)
                    for w in range(width):
                        gs[0] = gs[0] + g[w]
                    for d in T.vectorized(dk):
                        acc[d] = T.cast(0, dtype) - X[b, i, d] * T.cast(c, dtype) * gs[0]
                    for w in range(width):
                        gw: T.let = g[w]
                        for d in T.vectorized(dk):
                            acc[d] = acc[d] + gw * W[w, d]
                    for d in T.vectorized(dk):
                        dX[b, i, d] = acc[d] * T.cast(c, dtype)
                else:
                    for d in T.vectorized(dk):
                        dX[b, i, d] = g[d] * T.cast(c, dtype)
    return kernel


def _quadrants(w, half: int):
    """β_w in quarter turns: 0 for the cos half, −1 (cos(u − π/2) = sin u) for the sin half."""
    return tirx.Select(w < half, tirx.const(0, "int32"), tirx.const(-1, "int32"))


def cos_forward(name: str, k: MapKernel, role: str, dtype: str):
    """φ_w = cos(u_w + β_w)·norm: [cos(Wx/σ), sin(Wx/σ)]/√m with W' = [W; W]/σ."""
    dk, width, norm, half = k.dk, k.width, k.norm, k.width // 2
    raw = _raw_macro(k, dtype)

    @T.prim_func
    def kernel(x: T.handle, wt: T.handle, out: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        BH = T.int64()
        N = T.int64()
        X = T.match_buffer(x, (BH, N, dk), dtype)
        Wt = T.match_buffer(wt, (dk, width), dtype)
        F = T.match_buffer(out, (BH, N, width), dtype)
        for b in T.parallel(BH):
            u = T.alloc_buffer((width,), dtype)
            for i in range(N):
                raw(X, Wt, u, b, i)
                for w in T.vectorized(width):
                    F[b, i, w] = vmath.cos(u[w], _quadrants(w, half)) * T.cast(norm, dtype)
    return kernel


def cos_backward(name: str, k: MapKernel, dtype: str):
    """dx = c·W'ᵀ g with g_w = −dφ_w·sin(u_w + β_w)·norm (u recomputed)."""
    dk, width, c, norm, half = k.dk, k.width, k.c, k.norm, k.width // 2
    raw = _raw_macro(k, dtype)

    @T.prim_func
    def kernel(x: T.handle, w_: T.handle, wt: T.handle, f: T.handle, df: T.handle, dx: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        BH = T.int64()
        N = T.int64()
        X = T.match_buffer(x, (BH, N, dk), dtype)
        W = T.match_buffer(w_, (width, dk), dtype)
        Wt = T.match_buffer(wt, (dk, width), dtype)
        dF = T.match_buffer(df, (BH, N, width), dtype)
        dX = T.match_buffer(dx, (BH, N, dk), dtype)
        for b in T.parallel(BH):
            u = T.alloc_buffer((width,), dtype)
            acc = T.alloc_buffer((dk,), dtype)
            for i in range(N):
                raw(X, Wt, u, b, i)
                for w in T.vectorized(width):
                    u[w] = dF[b, i, w] * vmath.cos(u[w], _quadrants(w, half) + 1) * T.cast(norm, dtype)
                for d in T.vectorized(dk):
                    acc[d] = T.cast(0, dtype)
                for w in range(width):
                    gw: T.let = u[w]
                    for d in T.vectorized(dk):
                        acc[d] = acc[d] + gw * W[w, d]
                for d in T.vectorized(dk):
                    dX[b, i, d] = acc[d] * T.cast(c, dtype)
    return kernel


# family -> (forward builder(name, k, role, dtype), backward builder(name, k, dtype))
FAMILIES = {
    "elementwise": (elementwise_forward, elementwise_backward),
    "exp": (exp_forward, exp_backward),
    "cos": (cos_forward, cos_backward),
}


def _elementwise(kernel, dk, width, c):
    from attndsl.ast import map_params
    from attndsl.expr import BUILTIN_MAPS
    return MapKernel("elementwise", dk, width, c, expr=kernel.expr or BUILTIN_MAPS[kernel.name],
                     params=map_params(kernel))


# kernel name of the language -> (Choice, Dk, width, √s) -> MapKernel
MAPS = {
    "relu": _elementwise,
    "elu1": _elementwise,
    "user": _elementwise,
    "exp_shift": lambda kernel, dk, width, c: MapKernel("exp", dk, width, c),
    "favor": lambda kernel, dk, width, c: MapKernel(
        "exp", dk, width, c, norm=1 / math.sqrt(width), projected=True,
        stabilize=bool(kernel["stabilize"])),
    "hyperbolic": lambda kernel, dk, width, c: MapKernel(
        "exp", dk, width, c, norm=1 / math.sqrt(width), projected=True),
    "trig": lambda kernel, dk, width, c: MapKernel(
        "cos", dk, width, c, norm=1 / math.sqrt(width // 2), projected=True),
}

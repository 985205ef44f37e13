"""The attn dialect -> linalg on tensors, by MLIR rewrite patterns: attndsl's second backend.

Every attn op is rewritten (one pattern per op, `RULES`) into a call of a private function that
holds its linalg body, built here from the op's node; MLIR's inliner then splices the bodies in.

    attn.input "q"             ->  the function's argument %q
    attn.feature_map(x)        ->  φ(c·x): elementwise maps as one linalg.generic; favor, hyperbolic,
                                   trig as a contraction with W' then exp / [cos, sin]; the
                                   stabilizer a max-reduction per row (q) or per batch·head (k)
    attn.linear_attention      ->  linear:     S = Σ_j φk_j v_jᵀ, z = Σ_j φk_j;  out_i = φq_i S / φq_i z
                                   prefix_sum: scf.for over tokens, S_i = S_{i−1} + φk_i v_iᵀ
    attn.positional_attention  ->  decayed:    scf.for forward in time, S_i = γ_f S_{i−1} + φk_i v_iᵀ,
                                               and backward, T_i = γ_b (T_{i+1} + φk_{i+1} v_{i+1}ᵀ)
                                   toeplitz_fft, banded: the dense Toeplitz mix
                                               A_ij = (φq_i·φk_j) e^(b(i−j) − max_j b) M_ij, out = A v / A 1
    attn.toeplitz_values       ->  Σ_j M_ij b(i−j) v_j (dense)
    attn.softmax_attention     ->  softmax(s q kᵀ + b(i−j), masked) v, row by row of (BH, N, N)
    attn.sampled_attention     ->  kde, uniform: each query's LSH block exactly plus the weighted
                                   samples outside it (the sort and the samples come from torch,
                                   attndsl.sampling, as for the TVM kernels), dense
    attn.add                   ->  a + b
    attn.position              ->  erased; its users read the argument %tab

MLIR has no FFT op, and this backend is an independent check of the maths (and a module other
MLIR toolchains can take), so the FFT, banded and sampled sites are evaluated densely, O(N²).

The executable function @run_NAME(q, k, v: tensor<?x?xDxT>, w: tensor<MxDkxT> (W'),
tab: tensor<HxPxT> (position table or alibi slopes), rates: tensor<Hx2xT> (decay rates per head
and direction)[, the samples of `argument_types`], out: memref<?x?xDvxT>) writes the result into `out`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch_mlir import ir, passmanager, rewrite

from ..ast import Var, learned_table
from ..expr import BUILTIN_MAPS
from ..passes.geometric import decayed_floor
from ..ir import (Add, FeatureMap, Input, LinearAttention, Node, Position, PositionalAttention,
                  SampledAttention, SoftmaxAttention, ToeplitzValues, postorder)
from . import dialect
from .emit import to_module
from .text import Body, tensor

ELEMENT = {"float32": "f32", "float64": "f64"}
ARGS = ("q", "k", "v", "w", "tab", "rates")       # the executable function's inputs, in order,
SAMPLES = ("invq", "invk", "si", "lw", "sb", "vs")    # and after them, for sampled attention, the samples
NEG_INF = -math.inf


class NotLowered(ValueError):
    """A node with no linalg body (an unplanned quadratic node: the pipeline leaves none)."""

    def __init__(self, node: Node):
        self.node = node
        super().__init__(f"the {node.form or node.op} form of {node.op} has no linalg lowering")


@dataclass(frozen=True)
class Params:
    """The shapes of the module parameters the function takes: W' (M, Dk), tab (H, P)."""
    heads: int
    proj: tuple[int, int]
    tab: tuple[int, int]


# --- combinators over linalg.generic; inputs are (value, shape, map) -------------------------------

def _ins(b: Body, ins) -> tuple[list[str], list[tuple[str, str]]]:
    """The maps and (value, type) of generic inputs."""
    return [m for _, _, m in ins], [(v, tensor(s, b.T)) for v, s, _ in ins]


def ew(b: Body, shape, out_map: str, ins, fn) -> str:
    """out[out_map] = fn(g, *ins) elementwise."""
    maps, values = _ins(b, ins)
    return b.generic(maps, [out_map], values, [(b.empty(shape), tensor(shape, b.T))],
                     lambda g, a: [fn(g, *a[:-1])])[0]


def update(b: Body, dest: str, shape, out_map: str, ins, fn) -> str:
    """dest[out_map] = fn(g, *ins, dest) in place (a loop-carried state stays one buffer)."""
    maps, values = _ins(b, ins)
    return b.generic(maps, [out_map], values, [(dest, tensor(shape, b.T))], lambda g, a: [fn(g, *a)])[0]


def red(b: Body, shape, out_map: str, ins, fn=None, init: float = 0.0, combine: str = "arith.addf") -> str:
    """out[out_map] = combine over every other dim of fn(g, *ins) (default: their product), from init."""
    fn = fn or (lambda g, *x: x[0] if len(x) == 1 else g.f("arith.mulf", *x))
    maps, values = _ins(b, ins)
    return b.generic(maps, [out_map], values, [(b.full(shape, init), tensor(shape, b.T))],
                     lambda g, a: [g.f(combine, a[-1], fn(g, *a[:-1]))])[0]


def plus(b: Body, shape, m: str, x: str, y: str) -> str:
    """x + y, both of `shape` indexed by the map m."""
    return ew(b, shape, m, [(x, shape, m), (y, shape, m)], lambda g, u, w: g.f("arith.addf", u, w))


def divide(b: Body, num: str, den: str, bh: str, n: str, d: int, eps: float | None = None,
           shift: str | None = None) -> str:
    """num / (den + eps), eps·exp(−shift_i) where the weights were divided by exp(shift_i)."""
    if eps and shift is None:
        den = ew(b, (bh, n), "b,i", [(den, (bh, n), "b,i")], lambda g, x: g.f("arith.addf", x, g.const(eps)))
    elif eps:
        den = ew(b, (bh, n), "b,i", [(den, (bh, n), "b,i"), (shift, (bh, n), "b,i")],
                 lambda g, x, m: g.f("arith.addf", x, g.exp(g.f("arith.subf", g.const(math.log(eps)), m))))
    return ew(b, (bh, n, d), "b,i,d", [(num, (bh, n, d), "b,i,d"), (den, (bh, n), "b,i")],
              lambda g, x, y: g.f("arith.divf", x, y))


def scaled(g: Body, x: str, c: float) -> str:
    return x if c == 1.0 else g.f("arith.mulf", x, g.const(c))


# --- feature maps ---------------------------------------------------------------------------------

def elementwise(b: Body, x: str, dims, width: int, expr, c: float) -> str:
    """φ(c·x) for an elementwise map EXPR: (BH, N, W) -> (BH, N, W)."""
    bh, n = dims
    return ew(b, (bh, n, width), "b,i,m", [(x, (bh, n, width), "b,i,m")],
              lambda g, xv: g.expr(expr, scaled(g, xv, c)))


def exp_minus_max(b: Body, y: str, dims, width: int, role: str, factor: float) -> str:
    """factor · exp(y − max y), the max per row (role q) or per batch·head (role k)."""
    bh, n = dims
    keep, shape = ("b,i", (bh, n)) if role == "q" else ("b", (bh,))
    mx = red(b, shape, keep, [(y, (bh, n, width), "b,i,m")], init=NEG_INF, combine="arith.maximumf")
    return ew(b, (bh, n, width), "b,i,m", [(y, (bh, n, width), "b,i,m"), (mx, shape, keep)],
              lambda g, yv, mv: scaled(g, g.exp(g.f("arith.subf", yv, mv)), factor))


def feature_map(node: FeatureMap, b: Body, x: str, w: str) -> str:
    """φ(c·x) for every registered map: (BH, N, Dk) -> (BH, N, M)."""
    name, c, dk, m = node.kernel.name, node.prescale, node.x.shape[-1], node.width
    dims = bh, n = b.dims(x, tensor(("?", "?", dk), b.T))
    if name in BUILTIN_MAPS or name == "user":
        return elementwise(b, x, dims, dk, node.kernel.expr or BUILTIN_MAPS[name], c)
    if name == "exp_shift":                                        # exp(c x − max)
        return exp_minus_max(b, elementwise(b, x, dims, dk, Var("x"), c), dims, dk, node.role, 1.0)
    u = red(b, (bh, n, m), "b,i,m", [(x, (bh, n, dk), "b,i,d"), (w, (m, dk), "m,d")],
            lambda g, xv, wv: g.f("arith.mulf", scaled(g, xv, c), wv))          # u = (c x) W'ᵀ
    if name == "trig":                                             # [cos u, sin u] / √(M/2)
        half = m // 2

        def trig(g, uv):
            first = g(f"arith.cmpi ult, {g('linalg.index 2 : index')}, {g.index(half)} : index")
            return scaled(g, g.select(first, g.f("math.cos", uv), g.f("math.sin", uv)), 1 / math.sqrt(half))
        return ew(b, (bh, n, m), "b,i,m", [(u, (bh, n, m), "b,i,m")], trig)
    # favor, hyperbolic: raw = u − |c x|²/2;  φ = exp(raw − stab) / √M
    h = red(b, (bh, n), "b,i", [(x, (bh, n, dk), "b,i,d")],
            lambda g, xv: g.f("arith.mulf", g.const(0.5 * c * c), g.f("arith.mulf", xv, xv)))
    raw = ew(b, (bh, n, m), "b,i,m", [(u, (bh, n, m), "b,i,m"), (h, (bh, n), "b,i")],
             lambda g, uv, hv: g.f("arith.subf", uv, hv))
    if name == "favor" and not node.kernel["stabilize"]:
        return ew(b, (bh, n, m), "b,i,m", [(raw, (bh, n, m), "b,i,m")],
                  lambda g, rv: scaled(g, g.exp(rv), 1 / math.sqrt(m)))
    return exp_minus_max(b, raw, dims, m, node.role, 1 / math.sqrt(m))


# --- position terms -------------------------------------------------------------------------------

def head(g: Body, p: Params) -> str:
    """h = bh mod H inside a generic whose first dim runs over batch·heads."""
    return g(f"arith.remui {g('linalg.index 0 : index')}, {g.index(p.heads)} : index")


def bias_value(g: Body, pos, tab: str, p: Params, masked: bool, fill: float) -> str:
    """b_h(i − j) (0 when pos is None) inside a generic over (b, i, j): `fill` where j > i and the
    mask is causal."""
    i, j = (g(f"linalg.index {d} : index") for d in (1, 2))
    h = head(g, p)
    r = g(f"arith.subi {i}, {j} : index")
    tab_ty = tensor(p.tab, g.T)
    if pos is None:
        val = g.const(0.0)
    elif learned_table(pos):                         # table[h, clip(r, −W, W) + W]
        w = int(pos["max_distance"])
        col = g(f"arith.minsi {g(f'arith.maxsi {r}, {g.index(-w)} : index')}, {g.index(w)} : index")
        val = g.extract(tab, tab_ty, h, g(f"arith.addi {col}, {g.index(w)} : index"))
    elif pos.name == "alibi":                        # −slope_h · |r|
        slope = g.extract(tab, tab_ty, h, g.index(0))
        val = g.f("arith.negf", g.f("arith.mulf", slope, g.f("math.absf", g.to_float(r))))
    else:                                            # EXPR(r)
        val = g.expr(pos.expr, g.to_float(r))
    if not masked:
        return val
    later = g(f"arith.cmpi sgt, {j}, {i} : index")
    return g.select(later, g.const(fill), val)


def _rows(b: Body, x: str, width: int) -> tuple[str, str]:
    return b.dims(x, tensor(("?", "?", width), b.T))


def toeplitz_mix(b: Body, kappa: str, pos, tab: str, p: Params, causal: bool, v: str, dims, d: int,
                 logits: bool, eps: float | None = None) -> str:
    """out_i = Σ_j A_ij v_j / (Σ_j A_ij + eps) over (BH, N, N) scores: A = exp(κ + b − max) for
    softmax logits, A = κ·exp(b − max_j b) for kernel values; masked entries get b = −∞."""
    bh, n = dims
    sq = (bh, n, n)
    bias = ew(b, sq, "b,i,j", [], lambda g: bias_value(g, pos, tab, p, causal, NEG_INF))
    if logits:
        bias = plus(b, sq, "b,i,j", kappa, bias)
    mx = red(b, (bh, n), "b,i", [(bias, sq, "b,i,j")], init=NEG_INF, combine="arith.maximumf")
    if logits:
        a = ew(b, sq, "b,i,j", [(bias, sq, "b,i,j"), (mx, (bh, n), "b,i")],
               lambda g, lv, mv: g.exp(g.f("arith.subf", lv, mv)))
    else:
        a = ew(b, sq, "b,i,j", [(kappa, sq, "b,i,j"), (bias, sq, "b,i,j"), (mx, (bh, n), "b,i")],
               lambda g, kv, bv, mv: g.f("arith.mulf", kv, g.exp(g.f("arith.subf", bv, mv))))
    num = red(b, (bh, n, d), "b,i,d", [(a, sq, "b,i,j"), (v, (bh, n, d), "b,j,d")])
    den = red(b, (bh, n), "b,i", [(a, sq, "b,i,j")])
    return divide(b, num, den, bh, n, d, eps, mx)


# --- recurrences (prefix sums, decayed) ----------------------------------------------------------

def recurrence(b: Body, qf: str, kf: str, v: str, dims, m: int, d: int, gamma: str,
               backward: bool) -> tuple[str, str]:
    """(num, den) (BH, N, Dv), (BH, N) of one direction, token by token, γ (BH,) per batch·head:
    forward  S_i = γ S_{i−1} + φk_i v_iᵀ,          num_i = φq_i S_i   (keys j ≤ i)
    backward T_i = γ (T_{i+1} + φk_{i+1} v_{i+1}ᵀ),  num_i = φq_i T_i   (keys j > i)
    and den likewise with v = 1. The states are loop-carried and updated in place."""
    bh, n = dims
    T = b.T
    carried = [(b.full((bh, m, d), 0.0), tensor((bh, m, d), T)), (b.full((bh, m), 0.0), tensor((bh, m), T)),
               (b.full((bh, n, d), 0.0), tensor((bh, n, d), T)), (b.full((bh, n), 0.0), tensor((bh, n), T))]

    def fold(g: Body, kv: str, gv: str, sv: str) -> str:          # γ S + k vᵀ   or   γ (S + k vᵀ)
        if backward:
            return g.f("arith.mulf", gv, g.f("arith.addf", sv, kv))
        return g.f("arith.addf", g.f("arith.mulf", gv, sv), kv)

    def step(g: Body, t: str, c: list[str]) -> list[str]:
        s, z, num, den = c
        i = g(f"arith.subi {g(f'arith.subi {n}, {t} : index')}, {g.index(1)} : index") if backward else t

        def row(x, width):
            return g(f"tensor.extract_slice {x}[0, {i}, 0] [{bh}, 1, {width}] [1, 1, 1] : "
                     f"{tensor(('?', '?', width), T)} to {tensor((bh, width), T)}")
        qi, ki, vi = row(qf, m), row(kf, m), row(v, d)

        def advance():
            s2 = update(g, s, (bh, m, d), "b,m,d", [(ki, (bh, m), "b,m"), (vi, (bh, d), "b,d"), (gamma, (bh,), "b")],
                        lambda g2, kv, vv, gv, sv: fold(g2, g2.f("arith.mulf", kv, vv), gv, sv))
            z2 = update(g, z, (bh, m), "b,m", [(ki, (bh, m), "b,m"), (gamma, (bh,), "b")], fold)
            return s2, z2

        def read(state_s, state_z):
            ni = red(g, (bh, d), "b,d", [(qi, (bh, m), "b,m"), (state_s, (bh, m, d), "b,m,d")])
            di = red(g, (bh,), "b", [(qi, (bh, m), "b,m"), (state_z, (bh, m), "b,m")])
            num2 = g(f"tensor.insert_slice {ni} into {num}[0, {i}, 0] [{bh}, 1, {d}] [1, 1, 1] : "
                     f"{tensor((bh, d), T)} into {tensor(('?', '?', d), T)}")
            den2 = g(f"tensor.insert_slice {di} into {den}[0, {i}] [{bh}, 1] [1, 1] : "
                     f"{tensor((bh,), T)} into {tensor(('?', '?'), T)}")
            return num2, den2

        if backward:                                   # read T_i, then fold in key i for i − 1
            num2, den2 = read(s, z)
            s2, z2 = advance()
        else:                                          # fold in key i, then read S_i
            s2, z2 = advance()
            num2, den2 = read(s2, z2)
        return [s2, z2, num2, den2]

    _, _, num, den = b.loop(b.index(0), n, carried, step)
    return num, den


def decay(b: Body, rates: str, p: Params, column: int, dims) -> str:
    """γ per batch·head: exp(−rates[h, column]), h = bh mod H."""
    bh, _ = dims

    def gamma(g):
        return g.exp(g.f("arith.negf", g.extract(rates, tensor((p.heads, 2), g.T), head(g, p), g.index(column))))
    return ew(b, (bh,), "b", [], gamma)


def linear_like(b: Body, qf: str, kf: str, v: str, m: int, d: int, causal: bool,
                rates: str | None, p: Params, eps: float | None = None) -> str:
    """Linear attention (no decay) or the decayed form, as recurrences (causal or decayed) or
    two contractions (neither); the normalizer gets + eps."""
    dims = bh, n = _rows(b, v, d)
    if not causal and rates is None:                  # linear: S = φkᵀ v, z = φkᵀ 1
        s = red(b, (bh, m, d), "b,m,d", [(kf, (bh, n, m), "b,j,m"), (v, (bh, n, d), "b,j,d")])
        z = red(b, (bh, m), "b,m", [(kf, (bh, n, m), "b,j,m")])
        num = red(b, (bh, n, d), "b,i,d", [(qf, (bh, n, m), "b,i,m"), (s, (bh, m, d), "b,m,d")])
        den = red(b, (bh, n), "b,i", [(qf, (bh, n, m), "b,i,m"), (z, (bh, m), "b,m")])
        return divide(b, num, den, bh, n, d, eps)
    gf = b.full((bh,), 1.0) if rates is None else decay(b, rates, p, 0, dims)   # prefix sums: γ = 1
    num, den = recurrence(b, qf, kf, v, dims, m, d, gf, backward=False)
    if not causal:                                    # the later keys, backward in time
        nb, db = recurrence(b, qf, kf, v, dims, m, d, decay(b, rates, p, 1, dims), backward=True)
        num, den = plus(b, (bh, n, d), "b,i,d", num, nb), plus(b, (bh, n), "b,i", den, db)
    return divide(b, num, den, bh, n, d, eps)


# --- one body per node type -----------------------------------------------------------------------

def _linear(node: LinearAttention, b: Body, a: dict, p: Params) -> str:
    qf, kf = a["qf"], a["kf"]
    m, d = node.qf.shape[-1], node.v.shape[-1]
    if node.phi is not None:                          # φ fused in: qf, kf are the raw q, k
        expr = node.phi.expr or BUILTIN_MAPS[node.phi.name]
        dims = _rows(b, qf, m)
        qf, kf = (elementwise(b, x, dims, m, expr, node.prescale) for x in (qf, kf))
    return linear_like(b, qf, kf, a["v"], m, d, node.causal, None, p, node.eps)


def _positional(node: PositionalAttention, b: Body, a: dict, p: Params) -> str:
    m, d = node.qf.shape[-1], node.v.shape[-1]
    if node.form == "decayed":
        return linear_like(b, a["qf"], a["kf"], a["v"], m, d, node.causal, a["rates"], p,
                           decayed_floor(node.eps, node.bias.position))
    dims = bh, n = _rows(b, a["v"], d)
    kappa = red(b, (bh, n, n), "b,i,j", [(a["qf"], (bh, n, m), "b,i,m"), (a["kf"], (bh, n, m), "b,j,m")])
    return toeplitz_mix(b, kappa, node.bias.position, a["bias"], p, node.causal, a["v"], dims, d, logits=False,
                        eps=node.eps)


def _values(node: ToeplitzValues, b: Body, a: dict, p: Params) -> str:
    d = node.v.shape[-1]
    bh, n = _rows(b, a["v"], d)
    sq = (bh, n, n)
    bias = ew(b, sq, "b,i,j", [], lambda g: bias_value(g, node.bias.position, a["bias"], p, node.causal, 0.0))
    return red(b, (bh, n, d), "b,i,d", [(bias, sq, "b,i,j"), (a["v"], (bh, n, d), "b,j,d")])


def _softmax(node: SoftmaxAttention, b: Body, a: dict, p: Params) -> str:
    dk, d = node.q.shape[-1], node.v.shape[-1]
    dims = bh, n = _rows(b, a["v"], d)
    logits = red(b, (bh, n, n), "b,i,j", [(a["q"], (bh, n, dk), "b,i,e"), (a["k"], (bh, n, dk), "b,j,e")],
                 lambda g, x, y: g.f("arith.mulf", g.f("arith.mulf", x, y), g.const(node.scale)))
    pos = None if node.bias is None else node.bias.position
    return toeplitz_mix(b, logits, pos, a.get("bias"), p, node.causal, a["v"], dims, d, logits=True)


def _sampled(node: SampledAttention, b: Body, a: dict, p: Params) -> str:
    """The estimator of lowering/cpu/sampled.py, densely in the callers' row order: query i (sorted
    position invq_i, block g_i = invq_i // block) sees the keys of its block exactly (g_j = g_i, and
    invk_j ≤ invq_i when causal) and the samples s not in its block (sb_s ≠ g_i; causal: sb_s < g_i)
    with log-weights lw_s; out_i = softmax over both of (s q_i·k + lw) applied to [v; vs]."""
    dk, d = node.q.shape[-1], node.v.shape[-1]
    dims = bh, n = _rows(b, a["v"], d)
    blk = int(node.sampling["block"]) if node.sampling.name == "kde" else 1
    ns = b(f"tensor.dim {a['si']}, {b.index(1)} : tensor<?x?xi32>")
    sq, ss = (bh, n, n), (bh, n, ns)

    def at(g, t, *idx):                                  # an i32 entry as an index
        raw = g(f"tensor.extract {t}[{', '.join(idx)}] : tensor<?x?xi32>")
        return g(f"arith.index_cast {raw} : i32 to index")

    def gathered(x, width):                              # x[b, si[b, s], :]: (BH, S, width)
        def fn(g):
            bi, si, di = (g(f"linalg.index {i} : index") for i in range(3))
            return g.extract(x, tensor(("?", "?", width), g.T), bi, at(g, a["si"], bi, si), di)
        return ew(b, (bh, ns, width), "b,s,d", [], fn)
    ks, vs = gathered(a["k"], dk), a["vs"]

    def block_logit(g, dot):
        bi, i, j = (g(f"linalg.index {x} : index") for x in range(3))
        ti, tj = at(g, a["invq"], bi, i), at(g, a["invk"], bi, j)
        gi, gj = (g(f"arith.divui {t}, {g.index(blk)} : index") for t in (ti, tj))
        seen = g(f"arith.cmpi eq, {gi}, {gj} : index")
        if node.causal:
            seen = g(f"arith.andi {seen}, {g(f'arith.cmpi ule, {tj}, {ti} : index')} : i1")
        return g.select(seen, g.f("arith.mulf", dot, g.const(node.scale)), g.const(NEG_INF))

    def sample_logit(g, dot, lw):
        bi, i, si = (g(f"linalg.index {x} : index") for x in range(3))
        gi = g(f"arith.divui {at(g, a['invq'], bi, i)}, {g.index(blk)} : index")
        seen = g(f"arith.cmpi {'ult' if node.causal else 'ne'}, {at(g, a['sb'], bi, si)}, {gi} : index")
        return g.select(seen, g.f("arith.addf", g.f("arith.mulf", dot, g.const(node.scale)), lw), g.const(NEG_INF))

    dots = red(b, sq, "b,i,j", [(a["q"], (bh, n, dk), "b,i,e"), (a["k"], (bh, n, dk), "b,j,e")])
    lb = ew(b, sq, "b,i,j", [(dots, sq, "b,i,j")], block_logit)
    sdots = red(b, ss, "b,i,s", [(a["q"], (bh, n, dk), "b,i,e"), (ks, (bh, ns, dk), "b,s,e")])
    ls = ew(b, ss, "b,i,s", [(sdots, ss, "b,i,s"), (a["lw"], (bh, ns), "b,s")], sample_logit)
    mx = red(b, (bh, n), "b,i", [(lb, sq, "b,i,j")], init=NEG_INF, combine="arith.maximumf")
    mx = update(b, mx, (bh, n), "b,i", [(ls, ss, "b,i,s")], lambda g, x, m: g.f("arith.maximumf", x, m))
    e = [ew(b, sh, f"b,i,{c}", [(l, sh, f"b,i,{c}"), (mx, (bh, n), "b,i")],
            lambda g, x, m: g.exp(g.f("arith.subf", x, m))) for l, sh, c in ((lb, sq, "j"), (ls, ss, "s"))]
    num = red(b, (bh, n, d), "b,i,d", [(e[0], sq, "b,i,j"), (a["v"], (bh, n, d), "b,j,d")])
    num = update(b, num, (bh, n, d), "b,i,d", [(e[1], ss, "b,i,s"), (vs, (bh, ns, d), "b,s,d")],
                 lambda g, x, y, o: g.f("arith.addf", o, g.f("arith.mulf", x, y)))
    den = red(b, (bh, n), "b,i", [(e[0], sq, "b,i,j")])
    den = update(b, den, (bh, n), "b,i", [(e[1], ss, "b,i,s")], lambda g, x, o: g.f("arith.addf", o, x))
    return divide(b, num, den, bh, n, d)


def _add(node: Add, b: Body, a: dict, p: Params) -> str:
    d = node.shape[-1]
    bh, n = _rows(b, a["a"], d)
    return plus(b, (bh, n, d), "b,i,d", a["a"], a["b"])


BODIES = {
    FeatureMap: lambda node, b, a, p: feature_map(node, b, a["x"], a["w"]),
    LinearAttention: _linear,
    PositionalAttention: _positional,
    ToeplitzValues: _values,
    SoftmaxAttention: _softmax,
    SampledAttention: _sampled,
    Add: _add,
}
# function arguments a body reads besides its operands
EXTRA = {FeatureMap: ("w",), PositionalAttention: ("rates",), SampledAttention: SAMPLES}


def operand_type(node: Node, T: str, p: Params) -> str:
    return tensor(p.tab, T) if isinstance(node, Position) else tensor(("?", "?", node.shape[-1]), T)


def argument_types(p: Params, T: str, dk: int, dv: int) -> dict[str, str]:
    """The types of the executable function's arguments (ARGS + SAMPLES). For sampled attention:
    invq, invk (BH, N) each row's position in bucket order; si, sb (BH, S) the sampled keys and the
    sorted block holding each; lw (BH, S) their log-weights; vs (BH, S, Dv) their values."""
    i32 = tensor(("?", "?"), "i32")
    return {"q": tensor(("?", "?", dk), T), "k": tensor(("?", "?", dk), T), "v": tensor(("?", "?", dv), T),
            "w": tensor(p.proj, T), "tab": tensor(p.tab, T), "rates": tensor((p.heads, 2), T),
            "invq": i32, "invk": i32, "si": i32, "lw": tensor(("?", "?"), T), "sb": i32,
            "vs": tensor(("?", "?", dv), T)}


def body_function(name: str, node: Node, T: str, p: Params) -> str:
    """`func.func private @name(operands..., extras...)` computing the node in linalg."""
    if type(node) not in BODIES:
        raise NotLowered(node)
    operands = [(f.name, getattr(node, f.name)) for f in dialect.fields(type(node))
                if f.where == "operand" and getattr(node, f.name) is not None]
    types = argument_types(p, T, 1, node.shape[-1])
    params = [(f"%{k}", operand_type(c, T, p)) for k, c in operands]
    params += [(f"%{k}", types[k]) for k in EXTRA.get(type(node), ())]
    b = Body(T)
    result = BODIES[type(node)](node, b, {k[1:]: k for k, _ in params}, p)
    ret = tensor(("?", "?", node.shape[-1]), T)
    sig = ", ".join(f"{k}: {t}" for k, t in params)
    return "\n".join([f"func.func private @{name}({sig}) -> {ret} {{", *b.lines,
                      f"  return {result} : {ret}", "}"])


def describe(node: Node) -> str:
    """What the linalg body of a node computes, for explain()."""
    form = getattr(node, "form", None)
    if isinstance(node, FeatureMap):
        return f"φ = {node.kernel.name} ({node.role}): linalg.generic"
    if form in ("toeplitz_fft", "banded", "values_fft"):
        return f"form {form}: dense Toeplitz product, O(N²) (no FFT in MLIR)"
    if form == "pairwise":
        return "form pairwise: dense weights (BH, N, N), O(N²)"
    if form in ("prefix_sum", "decayed"):
        return f"form {form}: recurrence, scf.for over tokens" + (" (both directions)" if not node.causal else "")
    if isinstance(node, LinearAttention):
        return f"form {form}: two contractions (S = φkᵀv, out = φq S)"
    if isinstance(node, SoftmaxAttention):
        return f"form {form}: dense scores (BH, N, N), row softmax"
    if isinstance(node, SampledAttention):
        return f"form {form}: block keys + samples (sorted and drawn in torch), dense masks"
    return form or ""


# --- the rewrite -----------------------------------------------------------------------------------

CALLEE = "lowering.callee"          # a discardable attribute the rules read: the body to call


def _argument(op, name: str) -> ir.Value:
    return op.parent.regions[0].blocks[0].arguments[(ARGS + SAMPLES).index(name)]


def _call(op, rewriter) -> None:
    """attn.X(operands) -> func.call @body(operands, extras); a position operand reads %tab."""
    from torch_mlir.dialects import func
    callee = ir.FlatSymbolRefAttr(op.attributes[CALLEE]).value
    extras = ir.ArrayAttr(op.attributes["lowering.extras"])
    args = [_argument(op, "tab") if x.owner.name == "attn.position" else x for x in op.operands]
    args += [_argument(op, ir.StringAttr(e).value) for e in extras]
    with rewriter.ip, op.location:
        call = func.CallOp([op.results[0].type], callee, args)
    rewriter.replace_op(op, call)


def _input(op, rewriter) -> None:
    rewriter.replace_op(op, [_argument(op, ir.StringAttr(op.attributes["name"]).value)])


def _position(op, rewriter):
    if list(op.result.uses):
        return True                      # failure: still read (its users are rewritten first)
    rewriter.erase_op(op)


SPECIAL = {"attn.input": _input, "attn.position": _position}     # every other op: _call


def _rules() -> rewrite.FrozenRewritePatternSet:
    patterns = rewrite.RewritePatternSet()
    for name in dialect.OPS:
        patterns.add(name, SPECIAL.get(name, _call))
    return patterns.freeze()


def lower(roots: dict[str, Node], p: Params, dtype: str = "float32") -> ir.Module:
    """{block name: planned IR} -> a linalg module with @run_NAME per block (inlined, canonical).
    Raises NotLowered for a node without a body."""
    T = ELEMENT[dtype]
    with dialect.context(), ir.Location.unknown():
        module = to_module(roots, element=T)
        bodies = []
        for f, (name, root) in zip(list(module.body.operations), roots.items()):
            f = f.operation
            block = f.regions[0].blocks[0]
            inputs = {n.name: n.shape[-1] for n in postorder(root) if isinstance(n, Input)}
            dk = inputs.get("q", inputs.get("k", 1))
            dv = inputs.get("v", dk)
            args = ARGS + (SAMPLES if any(isinstance(n, SampledAttention) for n in postorder(root)) else ())
            types = argument_types(p, T, dk, dv)
            arg_types = [types[a] for a in args]
            for t in arg_types:
                block.add_argument(ir.Type.parse(t), ir.Location.unknown())
            result = ir.Type.parse(tensor(("?", "?", root.shape[-1]), T))
            f.attributes["function_type"] = ir.TypeAttr.get(
                ir.FunctionType.get([ir.Type.parse(t) for t in arg_types], [result]))
            f.attributes["sym_visibility"] = ir.StringAttr.get("private")
            for i, (op, node) in enumerate(zip(list(block.operations)[:-1], postorder(root))):
                op = op.operation
                if isinstance(node, (Input, Position)):
                    continue
                body = f"{name}__{node.op}{i}"
                bodies.append(body_function(body, node, T, p))
                op.attributes[CALLEE] = ir.FlatSymbolRefAttr.get(body)
                op.attributes["lowering.extras"] = ir.ArrayAttr.get(
                    [ir.StringAttr.get(e) for e in EXTRA.get(type(node), ())])
            out_ty = f"memref<?x?x{root.shape[-1]}x{T}>"
            sig = ", ".join(f"%{a}: {t} {{bufferization.writable = false}}" for a, t in zip(args, arg_types))
            bodies.append(
                f"func.func @run_{name}({sig}, %out: {out_ty}) attributes {{llvm.emit_c_interface}} {{\n"
                f"  %r = func.call @{name}({', '.join('%' + a for a in args)}) : "
                f"({', '.join(arg_types)}) -> {result}\n"
                f"  bufferization.materialize_in_destination %r in restrict writable %out : "
                f"({result}, {out_ty}) -> ()\n  return\n}}")
        rewrite.apply_patterns_and_fold_greedily(module, _rules())
        # the rewritten functions, the bodies they now call and the entry points, as one module
        module = ir.Module.parse("\n".join([*(str(op) for op in module.body.operations), *bodies]))
        passmanager.PassManager.parse("builtin.module(inline,symbol-dce,canonicalize,cse)").run(module.operation)
        module.operation.verify()
    return module

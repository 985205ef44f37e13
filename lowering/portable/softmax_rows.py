"""The quadratic (softmax) form as portable kernels: one thread per query row (and per key row).

quadratic.py's kernels are tiled for one CPU vector unit. These are the same maths written for
thread parallelism: every stage is a loop nest `for task in blocks(...): for lane in threads(R)`
whose bodies are independent rows, bound to blockIdx.x / threadIdx.x for CUDA (a hand schedule,
so dlight leaves these alone), or a parallel and a serial loop on llvm (how they are tested on a
machine without a GPU). Each thread keeps its row's accumulators in registers ("local") and
streams the other rows from memory; the position term b(i − j) is evaluated per pair from the
table / slopes / expression. No N×N tensor.

Shapes: Q, K (BH, N, Dk); V, O, dO (BH, N, Dv); LSE (BH, N); KB (BH, N) a bias per key (the key
padding mask's); TAB (H, P) the position parameters (P = 2W + 1 for a learned table), head
h = bh mod H. Scores s_ij = s·q_i·k_j + b(i − j) + kb_j, j ≤ i when causal.

Forward (thread per query row), online over keys:
    m' = max(m, s_ij),  l ← e^(m − m') l + e^(s_ij − m'),  o ← e^(m − m') o + e^(s_ij − m') v_j
    O_i = o / l,  LSE_i = m + log l.
Backward, with p_ij = e^(s_ij − LSE_i), D_i = dO_i·O_i, ds_ij = p_ij (dO_i·v_j − D_i):
    (rows) D;  (query rows) dq_i = s Σ_j ds_ij k_j;  (key rows) dv_j = Σ_i p_ij dO_i,
    dk_j = s Σ_i ds_ij q_i;  learned table: (diagonals) G_r = Σ_{i − j = r} ds_ij per bh, then
    (slots) dTAB[h, w] = Σ_{bh ≡ h} Σ_{r: clip(r, −W, W) + W = w} G_r.
The table's gradient recomputes every pair once more (about the cost of the rest of the backward).
"""
from __future__ import annotations

import functools

from tvm.script import tirx as T

from ..tir.position import bias_builder

THREADS = 128          # rows (threads) per thread block: the default of the rows knob


def _loops(gpu: bool):
    """(blocks, threads): a stage's task loop and lane loop — bound to blockIdx.x / threadIdx.x,
    or a parallel and a serial loop on a CPU."""
    if gpu:
        return (functools.partial(T.thread_binding, thread="blockIdx.x"),
                functools.partial(T.thread_binding, thread="threadIdx.x"))
    return T.parallel, T.serial


def _ceil(n, r):
    """⌈n / r⌉, written out where it is used: a TVMScript let outside the thread loops would not
    reach the kernels' launch parameters."""
    return (n + r - 1) // r


def _half(P):
    """W of a table of P = 2W + 1 columns."""
    return (P - 1) // 2


def _score(position, dtype):
    """(TAB, h, r, W, dot) -> s·q·k + b(r), or the scaled dot alone without a position term."""
    if position is None:
        return lambda TAB, h, r, W, dot: dot
    bias = bias_builder(position, dtype)
    return lambda TAB, h, r, W, dot: dot + bias(TAB, h, r, W)


def _bias(position, dtype):
    """(TAB, h, r, W) -> b(r), 0 without a position term."""
    if position is None:
        return lambda TAB, h, r, W: T.cast(0, dtype)
    return bias_builder(position, dtype)


def _online(Dk: int, Dv: int, dtype: str):
    """(start, fold, finish): the online normalizer of one query row, in registers — acc (Dv,) the
    output, st = [m, l, s, e^(m − m')] the running max, normalizer, score and rescale."""
    @T.macro
    def start(acc, st):
        for e in range(Dv):
            acc[e] = T.cast(0, dtype)
        st[0] = T.min_value(dtype)
        st[1] = T.cast(0, dtype)

    @T.macro
    def fold(qi, acc, st, K, V, b, row, add, vrow):
        """Key row `row` of K with score qi·k + add, value row `vrow` of V."""
        st[2] = T.cast(0, dtype)
        for c in range(Dk):
            st[2] = st[2] + qi[c] * K[b, row, c]
        st[2] = st[2] + add
        m_new = T.max(st[0], st[2])
        st[3] = T.exp(st[0] - m_new)
        p = T.exp(st[2] - m_new)
        st[1] = st[1] * st[3] + p
        for e in range(Dv):
            acc[e] = acc[e] * st[3] + p * V[b, vrow, e]
        st[0] = m_new

    @T.macro
    def finish(acc, st, O, LSE, b, row):
        for e in range(Dv):
            O[b, row, e] = acc[e] / st[1]
        LSE[b, row] = st[0] + T.log(st[1])
    return start, fold, finish


def _row_dots(blocks, threads, R: int, Dv: int, dtype: str):
    """The backward's first stage: Dd[b, i] = dO_i·O_i, a thread per row."""
    @T.macro
    def row_dots(Dd, dO, O, BH, N):
        for task in blocks(BH * _ceil(N, R)):
            for lane in threads(R):
                st = T.alloc_buffer((1,), dtype, scope="local")
                b = task // _ceil(N, R)
                i = task % _ceil(N, R) * R + lane
                if i < N:
                    st[0] = T.cast(0, dtype)
                    for e in range(Dv):
                        st[0] = st[0] + dO[b, i, e] * O[b, i, e]
                    Dd[b, i] = st[0]
    return row_dots


def _ranges(causal: bool):
    """(keys(i, N), first query(j)): how many keys query i sees (from 0), the first query that
    sees key j."""
    if causal:
        return (lambda i, N: i + 1), (lambda j: j)
    return (lambda i, N: N), (lambda j: T.int64(0))


def _window(causal: bool, windowed: bool):
    """The rows a row reaches, as loop bounds: query i's keys [key_lo(i, W), key_hi(i, N, W)),
    key j's queries first_query(j, W) + [0, queries(j, N, W)), and the pairs of diagonal
    r = i − j, diagonal(r, N, W). With a sliding window (ast.windowed: the table clipped at
    W = _half(P), the window W − 1) only those within it; without one, as _ranges (key_lo and
    key_hi are for windows only)."""
    _, first = _ranges(causal)

    def key_lo(i, W):
        return T.max(i - (W - 1), T.int64(0))

    def key_hi(i, N, W):
        return T.min(i + 1 if causal else N, i + W)

    def first_query(j, W):
        if not windowed:
            return first(j)
        return j if causal else T.max(j - (W - 1), T.int64(0))

    def queries(j, N, W):
        if not windowed:
            return N - first(j)
        return T.min(N, j + W) - first_query(j, W)

    def diagonal(r, N, W):
        if not windowed:
            return N - T.abs(r)
        return T.if_then_else(T.abs(r) < W, N - T.abs(r), T.int64(0))
    return key_lo, key_hi, first_query, queries, diagonal


def softmax_forward(name: str, Dk: int, Dv: int, dtype: str, causal: bool, scale: float, position,
                    gpu: bool, rows: int = THREADS):
    """(Q, K, V, TAB, KB, O out, LSE out)."""
    blocks, threads = _loops(gpu)
    bias = _bias(position, dtype)
    start, fold, finish = _online(Dk, Dv, dtype)
    keys, _ = _ranges(causal)
    windowed = position is not None and position.name == "window"
    key_lo, key_hi, _, _, _ = _window(causal, windowed)
    R = rows

    @T.prim_func
    def kernel(q: T.handle, k: T.handle, v: T.handle, tab: T.handle, kb: T.handle, o: T.handle, lse: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True, "tirx.is_scheduled": gpu})
        BH, N, H, P = T.int64(), T.int64(), T.int64(), T.int64()
        Q = T.match_buffer(q, (BH, N, Dk), dtype)
        K = T.match_buffer(k, (BH, N, Dk), dtype)
        V = T.match_buffer(v, (BH, N, Dv), dtype)
        TAB = T.match_buffer(tab, (H, P), dtype)
        KB = T.match_buffer(kb, (BH, N), dtype)
        O = T.match_buffer(o, (BH, N, Dv), dtype)
        LSE = T.match_buffer(lse, (BH, N), dtype)
        for task in blocks(BH * _ceil(N, R)):
            for lane in threads(R):
                qi = T.alloc_buffer((Dk,), dtype, scope="local")
                acc = T.alloc_buffer((Dv,), dtype, scope="local")
                st = T.alloc_buffer((4,), dtype, scope="local")      # m, l, s, e^(m − m')
                b = task // _ceil(N, R)
                i = task % _ceil(N, R) * R + lane
                if i < N:
                    for c in range(Dk):
                        qi[c] = Q[b, i, c] * T.cast(scale, dtype)
                    start(acc, st)
                    if windowed:                                      # only the keys within ±W
                        for jj in range(key_hi(i, N, _half(P)) - key_lo(i, _half(P))):
                            j = jj + key_lo(i, _half(P))
                            fold(qi, acc, st, K, V, b, j, bias(TAB, b % H, i - j, _half(P)) + KB[b, j], j)
                    else:
                        for j in range(keys(i, N)):
                            fold(qi, acc, st, K, V, b, j, bias(TAB, b % H, i - j, _half(P)) + KB[b, j], j)
                    finish(acc, st, O, LSE, b, i)
    return kernel


def softmax_backward(name: str, Dk: int, Dv: int, dtype: str, causal: bool, scale: float, position,
                     learn: bool, gpu: bool, rows: int = THREADS):
    """(Q, K, V, TAB, KB, O, LSE, dO, dQ out, dK out, dV out, dTAB out (zeroed by the caller))."""
    blocks, threads = _loops(gpu)
    score = _score(position, dtype)
    keys, _ = _ranges(causal)
    windowed = position is not None and position.name == "window"
    key_lo, key_hi, first_query, queries, diagonal = _window(causal, windowed)
    r0 = -1 if not causal else 0          # the smallest diagonal r = i − j with pairs
    R = rows
    sc = float(scale)
    row_dots = _row_dots(blocks, threads, R, Dv, dtype)

    @T.macro
    def dq_pair(qi, gi, acc, st, K, V, TAB, KB, LSE, Dd, b, i, j, H, P):
        """acc += ds_ij k_j (the pair's term of dq_i / s)."""
        st[0] = T.cast(0, dtype)
        for c in range(Dk):
            st[0] = st[0] + qi[c] * K[b, j, c]
        st[1] = T.cast(0, dtype)
        for e in range(Dv):
            st[1] = st[1] + gi[e] * V[b, j, e]
        ds = T.exp(score(TAB, b % H, i - j, _half(P), st[0]) + KB[b, j] - LSE[b, i]) * (st[1] - Dd[b, i])
        for c in range(Dk):
            acc[c] = acc[c] + ds * K[b, j, c]

    @T.prim_func
    def kernel(q: T.handle, k: T.handle, v: T.handle, tab: T.handle, kb: T.handle, o: T.handle, lse: T.handle,
               do: T.handle, dq: T.handle, dk: T.handle, dv: T.handle, dtab: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True, "tirx.is_scheduled": gpu})
        BH, N, H, P = T.int64(), T.int64(), T.int64(), T.int64()
        Q = T.match_buffer(q, (BH, N, Dk), dtype)
        K = T.match_buffer(k, (BH, N, Dk), dtype)
        V = T.match_buffer(v, (BH, N, Dv), dtype)
        TAB = T.match_buffer(tab, (H, P), dtype)
        KB = T.match_buffer(kb, (BH, N), dtype)
        O = T.match_buffer(o, (BH, N, Dv), dtype)
        LSE = T.match_buffer(lse, (BH, N), dtype)
        dO = T.match_buffer(do, (BH, N, Dv), dtype)
        dQ = T.match_buffer(dq, (BH, N, Dk), dtype)
        dK = T.match_buffer(dk, (BH, N, Dk), dtype)
        dV = T.match_buffer(dv, (BH, N, Dv), dtype)
        dTAB = T.match_buffer(dtab, (H, P), dtype)
        Dd = T.alloc_buffer((BH, N), dtype)                   # D_i = dO_i·O_i
        row_dots(Dd, dO, O, BH, N)
        for task in blocks(BH * _ceil(N, R)):                          # query rows: dq
            for lane in threads(R):
                qi = T.alloc_buffer((Dk,), dtype, scope="local")
                gi = T.alloc_buffer((Dv,), dtype, scope="local")
                acc = T.alloc_buffer((Dk,), dtype, scope="local")
                st = T.alloc_buffer((2,), dtype, scope="local")      # s, dO_i·v_j
                b = task // _ceil(N, R)
                i = task % _ceil(N, R) * R + lane
                if i < N:
                    for c in range(Dk):
                        qi[c] = Q[b, i, c] * T.cast(sc, dtype)
                        acc[c] = T.cast(0, dtype)
                    for e in range(Dv):
                        gi[e] = dO[b, i, e]
                    if windowed:                                      # only the keys within ±W
                        for jj in range(key_hi(i, N, _half(P)) - key_lo(i, _half(P))):
                            j = jj + key_lo(i, _half(P))
                            dq_pair(qi, gi, acc, st, K, V, TAB, KB, LSE, Dd, b, i, j, H, P)
                    else:
                        for j in range(keys(i, N)):
                            dq_pair(qi, gi, acc, st, K, V, TAB, KB, LSE, Dd, b, i, j, H, P)
                    for c in range(Dk):
                        dQ[b, i, c] = acc[c] * T.cast(sc, dtype)
        for task in blocks(BH * _ceil(N, R)):                          # key rows: dk, dv
            for lane in threads(R):
                kj = T.alloc_buffer((Dk,), dtype, scope="local")
                vj = T.alloc_buffer((Dv,), dtype, scope="local")
                ak = T.alloc_buffer((Dk,), dtype, scope="local")
                av = T.alloc_buffer((Dv,), dtype, scope="local")
                st = T.alloc_buffer((3,), dtype, scope="local")      # s, p, dO_i·v_j
                b = task // _ceil(N, R)
                j = task % _ceil(N, R) * R + lane
                if j < N:
                    for c in range(Dk):
                        kj[c] = K[b, j, c] * T.cast(sc, dtype)
                        ak[c] = T.cast(0, dtype)
                    for e in range(Dv):
                        vj[e] = V[b, j, e]
                        av[e] = T.cast(0, dtype)
                    for i0 in range(queries(j, N, _half(P))):
                        i = i0 + first_query(j, _half(P))
                        st[0] = T.cast(0, dtype)
                        for c in range(Dk):
                            st[0] = st[0] + Q[b, i, c] * kj[c]
                        st[1] = T.exp(score(TAB, b % H, i - j, _half(P), st[0]) + KB[b, j] - LSE[b, i])
                        st[2] = T.cast(0, dtype)
                        for e in range(Dv):
                            st[2] = st[2] + dO[b, i, e] * vj[e]
                            av[e] = av[e] + st[1] * dO[b, i, e]
                        ds = st[1] * (st[2] - Dd[b, i])
                        for c in range(Dk):
                            ak[c] = ak[c] + ds * Q[b, i, c]
                    for c in range(Dk):
                        dK[b, j, c] = ak[c] * T.cast(sc, dtype)
                    for e in range(Dv):
                        dV[b, j, e] = av[e]
        if learn:
            G = T.alloc_buffer((BH, 2 * N), dtype)            # G[b, r + N − 1] = Σ_{i − j = r} ds_ij
            for task in blocks(BH * _ceil(2 * N - 1, R)):                      # diagonals
                for lane in threads(R):
                    st = T.alloc_buffer((3,), dtype, scope="local")  # s, dO_i·v_j, Σ ds
                    b = task // _ceil(2 * N - 1, R)
                    d = task % _ceil(2 * N - 1, R) * R + lane
                    r = d - (N - 1)                           # i − j
                    if d < 2 * N - 1:
                        st[2] = T.cast(0, dtype)
                        if r >= r0 * (N - 1):
                            for t in range(diagonal(r, N, _half(P))):
                                i = t + T.max(r, T.int64(0))
                                j = i - r
                                st[0] = T.cast(0, dtype)
                                for c in range(Dk):
                                    st[0] = st[0] + Q[b, i, c] * K[b, j, c]
                                st[1] = T.cast(0, dtype)
                                for e in range(Dv):
                                    st[1] = st[1] + dO[b, i, e] * V[b, j, e]
                                st[2] = st[2] + T.exp(score(TAB, b % H, r, _half(P), st[0] * T.cast(sc, dtype))
                                                      + KB[b, j] - LSE[b, i]) * (st[1] - Dd[b, i])
                        G[b, d] = st[2]
            for task in blocks(_ceil(H * P, R)):                           # table slots
                for lane in threads(R):
                    st = T.alloc_buffer((1,), dtype, scope="local")
                    x = task * R + lane
                    if x < H * P:
                        h = x // P
                        w = x % P
                        lo = T.if_then_else(w == 0, -(N - 1), w - _half(P))      # the r with slot(r) = w
                        hi = T.if_then_else(w == 2 * _half(P), N - 1, w - _half(P))
                        lo_c = T.max(lo, -(N - 1))
                        hi_c = T.min(hi, N - 1)
                        st[0] = T.cast(0, dtype)
                        for bb in range(BH // H):
                            for rr in range(T.max(hi_c - lo_c + 1, T.int64(0))):
                                st[0] = st[0] + G[bb * H + h, lo_c + rr + N - 1]
                        dTAB[h, w] = st[0]
    return kernel



# --- sampled softmax (KDEformer, uniform): sampled.py's estimator, a thread per row ------------------
#
# Rows in sorted order: sorted query i is row PQ[i] of Q, sorted key j row PK[j] of K, V; blocks of
# `blk` sorted rows, g(i) = i // blk. Query i sees its block's keys (j ≤ i when causal), weight 1,
# and sample t (row SI_t of K, value VS_t, log-weight LW_t) iff SB_t ≠ g(i) (causal: SB_t < g(i)).
# A block key's score adds KB (BH, N), the key padding mask's bias; the samples are never padded.

def _sampled_helpers(causal: bool):
    """(keys of query i's block: first, count; queries of key j's block: first, count; sample
    visibility) as expressions over sorted positions."""
    def own_keys(i, N, blk):
        start = i // blk * blk
        return start, (i - start + 1) if causal else (T.min(start + blk, N) - start)

    def own_queries(j, N, blk):
        start = j // blk * blk
        first = j if causal else start
        return first, T.min(start + blk, N) - first

    def sees(sb, i, blk):
        return T.Cast("int64", sb) < i // blk if causal else T.Cast("int64", sb) != i // blk
    return own_keys, own_queries, sees


def sampled_forward(name: str, Dk: int, Dv: int, dtype: str, causal: bool, scale: float, gpu: bool,
                    rows: int = THREADS):
    """(Q, K, V, PQ, PK, SI, LW, SB, VS, KB, O out, LSE out, blk): sampled.py's forward."""
    blocks, threads = _loops(gpu)
    own_keys, _, sees = _sampled_helpers(causal)
    start, fold, finish = _online(Dk, Dv, dtype)
    R = rows

    @T.prim_func
    def kernel(q: T.handle, k: T.handle, v: T.handle, pq: T.handle, pk: T.handle, si: T.handle,
               lw: T.handle, sb: T.handle, vs: T.handle, kb: T.handle, o: T.handle, lse: T.handle, blk: T.int64):
        T.func_attr({"global_symbol": name, "tirx.noalias": True, "tirx.is_scheduled": gpu})
        BH, N, S = T.int64(), T.int64(), T.int64()
        Q = T.match_buffer(q, (BH, N, Dk), dtype)
        K = T.match_buffer(k, (BH, N, Dk), dtype)
        V = T.match_buffer(v, (BH, N, Dv), dtype)
        PQ = T.match_buffer(pq, (BH, N), "int32")
        PK = T.match_buffer(pk, (BH, N), "int32")
        SI = T.match_buffer(si, (BH, S), "int32")
        LW = T.match_buffer(lw, (BH, S), dtype)
        SB = T.match_buffer(sb, (BH, S), "int32")
        VS = T.match_buffer(vs, (BH, S, Dv), dtype)
        KB = T.match_buffer(kb, (BH, N), dtype)
        O = T.match_buffer(o, (BH, N, Dv), dtype)
        LSE = T.match_buffer(lse, (BH, N), dtype)
        for task in blocks(BH * _ceil(N, R)):
            for lane in threads(R):
                qi = T.alloc_buffer((Dk,), dtype, scope="local")
                acc = T.alloc_buffer((Dv,), dtype, scope="local")
                st = T.alloc_buffer((4,), dtype, scope="local")      # m, l, s, e^(m − m')
                b = task // _ceil(N, R)
                i = task % _ceil(N, R) * R + lane
                if i < N:
                    for c in range(Dk):
                        qi[c] = Q[b, PQ[b, i], c] * T.cast(scale, dtype)
                    start(acc, st)
                    for jj in range(own_keys(i, N, blk)[1]):
                        fold(qi, acc, st, K, V, b, PK[b, own_keys(i, N, blk)[0] + jj],
                             KB[b, PK[b, own_keys(i, N, blk)[0] + jj]], PK[b, own_keys(i, N, blk)[0] + jj])
                    for t in range(S):
                        if sees(SB[b, t], i, blk):
                            fold(qi, acc, st, K, VS, b, SI[b, t], LW[b, t], t)
                    finish(acc, st, O, LSE, b, PQ[b, i])
    return kernel


def sampled_backward(name: str, Dk: int, Dv: int, dtype: str, causal: bool, scale: float, gpu: bool,
                     rows: int = THREADS):
    """(Q, K, V, PQ, PK, SI, LW, SB, VS, KB, O, LSE, dO, dQ, dK, dV, dKS, dVS, dLW out, blk), sampled.py's
    backward: dK, dV the block keys' share (a thread per sorted key), dKS, dVS, dLW a thread per
    sample over every query that sees it (the caller adds dKS into rows SI; dVS is VS's gradient)."""
    blocks, threads = _loops(gpu)
    own_keys, own_queries, sees = _sampled_helpers(causal)
    R = rows
    sc = float(scale)
    row_dots = _row_dots(blocks, threads, R, Dv, dtype)

    @T.macro
    def pair(st, Q, K, V, dO, LSE, Dd, b, qrow, krow, lw, vrow):
        """st[0] = p, st[1] = dS of query row qrow, key row krow of K and value row vrow of V."""
        st[0] = lw
        for c in range(Dk):
            st[0] = st[0] + Q[b, qrow, c] * K[b, krow, c] * T.cast(sc, dtype)
        st[0] = T.exp(st[0] - LSE[b, qrow])
        st[1] = T.cast(0, dtype)
        for e in range(Dv):
            st[1] = st[1] + dO[b, qrow, e] * V[b, vrow, e]
        st[1] = st[0] * (st[1] - Dd[b, qrow])

    @T.macro
    def key_side(ak, av, st, Q, dO, b, qrow):
        for e in range(Dv):
            av[e] = av[e] + st[0] * dO[b, qrow, e]
        for c in range(Dk):
            ak[c] = ak[c] + st[1] * Q[b, qrow, c]

    @T.prim_func
    def kernel(q: T.handle, k: T.handle, v: T.handle, pq: T.handle, pk: T.handle, si: T.handle,
               lw: T.handle, sb: T.handle, vs: T.handle, kb: T.handle, o: T.handle, lse: T.handle, do: T.handle,
               dq: T.handle, dk: T.handle, dv: T.handle, dks: T.handle, dvs: T.handle, dlw: T.handle, blk: T.int64):
        T.func_attr({"global_symbol": name, "tirx.noalias": True, "tirx.is_scheduled": gpu})
        BH, N, S = T.int64(), T.int64(), T.int64()
        Q = T.match_buffer(q, (BH, N, Dk), dtype)
        K = T.match_buffer(k, (BH, N, Dk), dtype)
        V = T.match_buffer(v, (BH, N, Dv), dtype)
        PQ = T.match_buffer(pq, (BH, N), "int32")
        PK = T.match_buffer(pk, (BH, N), "int32")
        SI = T.match_buffer(si, (BH, S), "int32")
        LW = T.match_buffer(lw, (BH, S), dtype)
        SB = T.match_buffer(sb, (BH, S), "int32")
        VS = T.match_buffer(vs, (BH, S, Dv), dtype)
        KB = T.match_buffer(kb, (BH, N), dtype)
        O = T.match_buffer(o, (BH, N, Dv), dtype)
        LSE = T.match_buffer(lse, (BH, N), dtype)
        dO = T.match_buffer(do, (BH, N, Dv), dtype)
        dQ = T.match_buffer(dq, (BH, N, Dk), dtype)
        dK = T.match_buffer(dk, (BH, N, Dk), dtype)
        dV = T.match_buffer(dv, (BH, N, Dv), dtype)
        dKS = T.match_buffer(dks, (BH, S, Dk), dtype)
        dVS = T.match_buffer(dvs, (BH, S, Dv), dtype)
        dLW = T.match_buffer(dlw, (BH, S), dtype)
        Dd = T.alloc_buffer((BH, N), dtype)                   # D = dO·O, by row
        row_dots(Dd, dO, O, BH, N)
        for task in blocks(BH * _ceil(N, R)):                 # sorted query rows: dq
            for lane in threads(R):
                acc = T.alloc_buffer((Dk,), dtype, scope="local")
                st = T.alloc_buffer((2,), dtype, scope="local")      # p, dS
                b = task // _ceil(N, R)
                i = task % _ceil(N, R) * R + lane
                if i < N:
                    for c in range(Dk):
                        acc[c] = T.cast(0, dtype)
                    for jj in range(own_keys(i, N, blk)[1]):
                        pair(st, Q, K, V, dO, LSE, Dd, b, PQ[b, i], PK[b, own_keys(i, N, blk)[0] + jj],
                             KB[b, PK[b, own_keys(i, N, blk)[0] + jj]], PK[b, own_keys(i, N, blk)[0] + jj])
                        for c in range(Dk):
                            acc[c] = acc[c] + st[1] * K[b, PK[b, own_keys(i, N, blk)[0] + jj], c]
                    for t in range(S):
                        if sees(SB[b, t], i, blk):
                            pair(st, Q, K, VS, dO, LSE, Dd, b, PQ[b, i], SI[b, t], LW[b, t], t)
                            for c in range(Dk):
                                acc[c] = acc[c] + st[1] * K[b, SI[b, t], c]
                    for c in range(Dk):
                        dQ[b, PQ[b, i], c] = acc[c] * T.cast(sc, dtype)
        for task in blocks(BH * _ceil(N, R)):                 # sorted key rows: dk, dv (block share)
            for lane in threads(R):
                ak = T.alloc_buffer((Dk,), dtype, scope="local")
                av = T.alloc_buffer((Dv,), dtype, scope="local")
                st = T.alloc_buffer((2,), dtype, scope="local")
                b = task // _ceil(N, R)
                j = task % _ceil(N, R) * R + lane
                if j < N:
                    for c in range(Dk):
                        ak[c] = T.cast(0, dtype)
                    for e in range(Dv):
                        av[e] = T.cast(0, dtype)
                    for ii in range(own_queries(j, N, blk)[1]):
                        pair(st, Q, K, V, dO, LSE, Dd, b, PQ[b, own_queries(j, N, blk)[0] + ii], PK[b, j],
                             KB[b, PK[b, j]], PK[b, j])
                        key_side(ak, av, st, Q, dO, b, PQ[b, own_queries(j, N, blk)[0] + ii])
                    for c in range(Dk):
                        dK[b, PK[b, j], c] = ak[c] * T.cast(sc, dtype)
                    for e in range(Dv):
                        dV[b, PK[b, j], e] = av[e]
        for task in blocks(_ceil(BH * S, R)):                 # samples: dks, dvs, dlw
            for lane in threads(R):
                ak = T.alloc_buffer((Dk,), dtype, scope="local")
                av = T.alloc_buffer((Dv,), dtype, scope="local")
                st = T.alloc_buffer((3,), dtype, scope="local")      # p, dS, Σ dS
                x = task * R + lane
                if x < BH * S:
                    b = x // S
                    t = x % S
                    for c in range(Dk):
                        ak[c] = T.cast(0, dtype)
                    for e in range(Dv):
                        av[e] = T.cast(0, dtype)
                    st[2] = T.cast(0, dtype)
                    for i in range(N):
                        if sees(SB[b, t], i, blk):
                            pair(st, Q, K, VS, dO, LSE, Dd, b, PQ[b, i], SI[b, t], LW[b, t], t)
                            key_side(ak, av, st, Q, dO, b, PQ[b, i])
                            st[2] = st[2] + st[1]
                    for c in range(Dk):
                        dKS[b, t, c] = ak[c] * T.cast(sc, dtype)
                    for e in range(Dv):
                        dVS[b, t, e] = av[e]
                    dLW[b, t] = st[2]
    return kernel

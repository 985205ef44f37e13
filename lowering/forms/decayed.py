"""decayed: exp(b(r)) = γ_f^r (r ≥ 0), γ_b^(−r) (r < 0), as passes/geometric.py recognises (alibi,
affine user functions): a running state that decays by γ per token,
S_i = γ S_{i−1} + φk_i⊗[v_i, 1], and without a causal mask a second one backward in time.

CPU kernels: linear.py (with a slope); portable: te_forms.py. The kernels read the rates as TAB
(H, 2): earlier keys, later keys.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from attndsl.ir import PositionalAttention
from attndsl.passes.geometric import decay_rates, decayed_floor

from ..costs import linear_cost
from ..form import Form, keys_out, knob, watched
from .feature_map import site_map


def _slope(TAB, h, later):
    """γ = exp(−TAB[h, later]): TAB (H, 2) holds the rates for earlier and later keys."""
    return TAB[h, 1 if later else 0]


def lower_cpu(node: PositionalAttention, names, dtype, knobs):
    from ..cpu import linear
    m, d = node.qf.shape[-1], node.v.shape[-1]
    return {names[0]: linear.linear_forward(names[0], m, d, dtype, node.causal, slope=_slope,
                                            knobs=knobs.get(names[0]),
                                            eps=decayed_floor(node.eps, node.bias.position)),
            names[1]: linear.linear_backward(names[1], m, d, dtype, node.causal, slope=_slope,
                                             knobs=knobs.get(names[1]))}


def lower_portable(node: PositionalAttention, names, dtype, knobs, gpu):
    from ..portable import te_forms
    m, d = node.qf.shape[-1], node.v.shape[-1]
    cf, cb = knob(knobs, names, "portable_linear", "chunk")
    return {names[0]: te_forms.linear_forward(names[0], m, d, dtype, node.causal, decayed=True, chunk=cf,
                                              eps=decayed_floor(node.eps, node.bias.position)),
            names[1]: te_forms.linear_backward(names[1], m, d, dtype, node.causal, decayed=True, chunk=cb)}


def decode_cpu(node: PositionalAttention, name, dtype):
    from ..cpu import decode
    return decode.step_kernel(name, site_map(node), node.v.shape[-1], dtype, True,
                              decayed_floor(node.eps, node.bias.position))


def rates(node: PositionalAttention, tab: torch.Tensor) -> torch.Tensor:
    """(H, 2) decay rates (earlier keys, later keys) of exp(b(r)) ∝ e^(−a·|r|): alibi's slopes
    (tab, (H, 1)), a user function's constants, or a learned term's b(0) − b(1) from its values
    b(r) at r = −(n − 1) … n − 1 (tab, (H, 2n − 1)), differentiable in them; later is 0 and
    unused when causal."""
    def column(rate):
        if rate == "table":
            return tab
        if rate == "learned":
            n = (tab.shape[1] + 1) // 2
            return tab[:, n - 1:n] - tab[:, n:n + 1] if n > 1 else torch.zeros_like(tab[:, :1])
        return torch.full_like(tab[:, :1], rate or 0.0)
    return torch.cat([column(rate) for rate in decay_rates(node.bias.position, node.causal)], 1)


def _rate_gradient(qf, kf, rate):
    """qf·e^(−δ·i), kf·e^(δ·j) with δ = rate − rate.detach() (H,): factors of exactly 1, whose
    gradient in δ is the rate's. A pair's weight e^(−a(i − j)) is the features' product times
    e^(−δ(i − j)), so dL/da = −Σ_i i·(φq_i·dφq_i) + Σ_j j·(φk_j·dφk_j), which autograd forms from the
    kernels' dφq, dφk (causal: one rate per head)."""
    delta = rate - rate.detach()
    i = torch.arange(qf.shape[1], dtype=qf.dtype, device=qf.device)
    lag = delta.repeat(qf.shape[0] // delta.shape[0])[:, None] * i           # (BH, N)
    return qf * torch.exp(-lag)[..., None], kf * torch.exp(lag)[..., None]


# a row whose nearest kept key lies a·distance nats away has weights of e^(−a·distance) at most:
# past this many nats the kernels' normalizer would near precision.UNDERFLOW, so _beyond computes it
BEYOND = {torch.float32: 25.0, torch.float64: 600.0}


def _beyond(node, pad, a):
    """Under a key padding mask: the rows past the last kept key (and, without a causal mask,
    before the first) of the batch·head rows where those lie more than BEYOND nats from it, as
    (BH, N) bools (tail, head), with the last and first kept key (BH,); None when there are none
    (or under torch.compile)."""
    if pad is None or pad.rows is None:
        return None
    kept = ~pad.keys
    n, any_kept = kept.shape[1], kept.any(1)
    last = n - 1 - kept.flip(1).int().argmax(1)
    first = kept.int().argmax(1)
    i = torch.arange(n, device=kept.device)
    per_row = a.detach().repeat(kept.shape[0] // a.shape[0], 1)                  # (BH, 2)
    limit = BEYOND.get(a.dtype, BEYOND[torch.float32])
    tail = (i > last[:, None]) & (any_kept & (per_row[:, 0] * (n - 1 - last) > limit))[:, None]
    head = torch.zeros_like(tail)
    if not node.causal:
        head = (i < first[:, None]) & (any_kept & (per_row[:, 1] * first > limit))[:, None]
    if not bool(tail.any() or head.any()):
        return None
    return tail, head, last, first


class _Pieces(NamedTuple):
    """The far-row formula at one side's rows: qs (S, R, M) their features, ks (S, K, M), vs the
    keys', the keys' lag behind (or ahead of) `at` and weights w = e^(−rate·lag) (S, K),
    kw = ks·w, Sv = kwᵀ vs (S, M, Dv), zs = Σ kw (S, M), u = 1 / denominator (S, R), fu the
    floor's share of it (float64, ≤ 1; None without a floor), dist = |i − at|, o the rows' output."""
    qs: torch.Tensor
    ks: torch.Tensor
    vs: torch.Tensor
    lag: torch.Tensor
    w: torch.Tensor
    kw: torch.Tensor
    Sv: torch.Tensor
    zs: torch.Tensor
    u: torch.Tensor
    fu: torch.Tensor | None
    dist: torch.Tensor
    o: torch.Tensor


# past this many nats a key's weight e^(−rate·lag) is 0 in the dtype (below half its smallest
# subnormal): the far rows' sums leave such keys out, exactly
VANISHES = {torch.float32: 105.0, torch.float64: 746.0}


class _Far:
    """One side's far rows (_beyond) in the S batch·head rows `sel` that have some: their query
    rows `rows` (a slice), the keys `keys` they see with a weight the dtype holds (a slice), which
    of rows[sel, rows] are far (`mask` (S, R)), the kept key `at` (S,) they are measured from, and
    the side (0: past the last kept key, 1: before the first). a: the rates (H, 2)."""

    def __init__(self, side, rows_mask, at, a):
        self.side = side
        self.sel = rows_mask.any(1).nonzero().flatten()
        span = rows_mask[self.sel].any(0).nonzero().flatten()
        n = rows_mask.shape[1]
        self.rows = slice(int(span[0]), int(span[-1]) + 1)
        self.at = at[self.sel]
        reach = math.ceil(VANISHES.get(a.dtype, VANISHES[torch.float64]) / float(self.rates(a.detach()).min()))
        self.keys = (slice(max(0, int(self.at.min()) - reach), int(self.at.max()) + 1) if side == 0
                     else slice(int(self.at.min()), min(n, int(self.at.max()) + reach + 1)))
        self.mask = rows_mask[self.sel, self.rows]
        self.index = (self.sel[:, None], torch.arange(self.rows.start, self.rows.stop, device=at.device))
        self.key_index = (self.sel[:, None], torch.arange(self.keys.start, self.keys.stop, device=at.device))

    def rates(self, a):
        """The side's rate of each selected batch·head row (S,) (head bh mod H), from a (H, 2)."""
        return a[self.sel % a.shape[0], self.side]

    def pieces(self, qf, kf, v, a, floor) -> _Pieces:
        """Every kept key lies on one side, so a far row's weights are e^(−a·|i − at|) times those
        of a query at `at`, a factor that cancels but against the floor:
        out_i = φq_i·S / (φq_i·z + floor·e^(a·|i − at|)), S, z the state at `at`
        (O((R + keys)·M·Dv) in torch; 1 / denominator in float64: a row far enough out gives 0,
        as the reference does)."""
        dev, dt = qf.device, qf.dtype
        rate = self.rates(a)
        qs, ks, vs = qf[self.index], kf[self.key_index], v[self.key_index]
        i = torch.arange(self.rows.start, self.rows.stop, device=dev, dtype=dt)
        j = torch.arange(self.keys.start, self.keys.stop, device=dev, dtype=dt)
        lag = (self.at[:, None] - j) if self.side == 0 else (j - self.at[:, None])
        w = torch.exp(-rate[:, None] * lag.clamp_min(0)).masked_fill(lag < 0, 0)
        kw = ks * w[..., None]
        Sv, zs = kw.transpose(1, 2) @ vs, kw.sum(1)
        den = (qs @ zs[..., None])[..., 0].double()
        dist = (i - self.at[:, None]).abs().double()
        fl = floor * torch.exp((dist * rate[:, None].double()).clamp(max=700.0)) if floor else 0.0
        u = 1 / (den + fl)
        fu = fl * u if floor else None
        u = u.to(dt)
        return _Pieces(qs, ks, vs, lag, w, kw, Sv, zs, u, fu, dist, (qs @ Sv) * u[..., None])


class _WithFarRows(torch.autograd.Function):
    """The decayed kernels with the far rows left out (as rows with no key) and _Far.pieces's
    values written there, as one autograd node: the backward adds the far rows' gradients to the
    kernels' on the rows and keys they touch, in place (no full-size scatter per input).
    Inputs: the kernels' qk (φq, φk, scaled for learned rates' gradients), v, the rates a (H, 2),
    the rows to skip, the library and kernel, the _Far sides, the floor, and φq, φk as the far
    rows read them (the same tensors unless scaled)."""

    @staticmethod
    def forward(ctx, q_k, k_k, v, a, skip, lib, name, fars, floor, qf, kf):
        from attndsl import ops
        out, den = ops.linear_attention(q_k, k_k, v, a.detach(), skip, lib, name)
        pieces = [far.pieces(qf, kf, v, a, floor) for far in fars]
        for far, p in zip(fars, pieces):
            out[far.index] = torch.where(far.mask[..., None], p.o, out[far.index])
        ctx.pieces = pieces if any(ctx.needs_input_grad) else None     # the backward's, not recomputed
        ctx.same = q_k is qf and k_k is kf                  # unscaled: the far rows' gradients go in place
        ctx.save_for_backward(q_k, k_k, v, a, skip, out, den)
        ctx.lib, ctx.name, ctx.fars = lib, name, fars
        ctx.mark_non_differentiable(den)
        return out, den

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dden):
        from attndsl import ops
        q_k, k_k, v, a, skip, out, den = ctx.saved_tensors
        dq, dk, dv = ops.linear_attention_backward(q_k, k_k, v, a.detach(), skip, out, den, dout.contiguous(),
                                                   ctx.lib, ctx.name)
        dqf, dkf = (dq, dk) if ctx.same else (torch.zeros_like(dq), torch.zeros_like(dk))
        da = torch.zeros_like(a) if ctx.needs_input_grad[3] else None
        for far, (qs, ks, vs, lag, w, kw, Sv, zs, u, fu, dist, o) in zip(ctx.fars, ctx.pieces):
            g = dout[far.index] * far.mask[..., None]                               # the far rows' dout
            c = (o * g).sum(-1) * u                                                 # −∂L/∂denominator
            dSv = qs.transpose(1, 2) @ (g * u[..., None])                           # (S, M, Dv)
            dz = -(qs * c[..., None]).sum(1)                                        # (S, M)
            dkw = vs @ dSv.transpose(1, 2) + dz[:, None, :]                         # (S, K, M)
            dqf.index_put_(far.index, (g * u[..., None]) @ Sv.transpose(1, 2) - c[..., None] * zs[:, None, :],
                           accumulate=True)
            dkf.index_put_(far.key_index, dkw * w[..., None], accumulate=True)
            dv.index_put_(far.key_index, kw @ dSv, accumulate=True)
            if da is not None:                                                      # through w and the floor
                drate = -((ks * dkw).sum(-1) * w * lag.clamp_min(0)).sum(1)
                if fu is not None:
                    drate = drate - ((o * g).sum(-1).double() * fu * dist).sum(1).to(drate.dtype)
                heads = far.sel % a.shape[0]
                da[:, far.side].index_add_(0, heads, drate)
        if ctx.same:
            return dq, dk, dv, da, None, None, None, None, None, None, None
        return dq, dk, dv, da, None, None, None, None, None, dqf, dkf


def run(node, args, lib, name, params):
    from attndsl import ops
    qf, kf, v, tab = args
    kf, empty = keys_out(kf, params)
    a = rates(node, tab)
    qk = _rate_gradient(qf, kf, a[:, 0]) if a.requires_grad else (qf, kf)   # learned rates, under autograd
    far = _beyond(node, params["pad"], a)
    if far is None:
        return watched(ops.fast.linear_attention(*qk, v, a.detach(), empty, lib, name), params)
    # rows far from every kept key: the kernels leave them out (as rows with no key: out 0,
    # normalizer 1) and _Far computes them
    tail, head, last, first = far
    skip = tail | head if empty.numel() == 0 else empty | tail | head
    fars = [_Far(side, rows, at, a) for side, rows, at in ((0, tail, last), (1, head, first)) if bool(rows.any())]
    floor = decayed_floor(node.eps, node.bias.position)
    return watched(_WithFarRows.apply(*qk, v, a, skip, lib, name, fars, floor, qf, kf), params)


def _cost(n: PositionalAttention, N: int) -> float:
    """The prefix-sum recurrence plus the decay weights; twice that with a second, backward-in-time
    pass for the later keys (non-causal)."""
    return (1 if n.causal else 2) * 1.1 * linear_cost(n, N)


FORMS = [
    Form("decayed", PositionalAttention, lambda n: decay_rates(n.bias.position, n.causal) is not None, _cost,
         "exp(b(r)) = γ^|r|: a running state that decays by γ per token, S_i = γ S_{i−1} + φk_i⊗[v_i, 1] "
         "(and, without a causal mask, a second one backward in time over the later keys)",
         lower_cpu, lower_portable, run, "linear_attention", "linear", "portable_linear",
         probe="kernel = elu1; position = alibi; mask = causal", decode=decode_cpu),
]

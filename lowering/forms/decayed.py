"""decayed: exp(b(r)) = γ_f^r (r ≥ 0), γ_b^(−r) (r < 0), as passes/geometric.py recognises (alibi,
affine user functions): a running state that decays by γ per token,
S_i = γ S_{i−1} + φk_i⊗[v_i, 1], and without a causal mask a second one backward in time.

CPU kernels: linear.py (with a slope); portable: te_forms.py. The kernels read the rates as TAB
(H, 2): earlier keys, later keys.
"""
from __future__ import annotations

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


def _far_rows(qf, kf, v, rate, at, side: int, floor, rows: slice, keys: slice):
    """out (S, R, Dv) of S batch·head rows at the rows `rows` (R of them) far on one side of the
    key `at` (S,) (side 0: past the last kept key, 1: before the first) of a decayed term with
    rates `rate` (S,); qf (S, R, M) those rows' features, kf, v the keys `keys` (the padded ones
    zeroed). Every kept key lies on that side, so such a row's weights are e^(−a·|i − at|) times
    those of a query at `at`, a factor that cancels but against the floor:
    out_i = φq_i·S / (φq_i·z + floor·e^(a·|i − at|)), S, z the state at `at` (O((R + keys)·M·Dv)
    in torch; 1 / denominator in float64: a row far enough out gives 0, as the reference does)."""
    dev, dt = qf.device, qf.dtype
    i = torch.arange(rows.start, rows.stop, device=dev, dtype=dt)
    j = torch.arange(keys.start, keys.stop, device=dev, dtype=dt)
    lag = (at[:, None] - j) if side == 0 else (j - at[:, None])                  # the keys' distance from at
    w = torch.exp(-rate[:, None] * lag.clamp_min(0)).masked_fill(lag < 0, 0)
    kw = kf * w[..., None]
    num = qf @ (kw.transpose(1, 2) @ v)                                          # (S, R, Dv)
    den = (qf @ kw.sum(1)[..., None])[..., 0].double()                           # (S, R)
    if floor:
        far = (i - at[:, None]).abs().double() * rate[:, None].double()
        den = den + floor * torch.exp(far.clamp(max=700.0))
    return num * (1 / den).to(dt)[..., None]


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
    # normalizer 1) and _far_rows computes them
    tail, head, last, first = far
    skip = tail | head if empty.numel() == 0 else empty | tail | head
    out = watched(ops.fast.linear_attention(*qk, v, a.detach(), skip, lib, name), params)
    floor = decayed_floor(node.eps, node.bias.position)
    n, copied = qf.shape[1], False
    for side, rows, at in ((0, tail, last), (1, head, first)):
        sel = rows.any(1).nonzero().flatten()                                    # the rows that have some
        if not sel.numel():
            continue
        span = rows[sel].any(0).nonzero().flatten()
        r = slice(int(span[0]), int(span[-1]) + 1)                               # those rows, and the keys
        k = slice(0, int(at[sel].max()) + 1) if side == 0 else slice(int(at[sel].min()), n)   # they see
        rate = a[:, side].repeat(qf.shape[0] // a.shape[0])[sel]
        far_out = _far_rows(qf[sel, r], kf[sel, k], v[sel, k], rate, at[sel], side, floor, r, k)
        if not copied and torch.is_grad_enabled() and (out.requires_grad or far_out.requires_grad):
            out, copied = out.clone(), True                                      # written in place below
        block = torch.where(rows[sel, r][..., None], far_out, out[sel, r])
        out[sel[:, None], torch.arange(r.start, r.stop, device=out.device)] = block
    return out


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

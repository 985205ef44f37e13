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


def run(node, args, lib, name, params):
    from attndsl import ops
    qf, kf, v, tab = args
    kf, empty = keys_out(kf, params)
    a = rates(node, tab)
    if a.requires_grad:                  # learned rates (decay_rates "learned"), under autograd
        qf, kf = _rate_gradient(qf, kf, a[:, 0])
    return watched(ops.fast.linear_attention(qf, kf, v, a.detach(), empty, lib, name), params)


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

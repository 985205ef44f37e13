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
    (tab, (H, 1)) or a user function's constants; later is 0 and unused when causal."""
    def column(rate):
        return tab if rate == "table" else torch.full_like(tab[:, :1], rate or 0.0)
    return torch.cat([column(rate) for rate in decay_rates(node.bias.position, node.causal)], 1)


def run(node, args, lib, name, params):
    from attndsl import ops
    qf, kf, v, tab = args
    kf, empty = keys_out(kf, params)
    return watched(ops.fast.linear_attention(qf, kf, v, rates(node, tab), empty, lib, name), params)


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

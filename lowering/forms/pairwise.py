"""pairwise: a feature-map kernel computed exactly pair by pair, A_ij = (φq_i·φk_j)·exp(b(i−j))
[j ∈ M(i)] in flash-style tiles (never the N×N matrix), for any position term or none. O(N²), but
about what SDPA costs for M ≤ D: the form for short sequences, and exact where the Toeplitz-FFT
form's precision runs out.

CPU kernels: pairwise.py (and narrow ones for a call of few query rows). No portable kernels yet: GPU targets plan the other forms.
"""
from __future__ import annotations

from attndsl.ir import LinearAttention, PositionalAttention

from ..costs import EXP_FLOPS
from ..form import Form, keys_out, learns, narrowed, watched


def _position(node):
    """The node's position term (None without one) and whether it is learned."""
    if isinstance(node, LinearAttention):
        return None, False
    return node.bias.position, learns(node.bias.position)


def lower_cpu(node, names, dtype, knobs, narrow=False):
    from ..cpu import pairwise
    m, d = node.qf.shape[-1], node.v.shape[-1]
    pos, learn = _position(node)
    return {names[0]: pairwise.pairwise_forward(names[0], m, d, dtype, node.causal, pos, knobs.get(names[0]),
                                                eps=node.eps, narrow=narrow),
            names[1]: pairwise.pairwise_backward(names[1], m, d, dtype, node.causal, pos, learn,
                                                 knobs.get(names[1]), narrow)}


def run(node, args, lib, name, params):
    from attndsl import ops
    qf, kf, v = args[:3]
    tab = args[3] if len(args) > 3 else v.new_zeros(1, 1)
    kf, empty = keys_out(kf, params)
    return watched(ops.fast.pairwise_attention(qf, kf, v, tab, empty, lib, narrowed(name, qf, params)), params)


def _valid(node) -> bool:
    """Any position term; without one, features given as inputs (not a φ fused into the kernel)."""
    return isinstance(node, PositionalAttention) or node.phi is None


def _cost(node, N: int) -> float:
    """κ_ij = φq_i·φk_j and Σ_j A_ij [v_j, 1] over the pairs a row sees, plus an exp per pair for a
    position term; half the pairs when causal."""
    m, d = node.qf.shape[-1], node.v.shape[-1]
    pairs = N * N / 2 if node.causal else N * N
    return pairs * (2.0 * (m + d + 1) + (EXP_FLOPS if isinstance(node, PositionalAttention) else 0.0))


FORMS = [
    Form("pairwise", (PositionalAttention, LinearAttention), _valid, _cost,
         "A_ij = (φq_i·φk_j)·exp(b(i−j)) pair by pair in L1 tiles, exact, O(N²)",
         lower_cpu, None, run, "pairwise_attention", "quadratic",
         probe="kernel = elu1; position(r) = -0.02 * abs(r) + 0.5 * cos(r / 16)", cross=True, narrow=True,
         grouped=True),
]

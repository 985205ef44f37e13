"""toeplitz_fft: exp(b) inside the normalizer for any position term (Luo et al. 2021): per
channel (m, d), Σ_j c(i−j) φk_jm [v_j, 1]_d by FFT, contracted with φq_i. Its precision limit
(precision.py) is checked per call.

CPU kernels: toeplitz.py (an inlined FFT convolver, fft/convolve.py); portable: fft_blocks.py.
"""
from __future__ import annotations

from attndsl.ir import PositionalAttention

from ..costs import fft_cost
from ..form import Form, keys_out, knob, learns, watched


def lower_cpu(node: PositionalAttention, names, dtype, knobs):
    from ..cpu import toeplitz
    m, d, pos = node.qf.shape[-1], node.v.shape[-1], node.bias.position
    return {names[0]: toeplitz.scores_forward(names[0], m, d, dtype, node.causal, pos, knobs.get(names[0]),
                                              eps=node.eps),
            names[1]: toeplitz.scores_backward(names[1], m, d, dtype, node.causal, pos, learns(pos),
                                               knobs.get(names[1]))}


def lower_portable(node: PositionalAttention, names, dtype, knobs, gpu):
    """A thread block per FFT work row."""
    from ..portable import fft_blocks
    m, d, pos = node.qf.shape[-1], node.v.shape[-1], node.bias.position
    tf, tb = knob(knobs, names, "portable_fft", "threads")
    return {names[0]: fft_blocks.scores_forward(names[0], m, d, dtype, node.causal, pos, gpu, tf, eps=node.eps),
            names[1]: fft_blocks.scores_backward(names[1], m, d, dtype, node.causal, pos, learns(pos), gpu, tb)}


def run(node, args, lib, name, params):
    from attndsl import ops
    qf, kf, v, tab = args
    kf, empty = keys_out(kf, params)
    return watched(ops.fast.toeplitz_attention(qf, kf, v, tab, empty, lib, name), params)


def _cost(n: PositionalAttention, N: int) -> float:
    m, d = n.qf.shape[-1], n.v.shape[-1]
    return fft_cost(m * (d + 1), N) + 4.0 * N * m * (d + 1)   # + the products with φk and φq


FORMS = [
    # a sliding window's weights are exactly 0 beyond it: an FFT would spread its rounding there
    Form("toeplitz_fft", PositionalAttention, lambda n: n.bias.position.name != "window", _cost,
         "per channel (m, d): Σ_j c(i−j) φk_jm [v_j, 1]_d by FFT (Luo et al.), contracted with φq_i",
         lower_cpu, lower_portable, run, "toeplitz_attention", "toeplitz", "portable_fft", fft_scores=True,
         probe="kernel = elu1; position(r) = -0.02 * abs(r) + 0.5 * cos(r / 16)"),
]

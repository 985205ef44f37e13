"""banded: a learned table clipped at ±W (constant beyond): the ±W band with exact weights in
C×C tiles, the far keys through chunk prefix sums. Exact for any table; a sliding window is the
table whose far weight is 0, and its kernels build no prefix sums.

CPU kernels: banded.py; portable: te_forms.py.
"""
from __future__ import annotations

from attndsl.ast import learned_table
from attndsl.ir import PositionalAttention
from attndsl.schedules.knobs import defaults

from ..form import Form, keys_out, knob, watched

CHUNK = defaults("banded")["chunk"]       # the CPU kernels' default chunk (their window tiles)


def _far(node: PositionalAttention) -> bool:
    """Whether the keys beyond the clip weigh anything (a sliding window's weigh 0)."""
    return node.bias.position.name != "window"


def lower_cpu(node: PositionalAttention, names, dtype, knobs):
    from ..cpu import banded
    m, d = node.qf.shape[-1], node.v.shape[-1]
    far = _far(node)
    return {names[0]: banded.banded_forward(names[0], m, d, dtype, node.causal, knobs.get(names[0]),
                                            eps=node.eps, far=far),
            names[1]: banded.banded_backward(names[1], m, d, dtype, node.causal, knobs.get(names[1]), far=far)}


def lower_portable(node: PositionalAttention, names, dtype, knobs, gpu):
    from ..portable import te_forms
    m, d = node.qf.shape[-1], node.v.shape[-1]
    cf, cb = knob(knobs, names, "portable_linear", "chunk")
    far = _far(node)
    return {names[0]: te_forms.banded_forward(names[0], m, d, dtype, node.causal, chunk=cf, eps=node.eps, far=far),
            names[1]: te_forms.banded_backward(names[1], m, d, dtype, node.causal, chunk=cb, far=far)}


def run(node, args, lib, name, params):
    from attndsl import ops
    qf, kf, v, tab = args
    kf, empty = keys_out(kf, params)
    return watched(ops.fast.banded_attention(qf, kf, v, tab, empty, lib, name), params)


def _cost(n: PositionalAttention, N: int) -> float:
    """Window tiles (keys within ±(W + C) of a query chunk) with exact weights, plus the constant
    weights beyond the clip through chunk prefix sums (one M×(D+1) product a row; none for a
    sliding window)."""
    m, d = n.qf.shape[-1], n.v.shape[-1]
    w = int(n.bias.position["max_distance"])
    window = min(N, (1 if n.causal else 2) * w + CHUNK)
    far = 4.0 * N * m * (d + 1) if _far(n) else 0.0
    return 2.0 * N * window * (m + d + 1) + far


FORMS = [
    Form("banded", PositionalAttention, lambda n: learned_table(n.bias.position), _cost,
         "c(r) constant beyond the clip ±W: chunk prefix sums for the far keys, exact C×C tiles "
         "for the ±W band",
         lower_cpu, lower_portable, run, "banded_attention", "banded", "portable_linear",
         probe="kernel = elu1; position = toeplitz(max_distance=128, init=normal); mask = causal"),
]

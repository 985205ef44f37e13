"""kde and uniform: softmax attention estimated from a few keys per query.

    kde      KDEformer: LSH-sorted blocks exact, the rest by keys sampled ∝ |v|² + uniform,
             weighted 1/(p·s)
    uniform  each query's own key exact, the rest by uniformly sampled keys weighted N/s

The buckets, the sort and the samples are drawn in torch (attndsl/sampling.py); the kernels
(CPU: sampled.py, sharing quadratic.py's tiles; portable: softmax_rows.py) score them.
"""
from __future__ import annotations

import math

from attndsl.ir import SampledAttention

from ..costs import EXP_FLOPS
from ..form import Form, key_bias, knob, rows_seen


def lower_cpu(node: SampledAttention, names, dtype, knobs):
    from ..cpu import sampled
    dk, dv = node.q.shape[-1], node.v.shape[-1]
    return {names[0]: sampled.sampled_forward(names[0], dk, dv, dtype, node.causal, node.scale,
                                              knobs.get(names[0])),
            names[1]: sampled.sampled_backward(names[1], dk, dv, dtype, node.causal, node.scale,
                                               knobs.get(names[1]))}


def lower_portable(node: SampledAttention, names, dtype, knobs, gpu):
    from ..portable import softmax_rows
    dk, dv = node.q.shape[-1], node.v.shape[-1]
    rf, rb = knob(knobs, names, "portable_rows", "rows")
    return {names[0]: softmax_rows.sampled_forward(names[0], dk, dv, dtype, node.causal, node.scale, gpu, rf),
            names[1]: softmax_rows.sampled_backward(names[1], dk, dv, dtype, node.causal, node.scale, gpu, rb)}


def run(node, args, lib, name, params):
    from attndsl import ops, sampling
    pad = params["pad"]
    s = sampling.draw(*args, node.sampling, params["lsh_planes"], params["seed"], node.scale,
                      None if pad is None else pad.keys)
    return rows_seen(ops.fast.sampled_attention(*args, *s.args(), key_bias(args[1], params), lib, name,
                                                s.block)[0], params)


def _cost(n: SampledAttention, N: int) -> float:
    """Each query scores its block's keys and the samples (2·(Dk + Dv) + an exp each); the LSH
    hash (kde) is r sign tests of Dk each per row of q and k."""
    kde = n.sampling.name == "kde"
    per_query = min(N, n.sampling["block"] + n.sampling["samples"] if kde else 1 + n.sampling["samples"])
    lsh = 4.0 * N * n.q.shape[-1] * math.log2(n.sampling["buckets"]) if kde else 0.0
    return N * per_query * (2.0 * (n.q.shape[-1] + n.v.shape[-1]) + EXP_FLOPS) + lsh


def _sampled(scheme: str, summary: str) -> Form:
    return Form(scheme, SampledAttention, lambda n: n.sampling.name == scheme, _cost, summary,
                lower_cpu, lower_portable, run, "sampled_attention", "quadratic", "portable_rows")


FORMS = [
    _sampled("kde", "KDEformer: LSH-sorted blocks exact, the rest by keys sampled ∝ |v|² + uniform, "
                    "weighted 1/(p·s)"),
    _sampled("uniform", "each query's own key exact, the rest by uniformly sampled keys weighted N/s"),
]

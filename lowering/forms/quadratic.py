"""quadratic: exact softmax attention, flash-style: scores in tiles, a running max and
normalizer, b(i−j) added on the fly; never the N×N matrix.

CPU kernels: quadratic.py (and narrow ones for a call of few query rows); portable: softmax_rows.py (a thread per row).
"""
from __future__ import annotations

from attndsl.ir import SoftmaxAttention

from ..costs import softmax_cost
from ..form import Form, key_bias, knob, learns, narrowed, rows_seen


def _position(node):
    pos = node.bias.position if node.bias is not None else None
    return pos, pos is not None and learns(pos)


def lower_cpu(node: SoftmaxAttention, names, dtype, knobs, narrow=False):
    from ..cpu import quadratic
    dk, dv = node.q.shape[-1], node.v.shape[-1]
    pos, learn = _position(node)
    return {names[0]: quadratic.softmax_forward(names[0], dk, dv, dtype, node.causal, node.scale, pos,
                                                knobs.get(names[0]), narrow),
            names[1]: quadratic.softmax_backward(names[1], dk, dv, dtype, node.causal, node.scale, pos, learn,
                                                 knobs.get(names[1]), narrow)}


def lower_portable(node: SoftmaxAttention, names, dtype, knobs, gpu):
    from ..portable import softmax_rows
    dk, dv = node.q.shape[-1], node.v.shape[-1]
    pos, learn = _position(node)
    rf, rb = knob(knobs, names, "portable_rows", "rows")
    return {names[0]: softmax_rows.softmax_forward(names[0], dk, dv, dtype, node.causal, node.scale, pos, gpu,
                                                   rf),
            names[1]: softmax_rows.softmax_backward(names[1], dk, dv, dtype, node.causal, node.scale, pos,
                                                    learn, gpu, rb)}


def run(node, args, lib, name, params):
    from attndsl import ops
    q, k, v = args[:3]
    tab = args[3] if node.bias is not None else q.new_zeros(1, 1)
    return rows_seen(ops.fast.softmax_attention(q, k, v, tab, key_bias(k, params), lib,
                                                narrowed(name, q, params))[0], params)


FORMS = [
    Form("quadratic", SoftmaxAttention, lambda n: True, softmax_cost,
         "flash-style tiles: scores in L1, running max and normalizer, b(i−j) on the fly",
         lower_cpu, lower_portable, run, "softmax_attention", "quadratic", "portable_rows",
         probe="position = alibi", cross=True, narrow=True, grouped=True),
]

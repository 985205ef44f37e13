"""values_fft: a position term on the values (FastRPB), Σ_j b(i−j) v_j by FFT per value channel.

CPU kernels: toeplitz.py (the FFT through fft/packed.py's packed functions); portable: fft_blocks.py.
"""
from __future__ import annotations

from attndsl.ir import ToeplitzValues

from ..costs import fft_cost
from ..form import Form, keys_out, knob, learns


def lower_cpu(node: ToeplitzValues, names, dtype, knobs):
    from ..cpu import toeplitz
    d, pos = node.v.shape[-1], node.bias.position
    return {names[0]: toeplitz.values_forward(names[0], d, dtype, node.causal, pos),
            names[1]: toeplitz.values_backward(names[1], d, dtype, node.causal, pos, learns(pos))}


def lower_portable(node: ToeplitzValues, names, dtype, knobs, gpu):
    from ..portable import fft_blocks
    d, pos = node.v.shape[-1], node.bias.position
    tf, tb = knob(knobs, names, "portable_fft", "threads")
    return {names[0]: fft_blocks.values_forward(names[0], d, dtype, node.causal, pos, gpu, tf),
            names[1]: fft_blocks.values_backward(names[1], d, dtype, node.causal, pos, learns(pos), gpu, tb)}


def run(node, args, lib, name, params):
    from attndsl import ops
    tab, v = args
    return ops.fast.toeplitz_values(keys_out(v, params, tag="v")[0], tab, lib, name)


FORMS = [
    Form("values_fft", ToeplitzValues, lambda n: True, lambda n, N: fft_cost(n.v.shape[-1], N),
         "Σ_j b(i−j) v_j by FFT per value channel (FastRPB)",
         lower_cpu, lower_portable, run, "toeplitz_values", None, "portable_fft"),
]

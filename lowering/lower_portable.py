"""The portable kernels of each form (te_forms.py, softmax_rows.py, fft_blocks.py): what GPU
targets build, scheduled by schedules/cuda.py, and what Target("llvm", kernels="portable") runs on
this CPU unscheduled.

Each `lower_*` takes lower_cpu's arguments and `gpu` (whether loops are bound to GPU threads).
"""
from __future__ import annotations

from attndsl.ir import (FeatureMap, LinearAttention, PositionalAttention, SampledAttention, SoftmaxAttention,
                        ToeplitzValues)
from attndsl.passes.geometric import decayed_floor
from attndsl.schedules.knobs import resolve

from .lower_cpu import learns, map_kernel, map_kernel_of


def lower_feature_map(node: FeatureMap, names, dtype, knobs, gpu):
    from . import te_forms
    k = map_kernel(node)
    return {names[0]: te_forms.map_forward(names[0], k, node.role, dtype),
            names[1]: te_forms.map_backward(names[1], k, dtype)}


def _knob(knobs, names, family: str, knob: str) -> list[int]:
    """The value of `knob` (schedules/knobs.py `family`) for each kernel of `names`."""
    return [resolve(family, knobs.get(n))[knob] for n in names]


def lower_linear(node: LinearAttention, names, dtype, knobs, gpu):
    from . import featuremap, te_forms
    m, d = node.qf.shape[-1], node.v.shape[-1]
    causal = node.causal                         # prefix_sum; linear when False
    phi = dphi = None
    if node.phi is not None:
        phi, dphi = featuremap.elementwise_pair(map_kernel_of(node.phi, m, m, node.prescale), dtype)
    cf, cb = _knob(knobs, names, "portable_linear", "chunk")
    return {names[0]: te_forms.linear_forward(names[0], m, d, dtype, causal, phi, chunk=cf, eps=node.eps),
            names[1]: te_forms.linear_backward(names[1], m, d, dtype, causal, phi, dphi, chunk=cb)}


def lower_toeplitz_fft(node: PositionalAttention, names, dtype, knobs, gpu):
    """A thread block per FFT work row."""
    from . import fft_blocks
    m, d, pos = node.qf.shape[-1], node.v.shape[-1], node.bias.position
    tf, tb = _knob(knobs, names, "portable_fft", "threads")
    return {names[0]: fft_blocks.scores_forward(names[0], m, d, dtype, node.causal, pos, gpu, tf, eps=node.eps),
            names[1]: fft_blocks.scores_backward(names[1], m, d, dtype, node.causal, pos, learns(pos), gpu, tb)}


def lower_banded(node: PositionalAttention, names, dtype, knobs, gpu):
    """A clipped table: the band by offsets, the far keys by chunks."""
    from . import te_forms
    m, d = node.qf.shape[-1], node.v.shape[-1]
    cf, cb = _knob(knobs, names, "portable_linear", "chunk")
    return {names[0]: te_forms.banded_forward(names[0], m, d, dtype, node.causal, chunk=cf, eps=node.eps),
            names[1]: te_forms.banded_backward(names[1], m, d, dtype, node.causal, chunk=cb)}


def lower_decayed(node: PositionalAttention, names, dtype, knobs, gpu):
    from . import te_forms
    m, d = node.qf.shape[-1], node.v.shape[-1]
    cf, cb = _knob(knobs, names, "portable_linear", "chunk")
    return {names[0]: te_forms.linear_forward(names[0], m, d, dtype, node.causal, decayed=True, chunk=cf,
                                              eps=decayed_floor(node.eps, node.bias.position)),
            names[1]: te_forms.linear_backward(names[1], m, d, dtype, node.causal, decayed=True, chunk=cb)}


def lower_values_fft(node: ToeplitzValues, names, dtype, knobs, gpu):
    from . import fft_blocks
    d, pos = node.v.shape[-1], node.bias.position
    tf, tb = _knob(knobs, names, "portable_fft", "threads")
    return {names[0]: fft_blocks.values_forward(names[0], d, dtype, node.causal, pos, gpu, tf),
            names[1]: fft_blocks.values_backward(names[1], d, dtype, node.causal, pos, learns(pos), gpu, tb)}


def lower_softmax(node: SoftmaxAttention, names, dtype, knobs, gpu):
    from . import softmax_rows
    dk, dv = node.q.shape[-1], node.v.shape[-1]
    pos = node.bias.position if node.bias is not None else None
    learn = pos is not None and learns(pos)
    rf, rb = _knob(knobs, names, "portable_rows", "rows")
    return {names[0]: softmax_rows.softmax_forward(names[0], dk, dv, dtype, node.causal, node.scale, pos, gpu,
                                                   rf),
            names[1]: softmax_rows.softmax_backward(names[1], dk, dv, dtype, node.causal, node.scale, pos,
                                                    learn, gpu, rb)}


def lower_sampled(node: SampledAttention, names, dtype, knobs, gpu):
    from . import softmax_rows
    dk, dv = node.q.shape[-1], node.v.shape[-1]
    rf, rb = _knob(knobs, names, "portable_rows", "rows")
    return {names[0]: softmax_rows.sampled_forward(names[0], dk, dv, dtype, node.causal, node.scale, gpu, rf),
            names[1]: softmax_rows.sampled_backward(names[1], dk, dv, dtype, node.causal, node.scale, gpu, rb)}

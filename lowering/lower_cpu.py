"""The CPU kernels of each form: which kernel builders (linear.py, banded.py, toeplitz.py,
quadratic.py, sampled.py, featuremap.py) a node's form calls, with which arguments.

Each `lower_*` takes (node, (fwd name, bwd name), dtype, knobs {kernel name: {knob: value}}) and
returns {name: PrimFunc}. The builders import the TVM compiler, so they are imported inside: only
lower() needs them, not check() or a cache hit.
"""
from __future__ import annotations

from attndsl.ir import (FeatureMap, LinearAttention, PositionalAttention, SampledAttention, SoftmaxAttention,
                        ToeplitzValues)
from attndsl.passes.geometric import decayed_floor


def map_kernel_of(kernel, dk: int, width: int, prescale: float):
    from . import featuremap
    return featuremap.MAPS[kernel.name](kernel, dk, width, prescale)


def map_kernel(node: FeatureMap):
    return map_kernel_of(node.kernel, node.x.shape[-1], node.width, node.prescale)


def lower_feature_map(node: FeatureMap, names, dtype, knobs):
    from . import featuremap
    k = map_kernel(node)
    fwd, bwd = featuremap.FAMILIES[k.family]
    return {names[0]: fwd(names[0], k, node.role, dtype), names[1]: bwd(names[1], k, dtype)}


def lower_linear(node: LinearAttention, names, dtype, knobs):
    from . import featuremap, linear
    m, d = node.qf.shape[-1], node.v.shape[-1]
    causal = node.causal                         # prefix_sum; linear when False
    phi = dphi = None
    if node.phi is not None:                     # fused elementwise map (passes/fuse_maps.py)
        phi, dphi = featuremap.elementwise_pair(map_kernel_of(node.phi, m, m, node.prescale), dtype)
    return {names[0]: linear.linear_forward(names[0], m, d, dtype, causal, phi, knobs=knobs.get(names[0]),
                                            eps=node.eps),
            names[1]: linear.linear_backward(names[1], m, d, dtype, causal, phi, dphi,
                                             knobs=knobs.get(names[1]))}


def learns(position) -> bool:
    """Whether the position term has trainable parameters (a toeplitz table)."""
    return position.name == "toeplitz"


def lower_banded(node: PositionalAttention, names, dtype, knobs):
    """A clipped table: the ±W band exactly, the far keys by chunk prefix sums."""
    from . import banded
    m, d = node.qf.shape[-1], node.v.shape[-1]
    return {names[0]: banded.banded_forward(names[0], m, d, dtype, node.causal, knobs.get(names[0]),
                                            eps=node.eps),
            names[1]: banded.banded_backward(names[1], m, d, dtype, node.causal, knobs.get(names[1]))}


def _decay_slope(TAB, h, later):
    """γ = exp(−TAB[h, later]): TAB (H, 2) holds the rates for earlier and later keys."""
    return TAB[h, 1 if later else 0]


def lower_decayed(node: PositionalAttention, names, dtype, knobs):
    from . import linear
    m, d = node.qf.shape[-1], node.v.shape[-1]
    return {names[0]: linear.linear_forward(names[0], m, d, dtype, node.causal, slope=_decay_slope,
                                            knobs=knobs.get(names[0]),
                                            eps=decayed_floor(node.eps, node.bias.position)),
            names[1]: linear.linear_backward(names[1], m, d, dtype, node.causal, slope=_decay_slope,
                                             knobs=knobs.get(names[1]))}


def lower_toeplitz_fft(node: PositionalAttention, names, dtype, knobs):
    from . import toeplitz
    m, d, pos = node.qf.shape[-1], node.v.shape[-1], node.bias.position
    return {names[0]: toeplitz.scores_forward(names[0], m, d, dtype, node.causal, pos, knobs.get(names[0]),
                                              eps=node.eps),
            names[1]: toeplitz.scores_backward(names[1], m, d, dtype, node.causal, pos, learns(pos),
                                               knobs.get(names[1]))}


def lower_values_fft(node: ToeplitzValues, names, dtype, knobs):
    from . import toeplitz
    d, pos = node.v.shape[-1], node.bias.position
    return {names[0]: toeplitz.values_forward(names[0], d, dtype, node.causal, pos),
            names[1]: toeplitz.values_backward(names[1], d, dtype, node.causal, pos, learns(pos))}


def lower_softmax(node: SoftmaxAttention, names, dtype, knobs):
    from . import quadratic
    dk, dv = node.q.shape[-1], node.v.shape[-1]
    pos = node.bias.position if node.bias is not None else None
    learn = pos is not None and learns(pos)
    return {names[0]: quadratic.softmax_forward(names[0], dk, dv, dtype, node.causal, node.scale, pos,
                                                knobs.get(names[0])),
            names[1]: quadratic.softmax_backward(names[1], dk, dv, dtype, node.causal, node.scale, pos, learn,
                                                 knobs.get(names[1]))}


def lower_sampled(node: SampledAttention, names, dtype, knobs):
    from . import sampled
    dk, dv = node.q.shape[-1], node.v.shape[-1]
    return {names[0]: sampled.sampled_forward(names[0], dk, dv, dtype, node.causal, node.scale,
                                              knobs.get(names[0])),
            names[1]: sampled.sampled_backward(names[1], dk, dv, dtype, node.causal, node.scale,
                                               knobs.get(names[1]))}

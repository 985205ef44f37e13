"""Fuse elementwise feature maps into the linear-attention kernel that consumes them.

    LinearAttention(φ(c·q), φ(c·k), v)  ->  LinearAttention(q, k, v, phi=φ, prescale=c)
        when φ is elementwise (relu, elu1, user maps): φ is applied to each chunk as the kernel
        loads it, and its derivative to dφq, dφk as the backward stores them, so the (BH, N, M)
        feature tensors are never written to memory.
Maps with a projection or a stabilizer (favor, hyperbolic, trig, exp_shift), and user maps that
read params (their kernels take the params' values), stay separate nodes.
"""
from __future__ import annotations

from dataclasses import replace

from ..ast import map_params
from ..featuremaps import FEATURE_MAPS
from ..ir import FeatureMap, LinearAttention


def _elementwise(n) -> bool:
    return (isinstance(n, FeatureMap) and FEATURE_MAPS[n.kernel.name].elementwise
            and not map_params(n.kernel))


def linear_of_elementwise_maps(n):
    # LinearAttention(φ(c·q), φ(c·k), v)  ->  LinearAttention(q, k, v, phi=φ, prescale=c)
    if (isinstance(n, LinearAttention) and n.phi is None and _elementwise(n.qf) and _elementwise(n.kf)
            and n.qf.kernel == n.kf.kernel and n.qf.prescale == n.kf.prescale):
        return replace(n, qf=n.qf.x, kf=n.kf.x, phi=n.qf.kernel, prescale=n.qf.prescale)
    return None


RULES = [("linear_of_elementwise_maps", linear_of_elementwise_maps)]

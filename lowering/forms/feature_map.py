"""Feature maps φ(x): not a form (one way only), but a node with kernels of its own.

CPU kernels: featuremap.py (one family per kind of map); portable: te_forms.py.
"""
from __future__ import annotations

from attndsl.ir import FeatureMap, Input


def map_kernel_of(kernel, dk: int, width: int, prescale: float):
    """The featuremap.py description of map `kernel` on Dk inputs, `width` features."""
    from ..cpu import featuremap
    return featuremap.MAPS[kernel.name](kernel, dk, width, prescale)


def map_kernel(node: FeatureMap):
    return map_kernel_of(node.kernel, node.x.shape[-1], node.width, node.prescale)


def site_map(node):
    """The map a linear site (LinearAttention, PositionalAttention) applies to q and k: its fused
    φ, or the one both its FeatureMap inputs apply to the raw q, k; None for other inputs."""
    if getattr(node, "phi", None) is not None:
        m = node.qf.shape[-1]
        return map_kernel_of(node.phi, m, m, node.prescale)
    qf, kf = node.qf, node.kf
    if (isinstance(qf, FeatureMap) and isinstance(kf, FeatureMap) and isinstance(qf.x, Input)
            and isinstance(kf.x, Input) and (qf.kernel, qf.width, qf.prescale) == (kf.kernel, kf.width, kf.prescale)):
        return map_kernel(kf)
    return None


def lower_cpu(node: FeatureMap, names, dtype, knobs):
    from ..cpu import featuremap
    k = map_kernel(node)
    fwd, bwd = (featuremap.param_forward, featuremap.param_backward) if k.params else featuremap.FAMILIES[k.family]
    return {names[0]: fwd(names[0], k, node.role, dtype), names[1]: bwd(names[1], k, dtype)}


def lower_portable(node: FeatureMap, names, dtype, knobs, gpu):
    from ..portable import te_forms
    k = map_kernel(node)
    return {names[0]: te_forms.map_forward(names[0], k, node.role, dtype),
            names[1]: te_forms.map_backward(names[1], k, dtype)}


def run(node, args, lib, name, params):
    """φ of the step's input; a map reading params (the spec's kernel map, params["map"] (H, P) their
    values, else None) through their op."""
    from attndsl import ops
    if params["map"] is not None:
        return ops.fast.param_map(args[0], params["map"], lib, name)
    return ops.fast.feature_map(args[0], params["w"], params["wt"], lib, name, node.width)

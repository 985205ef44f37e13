"""Feature maps φ(x): not a form (one way only), but a node with kernels of its own.

CPU kernels: featuremap.py (one family per kind of map); portable: te_forms.py.
"""
from __future__ import annotations

from attndsl.ir import FeatureMap


def map_kernel_of(kernel, dk: int, width: int, prescale: float):
    """The featuremap.py description of map `kernel` on Dk inputs, `width` features."""
    from ..cpu import featuremap
    return featuremap.MAPS[kernel.name](kernel, dk, width, prescale)


def map_kernel(node: FeatureMap):
    return map_kernel_of(node.kernel, node.x.shape[-1], node.width, node.prescale)


def lower_cpu(node: FeatureMap, names, dtype, knobs):
    from ..cpu import featuremap
    k = map_kernel(node)
    fwd, bwd = featuremap.FAMILIES[k.family]
    return {names[0]: fwd(names[0], k, node.role, dtype), names[1]: bwd(names[1], k, dtype)}


def lower_portable(node: FeatureMap, names, dtype, knobs, gpu):
    from ..portable import te_forms
    k = map_kernel(node)
    return {names[0]: te_forms.map_forward(names[0], k, node.role, dtype),
            names[1]: te_forms.map_backward(names[1], k, dtype)}


def run(node, args, lib, name, params):
    from attndsl import ops
    return ops.feature_map(args[0], params["w"], params["wt"], lib, name, node.width)

"""IR -> TVM TIR: the only place TVM kernels are written.

`lower(root, dtype)` walks a planned IR and asks the registry `LOWERINGS` for the kernels of each
node: every node gets a forward and a backward prim_func named `<op><index>_fwd|_bwd`.
A node with no lowering raises `NotLowered`, which the front end reports against the spec.
"""
from __future__ import annotations

from typing import Callable

from attndsl import config

config.export_tvm_threads()          # before the first kernel starts TVM's thread pool

from attndsl.ir import FeatureMap, Input, LinearAttention, Node, postorder



class NotLowered(Exception):
    """Nodes of the planned IR for which no TVM kernel exists (yet), in post-order."""

    def __init__(self, nodes: list[Node]):
        self.nodes = nodes
        super().__init__(", ".join(n.op for n in nodes))


def kernel_names(index: int, node: Node) -> tuple[str, str]:
    base = f"{node.op}{index}"
    return f"{base}_fwd", f"{base}_bwd"


# featuremap and linear import the TVM compiler: only lower() needs them, not check() or a cache hit

def map_kernel_of(kernel, dk: int, width: int, prescale: float):
    from . import featuremap
    return featuremap.MAPS[kernel.name](kernel, dk, width, prescale)


def map_kernel(node: FeatureMap):
    return map_kernel_of(node.kernel, node.x.shape[-1], node.width, node.prescale)


def _feature_map(node: FeatureMap, names, dtype):
    from . import featuremap
    k = map_kernel(node)
    fwd, bwd = featuremap.FAMILIES[k.family]
    return {names[0]: fwd(names[0], k, node.role, dtype), names[1]: bwd(names[1], k, dtype)}


LINEAR_FORMS = {"linear": False, "prefix_sum": True}     # form -> causal


def _linear_attention(node: LinearAttention, names, dtype):
    from . import featuremap, linear
    m, d = node.qf.shape[-1], node.v.shape[-1]
    causal = LINEAR_FORMS[node.form]
    phi = dphi = None
    if node.phi is not None:                     # fused elementwise map (passes/fuse_maps.py)
        phi, dphi = featuremap.elementwise_pair(map_kernel_of(node.phi, m, m, node.prescale), dtype)
    return {names[0]: linear.linear_forward(names[0], m, d, dtype, causal, phi),
            names[1]: linear.linear_backward(names[1], m, d, dtype, causal, phi, dphi)}


# node type -> (node, (fwd name, bwd name), dtype) -> {name: PrimFunc}
LOWERINGS: dict[type, Callable] = {
    Input: lambda node, names, dtype: {},
    FeatureMap: _feature_map,
    LinearAttention: _linear_attention,
}


def check(root: Node) -> None:
    """Raise NotLowered naming every node that has no kernels (cheap: builds nothing)."""
    missing = [node for node in postorder(root)
               if type(node) not in LOWERINGS or getattr(node, "form", "linear") not in LINEAR_FORMS]
    if missing:
        raise NotLowered(missing)


def lower(root: Node, dtype: str) -> dict:
    """Every kernel the planned IR needs, {name: PrimFunc}, for one dtype."""
    check(root)
    funcs = {}
    for i, node in enumerate(postorder(root)):
        funcs.update(LOWERINGS[type(node)](node, kernel_names(i, node), dtype))
    return funcs



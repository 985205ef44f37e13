"""target="mlir-cpu": a planned spec run through torch-mlir instead of TVM.

    attn dialect --linalg.lower (rewrite patterns)--> linalg on tensors
                 --engine.Compiled (bufferize, LLVM, ExecutionEngine)--> @run_NAME

One JIT build per dtype (float32, float64), made on first use; forward only.
q, k (BH, N, Dk), v (BH, N, Dv) -> (BH, N, Dv).
"""
from __future__ import annotations

import torch

from ..ast import AttentionSpec, learned_table
from ..featuremaps import FEATURE_MAPS
from ..ir import Node
from . import engine, linalg


def params(spec: AttentionSpec, heads: int, head_dim: int) -> linalg.Params:
    """The shapes of what Attention passes besides q, k, v: W' (M, Dk) ((Dk, Dk), unused, for maps
    without a projection) and the position parameters (H, 2W+1) for a table (a sliding window's
    included), else (H, 1)."""
    fmap = FEATURE_MAPS.get(spec.kernel.name)
    projected = fmap is not None and fmap.projection(spec.kernel, head_dim) is not None
    proj = (fmap.width(spec.kernel, head_dim), head_dim) if projected else (head_dim, head_dim)
    if spec.window is not None:                       # ast.windowed: ±(W + 1)
        tab = (heads, 2 * spec.window + 3)
    elif learned_table(spec.position):
        tab = (heads, 2 * int(spec.position["max_distance"]) + 1)
    else:
        tab = (heads, 1)
    return linalg.Params(heads, proj, tab)


class Program:
    def __init__(self, root: Node, name: str, params: linalg.Params):
        self.root, self.name, self.params = root, name, params
        self._compiled: dict[str, engine.Compiled] = {}
        self.module("float32")              # lowers now: NotLowered surfaces at compile()

    def module(self, dtype: str):
        """The linalg module (after inlining and canonicalization) for `dtype`."""
        return linalg.lower({self.name: self.root}, self.params, dtype)

    def __call__(self, dtype: str, q, k, v, w, tab, rates, *samples) -> torch.Tensor:
        """samples: for sampled attention, invq, invk, si, lw, sb, vs (linalg.argument_types)."""
        if dtype not in self._compiled:
            self._compiled[dtype] = engine.Compiled(self.module(dtype))
        out = v.new_empty(v.shape[0], v.shape[1], self.root.shape[-1])
        self._compiled[dtype](self.name, q, k, v, w, tab, rates, *samples, out)
        return out

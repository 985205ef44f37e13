"""The IR verifier, run between passes: shapes agree and every node is well formed."""
from __future__ import annotations

import math

from .ir import (Add, Biased, Dot, ExpDot, FeatureMap, Input, LinearAttention, Masked, Node,
                 Normalize, Position, PositionalAttention, Sample, SampledAttention, Scale,
                 SoftmaxAttention, ToeplitzValues, format_ir, postorder)


class IRVerificationError(AssertionError):
    pass


def _rows(n: Node) -> bool:
    s = n.shape
    return len(s) == 3 and s[:2] == ("BH", "N") and isinstance(s[2], int) and s[2] > 0


def _square(n: Node) -> bool:
    return n.shape == ("BH", "N", "N")


CHECKS = {
    Input: lambda n: n.name in ("q", "k", "v") and n.dim > 0,
    Scale: lambda n: _rows(n.x) and math.isfinite(n.factor),
    FeatureMap: lambda n: _rows(n.x) and n.role in ("q", "k") and n.width > 0 and math.isfinite(n.prescale),
    ExpDot: lambda n: _rows(n.q) and _rows(n.k) and n.q.shape == n.k.shape,
    Dot: lambda n: _rows(n.qf) and _rows(n.kf) and n.qf.shape == n.kf.shape,
    Position: lambda n: True,
    Biased: lambda n: _square(n.scores) and isinstance(n.bias, Position),
    Masked: lambda n: _square(n.scores),
    Normalize: lambda n: _square(n.scores) and _rows(n.v),
    ToeplitzValues: lambda n: isinstance(n.bias, Position) and _rows(n.v),
    Add: lambda n: n.a.shape == n.b.shape,
    Sample: lambda n: isinstance(n.x, (Normalize, SoftmaxAttention)),
    LinearAttention: lambda n: (_rows(n.qf) and _rows(n.kf) and _rows(n.v)
                                and n.qf.shape == n.kf.shape),
    PositionalAttention: lambda n: (_rows(n.qf) and _rows(n.kf) and _rows(n.v)
                                    and n.qf.shape == n.kf.shape and isinstance(n.bias, Position)),
    SoftmaxAttention: lambda n: (_rows(n.q) and _rows(n.k) and _rows(n.v) and n.q.shape == n.k.shape
                                 and (n.bias is None or isinstance(n.bias, Position))
                                 and math.isfinite(n.scale)),
    SampledAttention: lambda n: (_rows(n.q) and _rows(n.k) and _rows(n.v) and n.q.shape == n.k.shape
                                 and n.sampling.name in ("kde", "uniform") and math.isfinite(n.scale)),
}


def verify(root: Node) -> Node:
    """Return root unchanged, or raise IRVerificationError naming the bad node."""
    if not _rows(root):
        raise IRVerificationError(f"the result must be (BH, N, Dv), not {root.shape}\n{format_ir(root)}")
    for n in postorder(root):
        check = CHECKS.get(type(n))
        if check is None or not check(n):
            raise IRVerificationError(f"ill-formed {n.op}: {n.attrs()}\n{format_ir(root)}")
    return root

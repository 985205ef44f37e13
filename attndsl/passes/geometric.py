"""Recognise position terms whose weights exp(b(r)) are geometric in r: the decayed form.

    b(r) = −a·|r| + const   (any mask)      or   b(r) = −a·r + const   (causal: r ≥ 0)
      =>  exp(b(r)) = e^const · γ^|r|,  γ = e^(−a),  a ≥ 0

e^const cancels in the normalizer (apply = scores), so attention becomes a recurrence whose
state decays by γ per token. alibi(slope) is this with a = slope (per head); a user
`position(r) = EXPR` qualifies when EXPR is affine in |r| (or in r, when causal).
"""
from __future__ import annotations

from ..ast import Binary, Call, Choice, Num, Unary, Var

Affine = tuple[float, float, float]     # (coefficient of |r|, coefficient of r, constant)


def affine(e) -> Affine | None:
    """EXPR as α|r| + βr + c, or None when it is not of that form."""
    if isinstance(e, Num):
        return (0.0, 0.0, float(e.value))
    if isinstance(e, Var):
        return (0.0, 1.0, 0.0)
    if isinstance(e, Unary):
        a = affine(e.operand)
        return None if a is None else tuple(-x for x in a)
    if isinstance(e, Call) and e.func == "abs" and len(e.args) == 1:
        a = affine(e.args[0])
        if a is not None and a[0] == 0.0 and a[2] == 0.0:     # abs(β r) = |β|·|r|
            return (abs(a[1]), 0.0, 0.0)
        return None
    if isinstance(e, Binary):
        a, b = affine(e.left), affine(e.right)
        if a is None or b is None:
            return None
        if e.op in "+-":
            sign = 1.0 if e.op == "+" else -1.0
            return tuple(x + sign * y for x, y in zip(a, b))
        if e.op == "*" and a[:2] == (0.0, 0.0):
            return tuple(a[2] * y for y in b)
        if e.op == "*" and b[:2] == (0.0, 0.0):
            return tuple(b[2] * x for x in a)
        if e.op == "/" and b[:2] == (0.0, 0.0) and b[2] != 0.0:
            return tuple(x / b[2] for x in a)
    return None


def decay_rate(position: Choice, causal: bool) -> float | str | None:
    """a ≥ 0 with exp(b(r)) ∝ e^(−a|r|) on the unmasked r; "table" for alibi (per-head slopes,
    read at run time); None when the weights are not geometric (or the mask is not causal: the
    decayed kernels run forward in time only)."""
    if not causal:
        return None
    if position.name == "alibi":
        return "table"
    if position.name != "user":
        return None
    aff = affine(position.expr)
    if aff is None:
        return None
    rate = -(aff[0] + aff[1])                                # on r ≥ 0, |r| = r
    return rate if rate >= 0.0 else None

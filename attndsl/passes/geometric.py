"""Recognise position terms whose weights exp(b(r)) are geometric in r: the decayed form.

    b(r) = α|r| + βr + c,  r = i − j
      =>  exp(b(r)) = e^c · γ_f^r      on r ≥ 0 (keys at or before the query),  γ_f = e^(−(α+β))
          exp(b(r)) = e^c · γ_b^(−r)   on r < 0 (keys after it, non-causal),    γ_b = e^(−(α−β))

e^c cancels in the normalizer (apply = scores), so attention becomes two recurrences: a state
running forward in time that decays by γ_f per token, and (without a causal mask) one running
backward in time that decays by γ_b. Valid when neither rate is negative (no growth: the kernels'
exponents stay ≤ 0). alibi(slope) is this with α = −slope, β = 0 (per head); a user
`position(r) = EXPR` qualifies when EXPR is affine in |r| and r. With `param`s (a `tabulated`
term) α and β may read them (learned slopes, e.g. `-s * abs(r)`): the rates are then known per
call only, from b(0) − b(1), and causal only (the kernels' two directions share the gradient
that tells their rates apart).
"""
from __future__ import annotations

import math
from typing import NamedTuple

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


def _reads(e, names=None) -> bool:
    """Whether EXPR reads a variable (one of `names`; any when None)."""
    if isinstance(e, Var):
        return names is None or e.name in names
    children = (e.operand,) if isinstance(e, Unary) else (e.left, e.right) if isinstance(e, Binary) else \
        e.args if isinstance(e, Call) else ()
    return any(_reads(c, names) for c in children)


Symbolic = tuple  # (A, B, C): EXPRs free of r, None for 0


def symbolic_affine(e) -> Symbolic | None:
    """EXPR as A·|r| + B·r + C with A, B, C expressions free of r (they may read params), None
    for a zero coefficient; None when EXPR is not of that form."""
    if not _reads(e, ("r",)):
        return (None, None, e)
    if isinstance(e, Var):                                    # r
        return (None, Num(1.0), None)
    if isinstance(e, Unary):
        a = symbolic_affine(e.operand)
        return None if a is None else tuple(None if x is None else Unary("-", x) for x in a)
    if isinstance(e, Call) and e.func == "abs" and len(e.args) == 1:
        a = symbolic_affine(e.args[0])
        if a is not None and a[0] is None and a[2] is None:   # abs(B r) = |B|·|r|
            return (Call("abs", (a[1],)), None, None)
        return None
    if isinstance(e, Binary) and e.op in "+-":
        a, b = symbolic_affine(e.left), symbolic_affine(e.right)
        if a is None or b is None:
            return None

        def combine(x, y):
            if y is None:
                return x
            if x is None:
                return Unary("-", y) if e.op == "-" else y
            return Binary(e.op, x, y)
        return tuple(combine(x, y) for x, y in zip(a, b))
    if isinstance(e, Binary) and e.op in "*/":
        if e.op == "*" and not _reads(e.left, ("r",)):
            scale, rest, flip = e.left, e.right, True
        elif not _reads(e.right, ("r",)):
            scale, rest, flip = e.right, e.left, False
        else:
            return None
        a = symbolic_affine(rest)
        if a is None:
            return None
        return tuple(None if x is None else Binary(e.op, scale, x) if flip else Binary(e.op, x, scale) for x in a)
    return None


def learned_decay(position: Choice, causal: bool) -> bool:
    """Whether a `tabulated` term (position(r) = EXPR reading params) is geometric whatever the
    params' values: A·|r| + B·r + C with a constant C (A, B may read params), causal."""
    if position.name != "tabulated" or not causal:
        return False
    aff = symbolic_affine(position.expr)
    return aff is not None and (aff[2] is None or not _reads(aff[2]))


class Decay(NamedTuple):
    """Decay rates a ≥ 0 (γ = e^(−a)) per direction; "table" for alibi's per-head slopes (read at run
    time); "learned" for a term with params (b(0) − b(1), known per call)."""
    earlier: float | str            # exp(b(r)) ∝ e^(−a·r) on r ≥ 0
    later: float | str | None       # exp(b(r)) ∝ e^(a·r) on r < 0; None when causal (no later keys)


def decay_rates(position: Choice, causal: bool) -> Decay | None:
    """The rates of a geometric position term on the unmasked r, or None when the weights are not
    geometric (or grow with distance in some direction)."""
    if position.name == "alibi":                             # −slope·|r|: slope both ways
        return Decay("table", None if causal else "table")
    if learned_decay(position, causal):
        return Decay("learned", None)
    if position.name != "user":
        return None
    aff = affine(position.expr)
    if aff is None:
        return None
    alpha, beta, _ = aff
    earlier = -(alpha + beta)                                # r ≥ 0: α|r| + βr = (α+β)·r
    later = None if causal else -(alpha - beta)              # r < 0: α|r| + βr = (α−β)·(−r)
    if earlier < 0.0 or (later is not None and later < 0.0):
        return None
    return Decay(earlier, later)


def decayed_floor(eps: float | None, position: Choice) -> float | None:
    """The decayed form's floor: eps·e^(−c), as its weights drop the constant c of
    b(r) = α|r| + βr + c (e^c cancels in the ratio, not against eps; a learned term's c is
    constant); c = 0 for alibi. Capped at float32's largest number."""
    if not eps:
        return None
    aff = affine(position.expr) if position.name == "user" else None
    c = 0.0 if aff is None else aff[2]
    sym = symbolic_affine(position.expr) if position.name == "tabulated" else None
    if sym is not None and sym[2] is not None and not _reads(sym[2]):
        import torch

        from ..expr import evaluate
        c = float(evaluate(sym[2], torch.zeros((), dtype=torch.float64)))
    return min(eps * math.exp(min(-c, 700.0)), 3e38)

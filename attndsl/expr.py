"""User expressions (`kernel(x) = EXPR`, `position(r) = EXPR`): evaluation and symbolic derivative.

The same tree is evaluated three ways: on torch tensors here (the reference), as TVM TIR in
`attndsl.lowering.expr_tir`, and differentiated here so backward kernels get d/dx in closed form.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .ast import Binary, Call, Expr, Num, Unary, Var

# functions that only derivatives produce: step(u) = [u > 0], sign(u), elu_grad(u) = d elu / du
INTERNAL_FUNCTIONS = {"step": 1, "sign": 1, "elu_grad": 1}

TORCH_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "exp": torch.exp, "log": torch.log, "abs": torch.abs, "sqrt": torch.sqrt,
    "relu": torch.relu, "elu": F.elu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
    "softplus": F.softplus, "sin": torch.sin, "cos": torch.cos,
    "min": torch.minimum, "max": torch.maximum,
    "step": lambda u: (u > 0).to(u.dtype), "sign": torch.sign,
    "elu_grad": lambda u: torch.where(u > 0, torch.ones_like(u), torch.exp(torch.clamp(u, max=0))),
}

TORCH_BINARY = {
    "+": torch.add, "-": torch.sub, "*": torch.mul, "/": torch.div, "**": torch.pow,
}


def evaluate(e: Expr, x: torch.Tensor) -> torch.Tensor:
    """EXPR at every element of x (the variable's value), as a tensor of x's shape and dtype."""
    if isinstance(e, Num):
        return torch.full_like(x, e.value)
    if isinstance(e, Var):
        return x
    if isinstance(e, Unary):
        return -evaluate(e.operand, x)
    if isinstance(e, Binary):
        return TORCH_BINARY[e.op](evaluate(e.left, x), evaluate(e.right, x))
    if isinstance(e, Call):
        return TORCH_FUNCTIONS[e.func](*(evaluate(a, x) for a in e.args))
    raise TypeError(f"not an expression: {e!r}")


# --- symbolic derivative -------------------------------------------------------------------

ZERO, ONE = Num(0.0), Num(1.0)


def _add(a: Expr, b: Expr) -> Expr:
    if a == ZERO:
        return b
    if b == ZERO:
        return a
    if isinstance(a, Num) and isinstance(b, Num):
        return Num(a.value + b.value)
    return Binary("+", a, b)


def _sub(a: Expr, b: Expr) -> Expr:
    if b == ZERO:
        return a
    if isinstance(a, Num) and isinstance(b, Num):
        return Num(a.value - b.value)
    return Binary("-", a, b)


def _mul(a: Expr, b: Expr) -> Expr:
    if a == ZERO or b == ZERO:
        return ZERO
    if a == ONE:
        return b
    if b == ONE:
        return a
    if isinstance(a, Num) and isinstance(b, Num):
        return Num(a.value * b.value)
    return Binary("*", a, b)


def _div(a: Expr, b: Expr) -> Expr:
    if a == ZERO:
        return ZERO
    if b == ONE:
        return a
    return Binary("/", a, b)


def _neg(a: Expr) -> Expr:
    return Num(-a.value) if isinstance(a, Num) else Unary("-", a)


def _call(f: str, *args: Expr) -> Expr:
    return Call(f, tuple(args))


# chain rule for each function: d f(u) / du, as an expression in u
DERIVATIVES: dict[str, Callable[[Expr], Expr]] = {
    "exp": lambda u: _call("exp", u),                                   # exp' = exp
    "log": lambda u: _div(ONE, u),                                      # log' = 1/u
    "abs": lambda u: _call("sign", u),                                  # |u|' = sign u
    "sqrt": lambda u: _div(Num(0.5), _call("sqrt", u)),                 # √u' = 1/(2√u)
    "relu": lambda u: _call("step", u),                                 # relu' = [u > 0]
    "elu": lambda u: _call("elu_grad", u),                              # elu' = 1 or exp(u)
    "sigmoid": lambda u: _mul(_call("sigmoid", u), _sub(ONE, _call("sigmoid", u))),  # σ(1−σ)
    "tanh": lambda u: _sub(ONE, _mul(_call("tanh", u), _call("tanh", u))),           # 1 − tanh²
    "softplus": lambda u: _call("sigmoid", u),                          # softplus' = σ
    "sin": lambda u: _call("cos", u),
    "cos": lambda u: _neg(_call("sin", u)),
    "step": lambda u: ZERO, "sign": lambda u: ZERO,                     # almost everywhere
    "elu_grad": lambda u: _mul(_sub(ONE, _call("step", u)), _call("elu_grad", u)),
}


def diff(e: Expr, var: str) -> Expr:
    """d e / d var, simplified a little (no 0·u or 1·u terms)."""
    if isinstance(e, Num):
        return ZERO
    if isinstance(e, Var):
        return ONE if e.name == var else ZERO
    if isinstance(e, Unary):
        return _neg(diff(e.operand, var))
    if isinstance(e, Binary):
        a, b = e.left, e.right
        da, db = diff(a, var), diff(b, var)
        if e.op == "+":
            return _add(da, db)
        if e.op == "-":
            return _sub(da, db)
        if e.op == "*":                                                 # (ab)' = a'b + ab'
            return _add(_mul(da, b), _mul(a, db))
        if e.op == "/":                                                 # (a/b)' = a'/b − a b'/b²
            return _sub(_div(da, b), _div(_mul(a, db), _mul(b, b)))
        if e.op == "**":
            if db == ZERO and isinstance(b, Num):                       # (a^c)' = c a^(c−1) a'
                return _mul(_mul(b, Binary("**", a, Num(b.value - 1))), da)
            # (a^b)' = a^b (b' log a + b a'/a)
            return _mul(e, _add(_mul(db, _call("log", a)), _div(_mul(b, da), a)))
    if isinstance(e, Call):
        if e.func in ("min", "max"):                                    # picks one branch
            a, b = e.args
            s = _call("step", _sub(b, a) if e.func == "min" else _sub(a, b))
            return _add(_mul(s, diff(a, var)), _mul(_sub(ONE, s), diff(b, var)))
        (u,) = e.args
        return _mul(DERIVATIVES[e.func](u), diff(u, var))
    raise TypeError(f"not an expression: {e!r}")


def to_text(e: Expr) -> str:
    """EXPR back as source text that parses to the same tree: every operation parenthesised."""
    if isinstance(e, Num):
        v = e.value
        return repr(int(v)) if float(v).is_integer() and abs(v) < 1e15 else repr(v)
    if isinstance(e, Var):
        return e.name
    if isinstance(e, Unary):
        return f"(-{to_text(e.operand)})"          # not -(a) ** 2, which parses as -(a ** 2)
    if isinstance(e, Binary):
        return f"({to_text(e.left)} {e.op} {to_text(e.right)})"
    if isinstance(e, Call):
        return f"{e.func}({', '.join(to_text(a) for a in e.args)})"
    raise TypeError(f"not an expression: {e!r}")


# the built-in elementwise maps are user maps the compiler writes itself (STYLE: general serves special)
BUILTIN_MAPS: dict[str, Expr] = {
    "relu": Call("relu", (Var("x"),)),                                  # φ(x) = max(x, 0)
    "elu1": Binary("+", Call("elu", (Var("x"),)), Num(1.0)),            # φ(x) = elu(x) + 1
}


"""User expressions as TIR: the EXPR tree of a `kernel(x) = ...` map spliced into a kernel body."""
from __future__ import annotations

from typing import Callable

from tvm import tirx

from attndsl.ast import Binary, Call, Expr, Num, Unary, Var

from . import vmath


def _const(v: float, like: tirx.PrimExpr) -> tirx.PrimExpr:
    return tirx.const(v, str(like.ty))


def _softplus(u):  # log(1 + e^u) = max(u, 0) + log(1 + e^−|u|), no overflow
    return tirx.max(u, _const(0, u)) + tirx.log(_const(1, u) + vmath.exp(-tirx.abs(u)))


FUNCTIONS: dict[str, Callable[..., tirx.PrimExpr]] = {
    "exp": vmath.exp, "log": tirx.log, "abs": tirx.abs, "sqrt": tirx.sqrt,
    "relu": lambda u: tirx.Select(u <= _const(0, u), _const(0, u), u),     # NaN stays NaN
    "elu": lambda u: tirx.Select(u > _const(0, u), u, vmath.exp(u) - _const(1, u)),
    "sigmoid": lambda u: _const(1, u) / (_const(1, u) + vmath.exp(-u)),
    "tanh": tirx.tanh, "softplus": _softplus,
    "sin": lambda u: vmath.cos(u, -1), "cos": vmath.cos,
    # TVM's max(a, b) is a > b ? a : b, which drops a NaN in a (and min likewise): keep it
    "min": lambda a, b: tirx.Select(tirx.isnan(a), a, tirx.min(a, b)),
    "max": lambda a, b: tirx.Select(tirx.isnan(a), a, tirx.max(a, b)),
    "step": lambda u: tirx.Select(u > _const(0, u), _const(1, u), _const(0, u)),
    "sign": lambda u: tirx.Select(u > _const(0, u), _const(1, u),
                                  tirx.Select(u < _const(0, u), _const(-1, u), _const(0, u))),
    "elu_grad": lambda u: tirx.Select(u > _const(0, u), _const(1, u), vmath.exp(u)),
}


BINARY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b,
          "*": lambda a, b: a * b, "/": tirx.div}


def _power(a: tirx.PrimExpr, b: Expr, dtype: str) -> tirx.PrimExpr:
    # small integer powers as products: exact, vectorizable, and defined for a < 0
    if isinstance(b, Num) and float(b.value).is_integer() and 0 <= b.value <= 8:
        out = _const(1, a)
        for _ in range(int(b.value)):
            out = out * a
        return out
    return tirx.power(a, to_tir(b, a, dtype))


def to_tir(e: Expr, value: tirx.PrimExpr, dtype: str) -> tirx.PrimExpr:
    """EXPR with its variable bound to `value` (a PrimExpr of `dtype`)."""
    if isinstance(e, Num):
        return tirx.const(e.value, dtype)
    if isinstance(e, Var):
        return value
    if isinstance(e, Unary):
        return -to_tir(e.operand, value, dtype)
    if isinstance(e, Binary):
        a = to_tir(e.left, value, dtype)
        if e.op == "**":
            return _power(a, e.right, dtype)
        return BINARY[e.op](a, to_tir(e.right, value, dtype))
    if isinstance(e, Call):
        return FUNCTIONS[e.func](*(to_tir(a, value, dtype) for a in e.args))
    raise TypeError(f"not an expression: {e!r}")

"""User expressions as TIR: the EXPR of a `kernel(x) = ...` or `position(r) = ...` map spliced into a
kernel body.

`attndsl.expr.plan` numbers the distinct subexpressions (equal subtrees are one node) and picks each
call's form; every node read more than once (vmath.exp reads its argument 44 times) is computed once
in a `tirx.Let`. TVM's analyzer still substitutes let-bound values into their uses while it
simplifies, so its passes take time in proportion to the expanded size (`Plan.expanded`): calls
on large arguments take the libm forms below, which read their argument once or twice, and the
checker refuses maps whose expanded size is too large (attndsl/check.py). Let expressions in
vectorized loops compute lane by lane (tests/test_nested_maps.py checks kernels against the
reference).
"""
from __future__ import annotations

from typing import Callable

from tvm import tirx

from attndsl.ast import Binary, Call, Expr, Num, Unary, Var
from attndsl.expr import plan, small_power

from . import vmath


def _const(v: float, like: tirx.PrimExpr) -> tirx.PrimExpr:
    return tirx.const(v, str(like.ty))


def _softplus(u):  # log(1 + e^u) = max(u, 0) + log(1 + e^−|u|), no overflow
    return tirx.max(u, _const(0, u)) + tirx.log(_const(1, u) + vmath.exp(-tirx.abs(u)))


# the vectorized forms (lowering/tir/vmath.py): fast, but they read their argument many times
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

# the forms that read their argument at most three times (libm calls, one lane at a time): for arguments
# that expand to many nodes, or once the plan's budget of vectorized code is spent
LIBM: dict[str, Callable[..., tirx.PrimExpr]] = {
    **FUNCTIONS,
    "exp": tirx.exp,
    "elu": lambda u: tirx.Select(u <= _const(0, u), tirx.exp(u) - _const(1, u), u),   # NaN stays NaN
    "sigmoid": lambda u: _const(1, u) / (_const(1, u) + tirx.exp(-u)),
    "softplus": lambda u: tirx.max(u, _const(0, u)) + tirx.log(_const(1, u) + tirx.exp(-tirx.abs(u))),
    "sin": tirx.sin, "cos": tirx.cos,
    "sign": lambda u: (tirx.Select(u > _const(0, u), _const(1, u), _const(0, u))
                       - tirx.Select(u < _const(0, u), _const(1, u), _const(0, u))),
    "elu_grad": lambda u: tirx.Select(u > _const(0, u), _const(1, u), tirx.exp(u)),
}

BINARY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b,
          "*": lambda a, b: a * b, "/": tirx.div}


def _power(a: tirx.PrimExpr, b: Expr, b_tir: tirx.PrimExpr) -> tirx.PrimExpr:
    # small integer powers as products: exact, vectorizable, and defined for a < 0
    k = small_power(b)
    if k is not None:
        out = _const(1, a)
        for _ in range(k):
            out = out * a
        return out
    return tirx.power(a, b_tir)


def to_tir(e: Expr, value: tirx.PrimExpr, dtype: str, env: dict | None = None) -> tirx.PrimExpr:
    """EXPR with its variable bound to `value` (a PrimExpr of `dtype`) and its params to their
    values `env` ({name: PrimExpr}, e.g. a load of the params' buffer), repeats let-bound."""
    env = env or {}
    p = plan(e)
    reads = [0] * len(p.nodes)                  # how many times each node's TIR is read
    for n, ks in zip(p.nodes, p.kids):
        for c in ks:
            reads[c] += 1
        if isinstance(n, Call) or (isinstance(n, Binary) and n.op == "**"):
            reads[ks[0]] += 1                   # read again by its function or product
    bindings: list[tuple[tirx.Var, tirx.PrimExpr]] = []
    tir: list[tirx.PrimExpr] = []
    for i, (n, ks) in enumerate(zip(p.nodes, p.kids)):
        args = [tir[c] for c in ks]
        if isinstance(n, Num):
            out = tirx.const(n.value, dtype)
        elif isinstance(n, Var):
            out = env.get(n.name, value)
        elif isinstance(n, Unary):
            out = -args[0]
        elif isinstance(n, Binary):
            out = _power(args[0], n.right, args[1]) if n.op == "**" else BINARY[n.op](*args)
        else:
            out = (FUNCTIONS if p.fast[i] else LIBM)[n.func](*args)
        # the variable's own value is repeated, not bound: it is a load (and a scale), and the
        # builtin maps (elu1, relu) keep the TIR the shipped tuning records were measured on
        if reads[i] > 1 and not isinstance(n, (Var, Num)) \
                and not isinstance(out, (tirx.Var, tirx.IntImm, tirx.FloatImm)):
            v = tirx.Var(f"e{len(bindings)}", dtype)
            bindings.append((v, out))
            out = v
        tir.append(out)
    out = tir[p.root]
    for v, x in reversed(bindings):
        out = tirx.Let(v, x, out)
    return out

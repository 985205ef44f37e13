"""User expressions (`kernel(x) = EXPR`, `position(r) = EXPR`): evaluation and symbolic derivative.

The same tree is evaluated three ways: on torch tensors here (the reference), as TVM TIR in
`attndsl.lowering.tir.expr`, and differentiated here so backward kernels get d/dx in closed form.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .ast import Binary, Call, Expr, Num, Unary, Var, children

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


def evaluate(e: Expr, x: torch.Tensor, env: dict | None = None) -> torch.Tensor:
    """EXPR at every element of x (the variable's value), as a tensor of x's shape and dtype
    (broadcast with the params' values `env`, {name: tensor}: a per-head param shaped (H, 1, …)
    gives (H, *x.shape)). A subexpression shared by several parents (derivatives share them) is
    evaluated once."""
    memo: dict[int, torch.Tensor] = {}
    env = env or {}

    def ev(n: Expr) -> torch.Tensor:
        if id(n) in memo:
            return memo[id(n)]
        if isinstance(n, Num):
            out = torch.full_like(x, n.value)
        elif isinstance(n, Var):
            out = env[n.name] if n.name in env else x
        elif isinstance(n, Unary):
            out = -ev(n.operand)
        elif isinstance(n, Binary):
            out = TORCH_BINARY[n.op](ev(n.left), ev(n.right))
        elif isinstance(n, Call):
            out = TORCH_FUNCTIONS[n.func](*(ev(a) for a in n.args))
        else:
            raise TypeError(f"not an expression: {n!r}")
        memo[id(n)] = out
        return out
    return ev(e)


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


# --- what compiling an EXPR costs ------------------------------------------------------------
#
# TVM's analyzer substitutes every let-bound value into its uses, so the passes over a kernel walk
# an EXPR as if every shared subexpression were written out: their time follows that expanded
# size, not the size of the DAG. Per function, the TIR of lowering/tir/expr.py (float64, the larger):
# (nodes, reads of the argument) of the vectorized form (lowering/tir/vmath.py: fast to run, but large
# and reading its argument many times) and of the libm form (one lane at a time; at most three
# reads). tests/test_expr.py checks these numbers against the TIR.
TIR_COST: dict[str, tuple[int, int, int, int]] = {
    "exp": (335, 44, 2, 1), "elu": (342, 46, 9, 3), "sigmoid": (427, 44, 8, 1),
    "softplus": (474, 45, 12, 2), "sin": (1521, 213, 2, 1), "cos": (1521, 213, 2, 1),
    "elu_grad": (340, 45, 7, 2), "sign": (13, 2, 13, 2), "step": (6, 1, 6, 1), "relu": (6, 2, 6, 2),
    "log": (2, 1, 2, 1), "abs": (2, 1, 2, 1), "sqrt": (2, 1, 2, 1), "tanh": (2, 1, 2, 1),
    "min": (5, 3, 5, 3), "max": (5, 3, 5, 3),             # NaN-keeping: the first argument 3 times
}
# the calls that are libm calls or vmath polynomials: LLVM's time grows with their number (a libm
# call in a vectorized loop becomes one call per lane)
TRANSCENDENTAL = frozenset({"exp", "log", "sin", "cos", "tanh", "sigmoid", "softplus", "elu", "elu_grad"})
FAST_ARG_MAX = 16        # the vectorized form takes arguments that expand to at most this many nodes
FAST_BUDGET = 3200       # and an EXPR spends at most this many nodes on vectorized forms (LLVM's time)
VAR_SIZE = 3             # the variable's value: x·c, or a cast of r
SMALL_POWER = 8          # a ** k for an integer 0 <= k <= 8 is the product of k factors


def small_power(b: Expr) -> int | None:
    """k when `a ** b` is written as the product a·a·…·a (b = k, a small integer), else None."""
    if isinstance(b, Num) and float(b.value).is_integer() and 0 <= b.value <= SMALL_POWER:
        return int(b.value)
    return None


@dataclass
class Plan:
    """An EXPR as the lowering emits it: its distinct subexpressions (children first; equal
    subtrees are one node), which calls take the vectorized form, each node's expanded size."""
    nodes: list[Expr]
    kids: list[tuple[int, ...]]
    fast: list[bool]
    size: list[int]
    root: int

    @property
    def expanded(self) -> int:
        """The expanded size of the whole EXPR."""
        return self.size[self.root]

    @property
    def calls(self) -> int:
        """The distinct transcendental calls (and powers that are not products)."""
        return sum(1 for n in self.nodes if (isinstance(n, Call) and n.func in TRANSCENDENTAL)
                   or (isinstance(n, Binary) and n.op == "**" and small_power(n.right) is None))


def plan(e: Expr) -> Plan:
    """Number the distinct subexpressions of `e`, choose each call's form (vectorized while its
    argument is small and the budget lasts, in post-order) and size every node. Linear in the
    number of distinct Python objects of `e` (a derivative shares its subtrees)."""
    nodes: list[Expr] = []
    kids: list[tuple[int, ...]] = []
    fast: list[bool] = []
    size: list[int] = []
    number: dict[tuple, int] = {}
    seen: dict[int, int] = {}                   # id(object) -> node number
    budget = FAST_BUDGET
    stack: list[tuple[Expr, bool]] = [(e, False)]
    while stack:
        n, ready = stack.pop()
        if id(n) in seen:
            continue
        cs = children(n)
        if not ready:
            stack.append((n, True))
            stack.extend((c, False) for c in reversed(cs) if id(c) not in seen)
            continue
        ks = tuple(seen[id(c)] for c in cs)
        if isinstance(n, Num):
            key: tuple = ("num", repr(float(n.value)))      # 0.0 and -0.0 apart
        elif isinstance(n, Var):
            key = ("var", n.name)
        elif isinstance(n, Unary):
            key = ("neg", *ks)
        elif isinstance(n, Binary):
            key = ("bin", n.op, *ks)
        elif isinstance(n, Call):
            key = ("call", n.func, *ks)
        else:
            raise TypeError(f"not an expression: {n!r}")
        if key not in number:
            sizes = [size[k] for k in ks]
            quick = False
            if isinstance(n, Num):
                grown = 1
            elif isinstance(n, Var):
                grown = VAR_SIZE
            elif isinstance(n, Binary) and n.op == "**" and small_power(n.right) is not None:
                k = small_power(n.right)
                grown = max(1, k + k * sizes[0])
            elif isinstance(n, Call):
                nodes_, reads, lnodes, lreads = TIR_COST[n.func]
                quick = (len(sizes) == 1 and (nodes_, reads) != (lnodes, lreads)
                         and sizes[0] <= FAST_ARG_MAX and nodes_ <= budget)
                if quick:
                    budget -= nodes_
                else:
                    nodes_, reads = lnodes, lreads
                grown = nodes_ + reads * sum(sizes)
            else:
                grown = 1 + sum(sizes)
            number[key] = len(nodes)
            nodes.append(n)
            kids.append(ks)
            fast.append(quick)
            size.append(grown)
        seen[id(n)] = number[key]
    return Plan(nodes, kids, fast, size, seen[id(e)])


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


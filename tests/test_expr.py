"""User expressions: the symbolic derivative agrees with autograd for every function."""
import pytest
import torch

from attndsl import parse
from attndsl.ast import FUNCTIONS, Binary, Call, Num, Var
from attndsl.expr import diff, evaluate, to_text

X = Var("x")
EXPRS = {f"{name}": Call(name, (X,)) if arity == 1 else Call(name, (X, Binary("*", Num(0.5), X)))
         for name, arity in FUNCTIONS.items()}
EXPRS.update({
    "poly": Binary("+", Binary("**", X, Num(3.0)), Binary("*", Num(2.0), X)),
    "quotient": Binary("/", Call("exp", (X,)), Binary("+", Num(2.0), Call("cos", (X,)))),
    "power_of_x": Binary("**", Num(2.0), X),
    "x_to_x": Binary("**", Call("softplus", (X,)), Call("sigmoid", (X,))),
    "elu1": Binary("+", Call("elu", (X,)), Num(1.0)),
})


@pytest.mark.parametrize("name", sorted(EXPRS))
def test_derivative_matches_autograd(name):
    e = EXPRS[name]
    x = torch.linspace(0.05, 3.0, 101, dtype=torch.float64)       # positive: log, sqrt defined
    x = torch.cat([x, -x]) if name not in ("log", "sqrt", "x_to_x") else x
    x = x[x.abs() > 1e-3].requires_grad_()
    y = evaluate(e, x)
    (g,) = torch.autograd.grad(y.sum(), x)
    d = evaluate(diff(e, "x"), x.detach())
    torch.testing.assert_close(d, g, rtol=1e-10, atol=1e-12)


def test_to_text_round_trips_through_evaluate():
    e = EXPRS["quotient"]
    assert to_text(e) == "(exp(x) / (2 + cos(x)))"


@pytest.mark.parametrize("text", ["(-x) ** 2", "-x ** 2", "2 ** -x", "--x", "-(x + 1) * 3", "1e-05 * x / 7",
                                  "max(-x, 0.5) ** (1 / 3)"])
def test_to_text_parses_back_to_the_same_tree(text):
    def user_map(t):
        return parse(f"attention a {{ kernel(x) = {t} }}").block().kernel.expr
    e = user_map(text)
    assert user_map(to_text(e)) == e


def _tir_count(e, var) -> tuple[int, int]:
    """(nodes, reads of `var`) of a PrimExpr walked as a tree."""
    import tvm
    if isinstance(e, tvm.ir.expr.Var):
        return 1, int(e.same_as(var))
    nodes, reads = 1, 0
    for attr in ("a", "b", "value", "condition", "true_value", "false_value", "args"):
        kids = getattr(e, attr, None)
        for k in (kids if attr == "args" and kids is not None else [kids]):
            if isinstance(k, tvm.ir.expr.Expr):
                n, r = _tir_count(k, var)
                nodes, reads = nodes + n, reads + r
    return nodes, reads


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tir_cost_table_covers_the_lowering(dtype):
    """attndsl.expr.TIR_COST (what the checker's size limit counts) is at least what
    lowering/tir/expr.py emits, for both forms of every function."""
    from tvm import tirx

    from attndsl.expr import TIR_COST
    from attndsl.lowering.tir.expr import FUNCTIONS, LIBM
    u, w = tirx.Var("u", dtype), tirx.Var("w", dtype)
    for name, (nodes, reads, lnodes, lreads) in TIR_COST.items():
        args = (u,) if name not in ("min", "max") else (u, w)
        fast, libm = _tir_count(FUNCTIONS[name](*args), u), _tir_count(LIBM[name](*args), u)
        # expanded size = nodes + reads · (the argument's size): the leaves are the argument's
        assert fast[0] - fast[1] <= nodes + len(args) - 1 and fast[1] <= reads, (name, fast)
        assert libm[0] - libm[1] <= lnodes + len(args) - 1 and libm[1] <= lreads, (name, libm)
        assert lreads <= 3, name

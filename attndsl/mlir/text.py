"""A small writer of MLIR text: SSA names, linalg.generic, scf.for, scalar expressions.

The linalg lowerings (`attndsl.mlir.linalg`) are written with it. One `Body` is one function
body; nested regions (a generic's block, a loop's body) share its counter so no name repeats.

    b = Body("f32")
    e = b.empty(("%bh", "%n", 64))                           # tensor.empty(%bh, %n) : tensor<?x?x64xf32>
    y = b.generic(["b,i,d"], ["b,i,d"], [x], [e], lambda g, a: [g.exp(a[0])])
"""
from __future__ import annotations

import struct
from typing import Callable, Sequence

from ..ast import Binary, Call, Expr, Num, Unary, Var

Dim = int | str                   # a static size, or an SSA index value ("%n")


def float_literal(v: float, T: str) -> str:
    """A float constant MLIR parses exactly: hex bits (covers inf, nan and every f32/f64 value)."""
    if T == "f32":
        return "0x%08X" % struct.unpack("<I", struct.pack("<f", v))[0]
    return "0x%016X" % struct.unpack("<Q", struct.pack("<d", v))[0]


def tensor(shape: Sequence[Dim], T: str) -> str:
    return "tensor<" + "x".join(str(d) if isinstance(d, int) else "?" for d in shape) + f"x{T}>"


class Body:
    """The lines of one function body, with fresh SSA names `%tN`."""

    def __init__(self, T: str, counter: list[int] | None = None, indent: int = 1):
        self.T, self.lines, self.indent = T, [], indent
        self._counter = counter if counter is not None else [0]
        self._consts: dict[tuple, str] = {}

    def fresh(self) -> str:
        self._counter[0] += 1
        return f"%t{self._counter[0]}"

    def line(self, text: str) -> None:
        self.lines.append("  " * self.indent + text)

    def __call__(self, rhs: str, results: int = 1) -> str:
        """`%tN = rhs`; with several results, `%tN:K = rhs` (use `%tN#i`)."""
        name = self.fresh()
        self.line(f"{name}{f':{results}' if results > 1 else ''} = {rhs}")
        return name

    def nested(self) -> "Body":
        return Body(self.T, self._counter, self.indent + 2)

    # --- constants and scalars ---------------------------------------------------------------

    def const(self, v: float) -> str:
        key = ("f", float(v))
        if key not in self._consts:
            self._consts[key] = self(f"arith.constant {float_literal(float(v), self.T)} : {self.T}")
        return self._consts[key]

    def index(self, v: int) -> str:
        key = ("i", int(v))
        if key not in self._consts:
            self._consts[key] = self(f"arith.constant {int(v)} : index")
        return self._consts[key]

    def f(self, op: str, *args: str) -> str:
        """A float arith/math op on this body's element type: f("arith.mulf", a, b)."""
        return self(f"{op} {', '.join(args)} : {self.T}")

    def exp(self, a: str) -> str:
        return self.f("math.exp", a)

    def select(self, cond: str, a: str, b: str) -> str:
        return self(f"arith.select {cond}, {a}, {b} : {self.T}")

    def cmp(self, pred: str, a: str, b: str) -> str:
        return self(f"arith.cmpf {pred}, {a}, {b} : {self.T}")

    def to_float(self, i: str) -> str:
        """An index value as this body's float type."""
        return self(f"arith.sitofp {self(f'arith.index_cast {i} : index to i64')} : i64 to {self.T}")

    def extract(self, t: str, ty: str, *idx: str) -> str:
        return self(f"tensor.extract {t}[{', '.join(idx)}] : {ty}")

    # --- tensors ---------------------------------------------------------------------------------

    def empty(self, shape: Sequence[Dim]) -> str:
        dyn = ", ".join(d for d in shape if isinstance(d, str))
        return self(f"tensor.empty({dyn}) : {tensor(shape, self.T)}")

    def full(self, shape: Sequence[Dim], v: float) -> str:
        ty = tensor(shape, self.T)
        return self(f"linalg.fill ins({self.const(v)} : {self.T}) outs({self.empty(shape)} : {ty}) -> {ty}")

    def dims(self, x: str, ty: str) -> tuple[str, str]:
        """(BH, N) of a (BH, N, width) tensor."""
        return self(f"tensor.dim {x}, {self.index(0)} : {ty}"), self(f"tensor.dim {x}, {self.index(1)} : {ty}")

    def generic(self, ins_maps: Sequence[str], outs_maps: Sequence[str], ins: Sequence[tuple[str, str]],
                outs: Sequence[tuple[str, str]], body: Callable[["Body", list[str]], list[str]]) -> list[str]:
        """linalg.generic over the loop dims named in the maps ("b,i,m" ...); dims that index no
        output are reductions. ins/outs are (value, type); body(g, block args) returns the yielded
        values. Returns the result values."""
        order: list[str] = []
        for m in [*outs_maps, *ins_maps]:
            order += [d for d in m.split(",") if d and d not in order]
        kept = {d for m in outs_maps for d in m.split(",")}
        dims = ", ".join(order)
        maps = ", ".join(f"affine_map<({dims}) -> ({m.replace(',', ', ')})>" for m in [*ins_maps, *outs_maps])
        iters = ", ".join('"parallel"' if d in kept else '"reduction"' for d in order)
        g = self.nested()
        args = [g.fresh() for _ in [*ins, *outs]]
        out_vals = body(g, args)
        elem = lambda ty: ty[ty.rindex("x") + 1:-1]
        head = f"linalg.generic {{indexing_maps = [{maps}], iterator_types = [{iters}]}}"
        if ins:
            head += f" ins({', '.join(v for v, _ in ins)} : {', '.join(t for _, t in ins)})"
        head += f" outs({', '.join(v for v, _ in outs)} : {', '.join(t for _, t in outs)}) {{"
        types = [t for _, t in outs]
        tail = f"}} -> {types[0] if len(types) == 1 else '(' + ', '.join(types) + ')'}"
        block = ", ".join(f"{a}: {elem(t)}" for a, (_, t) in zip(args, [*ins, *outs]))
        name = self.fresh()
        self.line(f"{name}{f':{len(outs)}' if len(outs) > 1 else ''} = {head}")
        self.line(f"^bb0({block}):")
        self.lines += g.lines
        g.line(f"linalg.yield {', '.join(out_vals)} : {', '.join(elem(t) for t in types)}")
        self.lines.append(g.lines[-1])
        self.line(tail)
        return [name] if len(outs) == 1 else [f"{name}#{i}" for i in range(len(outs))]

    def loop(self, lo: str, hi: str, carried: Sequence[tuple[str, str]],
             body: Callable[["Body", str, list[str]], list[str]]) -> list[str]:
        """scf.for %i = lo to hi carrying tensors (value, type); body(g, %i, carried) -> next values."""
        g = self.nested()
        i, args = g.fresh(), [g.fresh() for _ in carried]
        nxt = body(g, i, args)
        types = ", ".join(t for _, t in carried)
        name = self.fresh()
        inits = ", ".join(f"{a} = {v}" for a, (v, _) in zip(args, carried))
        self.line(f"{name}:{len(carried)} = scf.for {i} = {lo} to {hi} step {self.index(1)} "
                  f"iter_args({inits}) -> ({types}) {{")
        self.lines += g.lines
        g.line(f"scf.yield {', '.join(nxt)} : {types}")
        self.lines.append(g.lines[-1])
        self.line("}")
        return [f"{name}#{k}" for k in range(len(carried))]

    # --- user expressions ------------------------------------------------------------------------

    def expr(self, e: Expr, x: str) -> str:
        """EXPR with its variable bound to the scalar `x`, as arith/math ops."""
        if isinstance(e, Num):
            return self.const(e.value)
        if isinstance(e, Var):
            return x
        if isinstance(e, Unary):
            return self.f("arith.negf", self.expr(e.operand, x))
        if isinstance(e, Binary):
            a = self.expr(e.left, x)
            if e.op == "**" and isinstance(e.right, Num) and float(e.right.value).is_integer() \
                    and 0 <= e.right.value <= 8:      # small integer powers as products (a < 0 allowed)
                out = self.const(1.0)
                for _ in range(int(e.right.value)):
                    out = self.f("arith.mulf", out, a)
                return out
            return self.f(BINARY[e.op], a, self.expr(e.right, x))
        if isinstance(e, Call):
            return FUNCTIONS[e.func](self, *(self.expr(a, x) for a in e.args))
        raise TypeError(f"not an expression: {e!r}")


BINARY = {"+": "arith.addf", "-": "arith.subf", "*": "arith.mulf", "/": "arith.divf", "**": "math.powf"}


def _elu(b: Body, u: str) -> str:
    return b.select(b.cmp("ogt", u, b.const(0.0)), u, b.f("arith.subf", b.exp(u), b.const(1.0)))


def _softplus(b: Body, u: str) -> str:        # max(u, 0) + log1p(e^−|u|): no overflow
    return b.f("arith.addf", b.f("arith.maximumf", u, b.const(0.0)),
               b.f("math.log1p", b.exp(b.f("arith.negf", b.f("math.absf", u)))))


FUNCTIONS: dict[str, Callable[..., str]] = {
    "exp": Body.exp, "log": lambda b, u: b.f("math.log", u), "abs": lambda b, u: b.f("math.absf", u),
    "sqrt": lambda b, u: b.f("math.sqrt", u), "relu": lambda b, u: b.f("arith.maximumf", u, b.const(0.0)),
    "elu": _elu, "sigmoid": lambda b, u: b.f("arith.divf", b.const(1.0), b.f(
        "arith.addf", b.const(1.0), b.exp(b.f("arith.negf", u)))),
    "tanh": lambda b, u: b.f("math.tanh", u), "softplus": _softplus,
    "sin": lambda b, u: b.f("math.sin", u), "cos": lambda b, u: b.f("math.cos", u),
    "min": lambda b, u, w: b.f("arith.minimumf", u, w), "max": lambda b, u, w: b.f("arith.maximumf", u, w),
}

"""The IR: a frozen expression tree over per-(batch·head) tensors, printable in SSA form.

Shapes are symbolic in BH (batch·heads) and N (sequence length); feature and value widths are
baked in. Quadratic nodes (`ExpDot`, `Dot`, `Biased`, `Masked`, `Normalize`) describe the spec's
O(N²) meaning literally; passes rewrite them into the cheap forms (`LinearAttention`, ...), which
`lowering/` turns into TVM kernels.
The softmax kernel keeps its quadratic form: `SoftmaxAttention` (the flash-style kernels).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Iterator

from .ast import NOWHERE, Choice, Span


@dataclass(frozen=True)
class Node:
    """Base of all IR nodes. Children are the fields holding Nodes; the others are attributes."""

    def children(self) -> Iterator["Node"]:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Node):
                yield v

    def attrs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "span" and not isinstance(getattr(self, f.name), Node)}

    def with_children(self, new: dict[str, "Node"]) -> "Node":
        return replace(self, **new) if new else self

    @property
    def op(self) -> str:
        return _snake(type(self).__name__)

    @property
    def shape(self) -> tuple:
        raise NotImplementedError


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() and i else c.lower() for i, c in enumerate(name))


ROWS = ("BH", "N")          # every row-wise tensor is (BH, N, width)
SQUARE = ("BH", "N", "N")   # a quadratic object


# --- leaves and row-wise nodes -------------------------------------------------------------------

@dataclass(frozen=True)
class Input(Node):
    """q, k: (BH, N, Dk); v: (BH, N, Dv)."""
    name: str
    dim: int
    span: Span = field(default=NOWHERE, compare=False)

    @property
    def shape(self):
        return (*ROWS, self.dim)


@dataclass(frozen=True)
class Scale(Node):
    """c·x."""
    x: Node
    factor: float
    span: Span = field(default=NOWHERE, compare=False)

    @property
    def shape(self):
        return self.x.shape


@dataclass(frozen=True)
class FeatureMap(Node):
    """φ(c·x) row by row; `role` q or k decides the stabilizer. (BH, N, Dk) -> (BH, N, width)."""
    x: Node
    kernel: Choice
    role: str
    width: int
    prescale: float = 1.0
    span: Span = field(default=NOWHERE, compare=False)

    @property
    def shape(self):
        return (*ROWS, self.width)


# --- quadratic nodes (the spec's meaning) ---------------------------------------------------------------

@dataclass(frozen=True)
class ExpDot(Node):
    """κ_ij = exp(s·q_i·k_j), the softmax kernel."""
    q: Node
    k: Node
    scale: float
    span: Span = field(default=NOWHERE, compare=False)

    @property
    def shape(self):
        return SQUARE


@dataclass(frozen=True)
class Dot(Node):
    """κ_ij = φ(q_i)·φ(k_j)."""
    qf: Node
    kf: Node
    span: Span = field(default=NOWHERE, compare=False)

    @property
    def shape(self):
        return SQUARE


@dataclass(frozen=True)
class Position(Node):
    """b_h(i − j): a learned table, alibi or a user function of r."""
    position: Choice
    span: Span = field(default=NOWHERE, compare=False)

    @property
    def shape(self):
        return SQUARE


@dataclass(frozen=True)
class Biased(Node):
    """A_ij = κ_ij · exp(b(i − j))."""
    scores: Node
    bias: Node
    span: Span = field(default=NOWHERE, compare=False)

    @property
    def shape(self):
        return SQUARE


@dataclass(frozen=True)
class Masked(Node):
    """A_ij · [j <= i]."""
    scores: Node
    span: Span = field(default=NOWHERE, compare=False)

    @property
    def shape(self):
        return SQUARE


@dataclass(frozen=True)
class Normalize(Node):
    """out_i = Σ_j A_ij v_j / (Σ_j A_ij + eps); eps (the spec's floor) None for 0."""
    scores: Node
    v: Node
    eps: float | None = None
    span: Span = field(default=NOWHERE, compare=False)

    @property
    def shape(self):
        return self.v.shape


@dataclass(frozen=True)
class ToeplitzValues(Node):
    """Σ_j M_ij b(i − j) v_j (FastRPB: the position term on the values); `form` set by the planner."""
    bias: Node
    v: Node
    causal: bool
    form: str | None = None
    span: Span = field(default=NOWHERE, compare=False)

    @property
    def shape(self):
        return self.v.shape


@dataclass(frozen=True)
class Add(Node):
    a: Node
    b: Node
    span: Span = field(default=NOWHERE, compare=False)

    @property
    def shape(self):
        return self.a.shape


@dataclass(frozen=True)
class Sample(Node):
    """An estimate of exact attention `x` by a sampling scheme (kde, uniform)."""
    x: Node
    sampling: Choice
    span: Span = field(default=NOWHERE, compare=False)

    @property
    def shape(self):
        return self.x.shape


# --- forms (what the rewrite passes produce) ---------------------------------------------------------

@dataclass(frozen=True)
class LinearAttention(Node):
    """out_i = φq_i·Σ_{j∈M(i)} φk_j v_jᵀ / φq_i·Σ_{j∈M(i)} φk_j; `form` is chosen by the planner.
    With `phi` set (an elementwise map fused in), qf and kf are the raw q, k and the kernel
    applies φ(prescale·x) itself. The normalizer gets + eps when eps is set."""
    qf: Node
    kf: Node
    v: Node
    causal: bool
    form: str | None = None
    phi: Choice | None = None
    prescale: float | None = None
    eps: float | None = None
    span: Span = field(default=NOWHERE, compare=False)

    @property
    def shape(self):
        return self.v.shape


@dataclass(frozen=True)
class PositionalAttention(Node):
    """Linear attention with a relative-position weight (Luo et al. 2021), c(r) = exp(b(r)):
    out_i = Σ_{j∈M(i)} c(i−j) (φq_i·φk_j) v_j / Σ_{j∈M(i)} c(i−j) (φq_i·φk_j).
    The weights form a Toeplitz matrix; `form` (FFT, banded, decayed) is chosen by the planner.
    The normalizer gets + eps when eps is set."""
    qf: Node
    kf: Node
    v: Node
    bias: Node
    causal: bool
    form: str | None = None
    eps: float | None = None
    span: Span = field(default=NOWHERE, compare=False)

    @property
    def shape(self):
        return self.v.shape


@dataclass(frozen=True)
class SoftmaxAttention(Node):
    """The quadratic form of the softmax kernel, fused and tiled with an online normalizer:
    out_i = Σ_{j∈M(i)} exp(s·q_i·k_j + b(i−j)) v_j / Σ_{j∈M(i)} exp(s·q_i·k_j + b(i−j)),
    b from `bias` (a Position) or 0 when None; no N×N tensor is formed. `form` set by the planner."""
    q: Node
    k: Node
    v: Node
    bias: Node | None
    causal: bool
    scale: float
    form: str | None = None
    span: Span = field(default=NOWHERE, compare=False)

    @property
    def shape(self):
        return self.v.shape


@dataclass(frozen=True)
class SampledAttention(Node):
    """An estimate of softmax attention from a sampling scheme (`sampling`: kde or uniform), per
    query its block's keys exactly plus importance-weighted sampled keys (attndsl/sampling.py,
    lowering/cpu/sampled.py); no N×N tensor. `form` (kde, uniform) set by the planner."""
    q: Node
    k: Node
    v: Node
    causal: bool
    scale: float
    sampling: Choice
    form: str | None = None
    span: Span = field(default=NOWHERE, compare=False)

    @property
    def shape(self):
        return self.v.shape


# --- traversal and printing ----------------------------------------------------------------------

def postorder(root: Node) -> list[Node]:
    """Each distinct node once, children before parents."""
    seen: dict[Node, None] = {}

    def visit(n: Node) -> None:
        if n in seen:
            return
        for c in n.children():
            visit(c)
        seen[n] = None

    visit(root)
    return list(seen)


def format_attr(v) -> str:
    if isinstance(v, Choice):
        from .expr import to_text
        if v.expr is not None:
            return f"{v.name}({to_text(v.expr)})"
        args = ", ".join(f"{k}={str(a).lower() if isinstance(a, bool) else a}" for k, a in v.params)
        return f"{v.name}({args})" if args else v.name
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v).lower() if isinstance(v, bool) else str(v)


def format_ir(root: Node) -> str:
    """SSA text: one line per node, `%3 = feature_map %1 {kernel=favor(...), role=q} : [BH, N, 64]`."""
    names: dict[Node, str] = {}
    lines = []
    for n in postorder(root):
        names[n] = f"%{len(names)}"
        args = " ".join(names[c] for c in n.children())
        attrs = ", ".join(f"{k}={format_attr(v)}" for k, v in n.attrs().items() if v is not None)
        shape = ", ".join(str(d) for d in n.shape)
        lines.append(f"{names[n]} = {n.op}{' ' + args if args else ''}"
                     f"{' {' + attrs + '}' if attrs else ''} : [{shape}]")
    lines.append(f"return {names[root]}")
    return "\n".join(lines)

"""The abstract syntax of a spec file: frozen dataclasses that keep their source spans.

`attndsl.parse` returns a `SpecFile`; every field of every block is filled in, defaults
included, and every argument has been checked (see `attndsl.check`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass(frozen=True)
class Span:
    """A place in the source: 1-based line and column, end exclusive."""

    filename: str
    line: int
    column: int
    end_line: int
    end_column: int
    source: str = field(default="", compare=False, repr=False)  # the whole text, for diagnostics

    def line_text(self) -> str:
        lines = self.source.splitlines()
        return lines[self.line - 1] if 0 < self.line <= len(lines) else ""

    def __str__(self) -> str:
        return f"{self.filename}:{self.line}:{self.column}"


NOWHERE = Span("<builtin>", 0, 0, 0, 0)


# --- expressions of user maps: kernel(x) = EXPR, position(r) = EXPR -------------------------


@dataclass(frozen=True)
class Num:
    value: float
    span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Var:
    name: str  # "x" in a kernel map, "r" in a position function
    span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Unary:
    op: str  # "-"
    operand: "Expr"
    span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Binary:
    op: str  # "+", "-", "*", "/", "**"
    left: "Expr"
    right: "Expr"
    span: Span = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Call:
    func: str  # one of FUNCTIONS
    args: tuple["Expr", ...]
    span: Span = field(default=NOWHERE, compare=False)


Expr = Union[Num, Var, Unary, Binary, Call]


def children(e: Expr) -> tuple[Expr, ...]:
    """The operands of an EXPR node (none for numbers and the variable)."""
    if isinstance(e, Unary):
        return (e.operand,)
    if isinstance(e, Binary):
        return (e.left, e.right)
    if isinstance(e, Call):
        return e.args
    return ()

# name -> arity of the functions an EXPR may call
FUNCTIONS: dict[str, int] = {
    "exp": 1, "log": 1, "abs": 1, "sqrt": 1, "relu": 1, "elu": 1, "sigmoid": 1,
    "tanh": 1, "softplus": 1, "sin": 1, "cos": 1, "min": 2, "max": 2,
}


# --- field values -----------------------------------------------------------------------------

Value = Union[int, float, bool, str]


# the position kinds the kernels read as a table clipped at ±max_distance: toeplitz (one learned
# entry per distance), t5 (learned entries tied in T5's log buckets, expanded to that table by
# t5_slots), window (a sliding window's weights, built per call by the module: `windowed`) and
# tabulated (position(r) = EXPR with `param`s, evaluated per call over every r: `tabulated`)
TABLES = ("toeplitz", "t5", "window", "tabulated")


def learned_table(position) -> bool:
    """Whether the kernels read a position term as a table (TABLES), (H, 2W + 1)."""
    return position.name in TABLES


# a tabulated term's clip: more than any r (the module passes b(r) for r = −(N − 1) … N − 1)
EVERY_DISTANCE = 1 << 20


def tabulated(position: "Choice") -> "Choice":
    """The IR's position term of position(r) = EXPR that reads `param`s: b(r) evaluated by the
    module per call over every r of the sequence, read by the kernels as a learned table (whose
    gradient reaches the params through the expression)."""
    return Choice("tabulated", (("max_distance", EVERY_DISTANCE),), expr=position.expr, span=position.span)


def windowed(position: "Choice", size: int) -> "Choice":
    """The IR's position term of a sliding window of ±size over `position` (none included): the
    table b(r) for |r| ≤ size, with the entries at ±(size + 1), which every farther r reads, set to
    a score no key survives (padding.KEY_OUT). The forms that read a table need nothing else."""
    return Choice("window", (("max_distance", size + 1), ("size", size), ("within", position.name)),
                  span=position.span)


def t5_slots(buckets: int, max_distance: int, bidirectional: bool) -> list[int]:
    """The T5 bucket of each r = i − j in −W … W (W = max_distance), computed as T5's
    `_relative_position_bucket` does (float32 logarithms, its relative position being j − i), so
    imported tables keep their buckets: bidirectionally, half the buckets for keys after the query;
    in each half, one bucket per distance below half / 2, then logarithmically wider ones up to
    max_distance; from there on, the last."""
    import math

    import torch
    rel = -torch.arange(-max_distance, max_distance + 1)             # j − i
    out = torch.zeros_like(rel)
    if bidirectional:
        buckets //= 2
        out += (rel > 0).long() * buckets
        rel = rel.abs()
    else:
        rel = -torch.min(rel, torch.zeros_like(rel))
    exact = buckets // 2
    large = exact + (torch.log(rel.float() / exact) / math.log(max_distance / exact)
                     * (buckets - exact)).to(torch.long)
    large = torch.min(large, torch.full_like(large, buckets - 1))
    return (out + torch.where(rel < exact, rel, large)).tolist()


@dataclass(frozen=True)
class Choice:
    """A field value such as `favor(features=256, seed=0)`, `causal` or `kernel(x) = EXPR`.

    `name` is the canonical choice ("favor", "user", "none", ...); `params` holds every parameter
    of that choice with defaults filled in, in declaration order; `expr` is set for user maps.
    """

    name: str
    params: tuple[tuple[str, Value], ...] = ()
    expr: Expr | None = None
    span: Span = field(default=NOWHERE, compare=False)

    def __getitem__(self, key: str) -> Value:
        for k, v in self.params:
            if k == key:
                return v
        raise KeyError(key)

    def get(self, key: str, default: Value | None = None) -> Value | None:
        try:
            return self[key]
        except KeyError:
            return default


# the feature maps whose values can all be zero (or whose normalizer can be ≤ 0: trig), so that a
# row's normalizer can vanish; they get a floor of DEFAULT_EPS unless the spec sets `eps`
VANISHING_MAPS = frozenset({"relu", "trig", "user"})
DEFAULT_EPS = 1e-6


@dataclass(frozen=True)
class Learnable:
    """`param NAME = INIT` (one scalar) or `param NAME[heads] = INIT` (one per head): a trainable
    parameter that position(r) = EXPR reads by name."""
    name: str
    per_head: bool
    init: float
    span: Span = field(default=NOWHERE, compare=False)


def map_params(kernel: Choice) -> tuple[str, ...]:
    """The params kernel(x) = EXPR reads (every name of EXPR but x), sorted: the order its kernels
    take their values in; () for a built-in map."""
    out, todo = set(), [] if kernel.expr is None else [kernel.expr]
    while todo:
        n = todo.pop()
        if isinstance(n, Var) and n.name != "x":
            out.add(n.name)
        todo.extend(children(n))
    return tuple(sorted(out))


def uses(e: Expr | None, names) -> set[str]:
    """The names among `names` that EXPR reads."""
    out, todo = set(), [] if e is None else [e]
    while todo:
        n = todo.pop()
        if isinstance(n, Var) and n.name in names:
            out.add(n.name)
        todo.extend(children(n))
    return out


@dataclass(frozen=True)
class AttentionSpec:
    """One `attention NAME { ... }` block, every field present (defaults filled in).

    kernel:   softmax | relu | elu1 | exp_shift | favor | hyperbolic | trig | user
    position: none | toeplitz | alibi | user
    apply:    scores | values
    sampling: none | kde | uniform
    mask:     none | causal | window(size) | causal_window(size)
    scale:    None means 1/sqrt(head_dim)
    eps:      the normalizer's floor (out_i = num_i / (den_i + eps)); None means the kernel's
              default, `floor` below
    params:   the block's `param` declarations, which position(r) = EXPR and kernel(x) = EXPR read
    """

    name: str
    kernel: Choice
    position: Choice
    apply: Choice
    sampling: Choice
    mask: Choice
    scale: float | None
    eps: float | None = None
    params: tuple[Learnable, ...] = ()
    span: Span = field(default=NOWHERE, compare=False)
    # span of each field as written (absent when the field took its default)
    field_spans: tuple[tuple[str, Span], ...] = field(default=(), compare=False)

    def span_of(self, field_name: str) -> Span:
        for k, s in self.field_spans:
            if k == field_name:
                return s
        return self.span

    @property
    def causal(self) -> bool:
        return self.mask.name in ("causal", "causal_window")

    @property
    def learned_position(self) -> bool:
        """Whether position(r) = EXPR reads a `param`: the module then tabulates b(r) per call."""
        return bool(self.params) and bool(uses(self.position.expr, {p.name for p in self.params}))

    @property
    def map_params(self) -> tuple[str, ...]:
        """The params kernel(x) = EXPR reads, sorted (ast.map_params)."""
        return map_params(self.kernel)

    @property
    def window(self) -> int | None:
        """W of a sliding window (row i sees |i − j| ≤ W; causal: 0 ≤ i − j ≤ W), else None."""
        return int(self.mask["size"]) if self.mask.name in ("window", "causal_window") else None

    @property
    def stabilized(self) -> bool:
        """Whether the kernel divides φ by a data-dependent stabilizer (favor unless
        stabilize = false, hyperbolic, exp_shift)."""
        k = self.kernel
        return k.name in ("hyperbolic", "exp_shift") or (k.name == "favor" and bool(k["stabilize"]))

    @property
    def floor(self) -> float:
        """eps as written, else 1e-6 for a feature map that can be zero (relu, trig, a user map) and
        0 for one that cannot (elu1, favor, hyperbolic, exp_shift) and for softmax."""
        if self.eps is not None:
            return float(self.eps)
        return DEFAULT_EPS if self.kernel.name in VANISHING_MAPS else 0.0


@dataclass(frozen=True)
class SpecFile:
    filename: str
    blocks: tuple[AttentionSpec, ...]
    source: str = field(default="", compare=False, repr=False)

    def block(self, name: str | None = None) -> AttentionSpec:
        """The block called `name`, or the only block when `name` is None."""
        from .diagnostics import SpecError

        if name is None:
            if len(self.blocks) == 1:
                return self.blocks[0]
            names = ", ".join(b.name for b in self.blocks)
            raise SpecError(f"{self.filename} holds {len(self.blocks)} attention blocks ({names}); "
                            f"pass name= to choose one")
        for b in self.blocks:
            if b.name == name:
                return b
        names = ", ".join(b.name for b in self.blocks) or "none"
        raise SpecError(f"{self.filename} has no attention block named {name!r}; it has: {names}")


# --- the spec as written: what `parse` hands to `check` (names, spans, no defaults) ----------


@dataclass(frozen=True)
class WrittenValue:
    """A field or argument value as written: `causal`, `favor(256, seed=0)`, `-0.5`, `true`.

    kind is "name", "call", "number" or "bool"; `value` is the name (for a call, its callee),
    the number (int or float) or the bool; `text` is the source text, for messages.
    """

    kind: str
    value: Value
    text: str
    span: Span
    args: tuple["WrittenArg", ...] = ()
    name_span: Span | None = None  # the callee of a call


@dataclass(frozen=True)
class WrittenArg:
    keyword: str | None  # None for a positional argument
    value: WrittenValue
    span: Span
    keyword_span: Span | None = None


@dataclass(frozen=True)
class WrittenField:
    """`name = value`, a user map `name(param) = expr`, or a learnable `param name[shape] = value`."""

    name: str
    span: Span
    name_span: Span
    value: WrittenValue | None = None
    param: str | None = None
    param_span: Span | None = None
    expr: Expr | None = None
    declared: bool = False            # `param NAME[shape] = value`: name is the parameter's
    shape: str | None = None
    shape_span: Span | None = None


@dataclass(frozen=True)
class WrittenBlock:
    name: str
    fields: tuple[WrittenField, ...]
    span: Span
    name_span: Span

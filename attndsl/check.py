"""Written spec -> AST: the table of valid choices, defaults filled in, every semantic check.

Each mistake is a `SpecError` at its culprit's span, with a help line saying what is valid.
Order: per block, the header, then each field in source order, then cross-field rules.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .ast import (FUNCTIONS, AttentionSpec, Call, Choice, Expr, Learnable, Num, SpecFile, Span,
                  Value, Var, WrittenArg, WrittenBlock, WrittenField, WrittenValue, children, uses)
from .diagnostics import SpecError, did_you_mean

REQUIRED = object()   # a parameter with no default
INT_MAX = 2**63 - 1   # anything beyond int64 is a typo, not a setting
# the kernels compute in float32: every number of a spec is 0 or a normal float32 magnitude
F32_MAX = 3.4028234663852886e38
F32_TINY = 1.1754943508222875e-38
F32_RANGE = "numbers are 0 or float32 magnitudes, between 1.2e-38 and 3.4e38 (the kernels compute in float32)"
# position(r) = EXPR is checked finite at every relative distance r = i − j with |r| <= this
POSITION_REACH = 65536
# a user map and its derivative expand to at most this many TIR operations, and make at most this
# many transcendental calls (attndsl.expr.plan): what bounds TVM's and LLVM's time. A position map
# is spliced into the Toeplitz-FFT kernels, where it costs far more per operation (elu nested 5
# deep, 47,000 operations, took 42 s to build there; 4 deep, 16,000, took 16 s).
MAX_EXPANDED = 500_000
MAX_EXPANDED_POSITION = 20_000
MAX_CALLS = 40
# kde's block and the samples per row: a block of 65536 rows is exact attention up to that length
MAX_ROWS = 65536
# the widest feature map (favor: features; hyperbolic, trig: 2·features): the kernels vectorize a
# whole row, and compile time grows faster than the width (4096: 70 s for float32 and float64)
MAX_WIDTH = 1024


@dataclass(frozen=True)
class Param:
    """One parameter of a choice: its type (int, float, bool or str = one of `names`) and range."""

    name: str
    type: type
    default: object = REQUIRED          # None: optional, absent means "the standard value"
    lo: float | None = None             # lo <= value
    hi: float | None = None             # value <= hi
    gt: float | None = None             # gt < value
    names: tuple[str, ...] = ()         # the identifiers a str parameter accepts
    absent: str = ""                    # what a None default stands for


@dataclass(frozen=True)
class Option:
    name: str
    params: tuple[Param, ...] = ()

    def signature(self) -> str:
        def one(p: Param) -> str:
            if p.default is REQUIRED:
                return p.name
            if p.default is None:
                return f"[{p.name}]"
            return f"{p.name}={_fmt(p.default)}"
        return f"{self.name}({', '.join(map(one, self.params))})" if self.params else self.name


@dataclass(frozen=True)
class FieldSpec:
    """A field whose value is one of `options`, or a user map over `user_var` when it has one."""

    name: str
    plural: str                          # for "valid kernels: ..."
    options: dict[str, Option]
    default: str
    user_var: str | None = None


def _options(*opts: Option) -> dict[str, Option]:
    return {o.name: o for o in opts}


def _seed() -> Param:
    return Param("seed", int, 0, lo=0)


FIELDS: dict[str, FieldSpec] = {f.name: f for f in [
    FieldSpec("kernel", "kernels", _options(
        Option("softmax"), Option("relu"), Option("elu1"), Option("exp_shift"),
        Option("favor", (Param("features", int, 256, lo=1, hi=MAX_WIDTH), Param("orthogonal", bool, True),
                         Param("stabilize", bool, True), _seed())),
        Option("hyperbolic", (Param("features", int, 128, lo=1, hi=MAX_WIDTH // 2), _seed())),
        Option("trig", (Param("features", int, 128, lo=1, hi=MAX_WIDTH // 2), Param("sigma", float, 1.0, gt=0),
                        _seed())),
    ), default="softmax", user_var="x"),
    FieldSpec("position", "positions", _options(
        Option("none"),
        Option("toeplitz", (Param("max_distance", int, lo=0, hi=1048576),
                            Param("init", str, "zeros", names=("zeros", "normal")))),
        Option("alibi", (Param("slope", float, None, gt=0, absent="the standard per-head slopes 2^(-8h/H)"),)),
        Option("t5", (Param("buckets", int, 32, lo=2, hi=4096), Param("max_distance", int, 128, lo=1, hi=1048576),
                      Param("init", str, "zeros", names=("zeros", "normal")))),
    ), default="none", user_var="r"),
    FieldSpec("apply", "apply modes", _options(Option("scores"), Option("values")), default="scores"),
    FieldSpec("sampling", "sampling methods", _options(
        Option("none"),
        Option("kde", (Param("buckets", int, 16, lo=2, hi=65536),
                       Param("block", int, 128, lo=1, hi=MAX_ROWS),
                       Param("samples", int, 128, lo=0, hi=MAX_ROWS), _seed(),
                       Param("heavy", int, None, lo=0, hi=MAX_ROWS, absent="samples / 2"),
                       Param("tail", str, "mean", names=("mean", "sampled")),
                       Param("residual", str, "columns", names=("values", "columns")))),
        Option("uniform", (Param("samples", int, 256, lo=1, hi=MAX_ROWS), _seed())),
    ), default="none"),
    FieldSpec("mask", "masks", _options(
        Option("none"), Option("causal"),
        Option("window", (Param("size", int, lo=0, hi=1048576),)),
        Option("causal_window", (Param("size", int, lo=0, hi=1048576),)),
    ), default="none"),
]}
SCALE = Param("scale", float, None, gt=0, absent="1/sqrt(head_dim)")
MAX_MAP_PARAMS = 4             # the params one kernel(x) = EXPR may read (its kernels' accumulators)
PARAM = Param("init", float)                     # `param NAME = INIT`: any float32 number
EPS = Param("eps", float, None, lo=0,
            absent="1e-6 with relu, trig or a user map, 0 with the strictly positive maps")
NUMBERS = {"scale": SCALE, "eps": EPS}          # the fields that take a plain number
FIELD_NAMES = (*FIELDS, *NUMBERS)
# the maps whose stabilizer rescales the normalizer by a data-dependent factor: a floor added to it
# would mean something different for every input, so they take no eps (they are strictly positive)
STABILIZED = {"favor": "favor(stabilize=true)", "hyperbolic": "hyperbolic", "exp_shift": "exp_shift"}


def check(blocks: tuple[WrittenBlock, ...], filename: str, source: str) -> SpecFile:
    """The checked `SpecFile`; raises `SpecError` at the first mistake."""
    if not blocks:
        raise SpecError(f"{filename} holds no attention block", Span(filename, 1, 1, 1, 2, source),
                        help="a spec file holds one or more `attention NAME { ... }` blocks")
    first: dict[str, Span] = {}
    out = []
    for b in blocks:
        if b.name in first:
            raise SpecError(f"duplicate attention block '{b.name}' (first defined at line "
                            f"{first[b.name].line})", b.name_span, help="give each block its own name")
        first[b.name] = b.name_span
        out.append(check_block(b))
    return SpecFile(filename, tuple(out), source)


def check_block(b: WrittenBlock) -> AttentionSpec:
    written: dict[str, WrittenField] = {}
    values: dict[str, Choice | float | None] = {}
    params = check_params([f for f in b.fields if f.declared])
    for f in b.fields:
        if f.declared:
            continue
        if f.name not in FIELD_NAMES:
            raise SpecError(f"unknown field '{f.name}'", f.name_span,
                            help=did_you_mean(f.name, FIELD_NAMES, "fields"))
        if f.name in written:
            raise SpecError(f"duplicate field '{f.name}' (first set at line {written[f.name].span.line})",
                            f.name_span, help=f"set each field once; remove one of the two '{f.name}' lines")
        written[f.name] = f
        values[f.name] = check_number(f) if f.name in NUMBERS else check_field(FIELDS[f.name], f, params)
    for name, fs in FIELDS.items():
        if name not in values:
            values[name] = Choice(fs.default, default_params(fs.options[fs.default]), span=b.span)
    spec = AttentionSpec(b.name, values["kernel"], values["position"], values["apply"],
                         values["sampling"], values["mask"], values.get("scale"), values.get("eps"),
                         tuple(params.values()), span=b.span,
                         field_spans=tuple((k, f.span) for k, f in written.items()))
    check_combination(spec)
    return spec


# --- one field ---------------------------------------------------------------------------------


def check_params(fields: list[WrittenField]) -> dict[str, Learnable]:
    """`param NAME = INIT` and `param NAME[heads] = INIT`: names unique and free, INIT a number."""
    out: dict[str, Learnable] = {}
    taken = {s.user_var: f"the variable of {s.name} maps" for s in FIELDS.values() if s.user_var}
    for f in fields:
        if f.name in out:
            raise SpecError(f"duplicate param '{f.name}' (first declared at line {out[f.name].span.line})",
                            f.name_span, help="declare each param once")
        if f.name in FUNCTIONS or f.name in taken:
            what = "a function" if f.name in FUNCTIONS else taken[f.name]
            raise SpecError(f"a param cannot be named '{f.name}': that is {what}", f.name_span,
                            help="choose another name, e.g. param a = 1.0")
        if f.shape not in (None, "heads"):
            raise SpecError(f"unknown param shape '[{f.shape}]'", f.shape_span,
                            help="a param is one number (param a = 1.0) or one per head (param c[heads] = 0.5)")
        init = float(convert(PARAM, f.value, f"param '{f.name}'"))
        out[f.name] = Learnable(f.name, f.shape == "heads", init, f.span)
    return out


def check_field(fs: FieldSpec, f: WrittenField, params: dict | None = None) -> Choice:
    if f.expr is not None:
        return check_user_map(fs, f, params or {})
    v = f.value
    if v.kind not in ("name", "call"):
        raise SpecError(f"{fs.name} must be a {fs.plural[:-1]} name, got {_short(v.text)}", v.span, help=f"valid {fs.plural}: {', '.join(fs.options)}{_user_map_hint(fs)}")
    option = fs.options.get(v.value)
    if option is None:
        raise SpecError(f"unknown {fs.plural[:-1]} '{v.value}'", v.name_span or v.span,
                        help=did_you_mean(v.value, fs.options, fs.plural) + _user_map_hint(fs))
    return Choice(option.name, bind(option, v), span=v.span)


def _user_map_hint(fs: FieldSpec) -> str:
    return f", or a user map {fs.name}({fs.user_var}) = EXPR" if fs.user_var else ""


def check_number(f: WrittenField) -> float:
    if f.expr is not None:
        example = {"scale": "0.125", "eps": "1e-6"}[f.name]
        raise SpecError(f"{f.name} is a number, not a map", f.name_span, help=f"write e.g. {f.name} = {example}")
    return float(convert(NUMBERS[f.name], f.value, f.name))


def default_params(option: Option) -> tuple[tuple[str, Value], ...]:
    return tuple((p.name, p.default) for p in option.params)


def bind(option: Option, v: WrittenValue) -> tuple[tuple[str, Value], ...]:
    """Arguments -> every parameter of `option`, in declaration order, defaults filled in."""
    params = {p.name: p for p in option.params}
    bound: dict[str, tuple[WrittenArg, Value]] = {}
    keyword_seen = False
    for i, a in enumerate(v.args):
        if a.keyword is None:
            if keyword_seen:
                raise SpecError("positional argument after a keyword argument", a.span,
                                help=f"write positional arguments first: {option.signature()}")
            if i >= len(option.params):
                takes = f"takes {len(option.params)}" if option.params else "takes no"
                raise SpecError(f"too many arguments: {option.name} {takes} argument"
                                f"{'' if len(option.params) == 1 else 's'}, got {len(v.args)}",
                                a.span, help=f"write {option.signature()}")
            p = option.params[i]
        else:
            keyword_seen = True
            p = params.get(a.keyword)
            if p is None:
                help = (did_you_mean(a.keyword, params, f"parameters of {option.name}") if params
                        else f"{option.name} takes no parameters")
                raise SpecError(f"unknown parameter '{a.keyword}' of {option.name}", a.keyword_span, help=help)
        if p.name in bound:
            first = bound[p.name][0].span
            raise SpecError(f"duplicate argument '{p.name}' of {option.name} (first given at column "
                            f"{first.column})", a.keyword_span or a.span, help=f"write {option.signature()}")
        bound[p.name] = (a, convert(p, a.value, f"'{p.name}' of {option.name}"))
    out = []
    for p in option.params:
        if p.name in bound:
            out.append((p.name, bound[p.name][1]))
        elif p.default is REQUIRED:
            raise SpecError(f"{option.name} needs '{p.name}'", v.span,
                            help=f"write {option.signature()}; {p.name}: {describe(p)}")
        else:
            out.append((p.name, p.default))
    return tuple(out)


def convert(p: Param, v: WrittenValue, what: str) -> Value:
    """A written value as parameter `p` wants it, checked for type, finiteness and range."""
    got = _short(v.text)
    if p.type is bool:
        if v.kind != "bool":
            raise SpecError(f"{what} must be true or false, got {got}", v.span, help=f"{p.name}: {describe(p)}")
        return v.value
    if p.type is str:
        if v.kind == "name" and v.value in p.names:
            return v.value
        help = did_you_mean(v.value, p.names, f"values of {p.name}") if v.kind == "name" else describe(p)
        raise SpecError(f"{what} must be one of {', '.join(p.names)}, got {got}", v.span, help=help)
    if v.kind != "number" or (p.type is int and not isinstance(v.value, int)):
        noun = "an integer" if p.type is int else "a number"
        raise SpecError(f"{what} must be {noun}, got {got}", v.span, help=f"{p.name}: {describe(p)}")
    x = v.value
    if p.type is float:
        x = float(x) if abs(x) <= 1e308 else math.inf
        if not math.isfinite(x):
            raise SpecError(f"{what} is not a finite number: {got}", v.span, help=f"{p.name}: {describe(p)}")
        if not _float32(x):
            raise SpecError(f"{what} is outside the float32 range: {got}", v.span,
                            help=f"{p.name}: {describe(p)}; {F32_RANGE}")
    if not _in_range(p, x):
        raise SpecError(f"{what} must be {_range(p)}, got {got}", v.span, help=f"{p.name}: {describe(p)}")
    if p.type is int and abs(x) > INT_MAX:
        raise SpecError(f"{what} is too large: {got}", v.span,
                        help=f"{p.name}: {describe(p)}, at most {INT_MAX}")
    return x


def _float32(x: float) -> bool:
    return x == 0 or F32_TINY <= abs(x) <= F32_MAX


def _in_range(p: Param, x: float) -> bool:
    return ((p.lo is None or x >= p.lo) and (p.hi is None or x <= p.hi)
            and (p.gt is None or x > p.gt))


def _range(p: Param) -> str:
    if p.lo is not None and p.hi is not None:
        return f"in [{p.lo}, {p.hi}]"
    if p.gt is not None and p.hi is not None:
        return f"in ({p.gt}, {p.hi}]"
    if p.gt is not None:
        return f"> {p.gt}"
    if p.lo is not None:
        return f">= {p.lo}"
    return "any value"


def describe(p: Param) -> str:
    """'an integer in [1, 65536], default 256' — what a parameter accepts."""
    if p.type is bool:
        kind = "true or false"
    elif p.type is str:
        kind = " or ".join(p.names)
    else:
        kind = ("an integer" if p.type is int else "a number") + (
            "" if _range(p) == "any value" else f" {_range(p)}")
    if p.default is REQUIRED:
        return f"{kind}, required"
    if p.default is None:
        return f"{kind}; leave it out for {p.absent}"
    return f"{kind}, default {_fmt(p.default)}"


def _fmt(value: Value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# --- user maps: kernel(x) = EXPR, position(r) = EXPR --------------------------------------------


def check_user_map(fs: FieldSpec, f: WrittenField, params: dict) -> Choice:
    if fs.user_var is None:
        maps = " and ".join(f"{s.name}({s.user_var}) = EXPR" for s in FIELDS.values() if s.user_var)
        raise SpecError(f"{fs.name} cannot be written as a map", f.name_span, help=f"only {maps} are maps")
    if f.param != fs.user_var:
        raise SpecError(f"the parameter of a {fs.name} map must be named '{fs.user_var}', not '{f.param}'",
                        f.param_span, help=f"write {fs.name}({fs.user_var}) = EXPR")
    check_expr(f.expr, fs, params)
    check_size(f.expr, fs)
    if fs.user_var == "r":
        check_finite_position(f.expr, {n: p.init for n, p in params.items()})
    read = sorted(uses(f.expr, set(params)))
    if fs.user_var == "x" and len(read) > MAX_MAP_PARAMS:
        raise SpecError(f"a kernel map reads at most {MAX_MAP_PARAMS} params; this one reads {len(read)} "
                        f"({', '.join(read)})", f.span,
                        help="combine some: a * b * x is c * x with one param c")
    return Choice("user", expr=f.expr, span=f.span)


def check_expr(e: Expr, fs: FieldSpec, params: dict | None = None) -> None:
    """Every number finite, every variable `fs.user_var` or a declared param, every call a known
    function of right arity."""
    var, params = fs.user_var, params or {}
    todo = [e]
    while todo:                     # pre-order, left to right: errors come in source order
        n = todo.pop()
        if isinstance(n, Num) and not _float32(n.value):
            big = not math.isfinite(n.value) or abs(n.value) > F32_MAX
            raise SpecError(f"number too {'large' if big else 'small'}", n.span,
                            help=F32_RANGE)
        if isinstance(n, Var) and n.name != var and n.name not in params:
            raise _bad_variable(n, fs, params)
        if isinstance(n, Call):
            if n.func not in FUNCTIONS:
                raise SpecError(f"unknown function '{n.func}'", n.span,
                                help=did_you_mean(n.func, FUNCTIONS, "functions"))
            arity = FUNCTIONS[n.func]
            if len(n.args) != arity:
                raise SpecError(f"{n.func} takes {arity} argument{'s' if arity > 1 else ''}, "
                                f"got {len(n.args)}", n.span,
                                help=f"write {n.func}({', '.join('abc'[:arity])})")
        todo.extend(reversed(children(n)))


def check_size(e: Expr, fs: FieldSpec) -> None:
    """A map (with its derivative, for kernels) expands to at most MAX_EXPANDED operations and makes
    at most MAX_CALLS transcendental calls: what bounds the compile time (attndsl.expr.plan)."""
    from .expr import diff, plan
    plans = [plan(e)] + ([plan(diff(e, "x"))] if fs.user_var == "x" else [])
    size, calls = sum(p.expanded for p in plans), sum(p.calls for p in plans)
    what = "and its derivative" if fs.user_var == "x" else ""
    most = MAX_EXPANDED if fs.user_var == "x" else MAX_EXPANDED_POSITION
    if size > most:
        raise SpecError(f"this {fs.name} map is too large to compile: it {what + ' ' if what else ''}"
                        f"expand{'' if what else 's'} to {size:,} operations, more than {most:,}",
                        e.span,
                        help="the kernels write out every repeated subexpression, so each level of a "
                             "nested elu, softplus, min, max or small power (x ** 2) multiplies the "
                             "size (elu nests at most 6 deep in a kernel map, 4 in a position); "
                             "nest fewer calls")
    if calls > MAX_CALLS:
        raise SpecError(f"this {fs.name} map is too large to compile: it {what + ' ' if what else ''}"
                        f"make{'' if what else 's'} {calls} calls of exp, log, sin, cos, tanh, sigmoid, "
                        f"softplus, elu or ** (non-integer powers), more than {MAX_CALLS}", e.span,
                        help=f"at most {MAX_CALLS} such calls{' counting the derivative' if what else ''} "
                             f"(a product of n sines has n in the map and 2n in its derivative); "
                             f"use fewer terms")


def check_finite_position(e: Expr, params: dict[str, float] | None = None) -> None:
    """position(r) = EXPR is finite at every integer |r| <= POSITION_REACH, in float64 and float32
    (with the params at their initial values)."""
    import torch

    from .expr import evaluate
    r = torch.arange(-POSITION_REACH, POSITION_REACH + 1, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        env = {n: torch.tensor(v, dtype=dtype) for n, v in (params or {}).items()}
        bad = ~torch.isfinite(evaluate(e, r.to(dtype), env))
        if bad.any():
            at = sorted(r[bad].tolist(), key=lambda x: (abs(x), x < 0))[0]     # the one nearest 0
            culprit, value = _first_non_finite(e, torch.tensor([at], dtype=dtype), env)
            where = "" if dtype == torch.float64 else " in float32"
            raise SpecError(f"position(r) is not finite at r = {int(at)}: the underlined part is "
                            f"{value}{where}",
                            culprit.span,
                            help=f"a position term must be finite at every relative distance r = i - j "
                                 f"with |r| <= {POSITION_REACH} (sequences up to {POSITION_REACH + 1} "
                                 f"tokens) in float32 and float64: keep log and sqrt arguments positive "
                                 f"and divisors away from 0, e.g. log(1 + abs(r)), 1 / (1 + abs(r))")


def _first_non_finite(e: Expr, r0, env: dict | None = None) -> tuple[Expr, str]:
    """The innermost subexpression that is not finite at r0 (a 1-element tensor) although its
    operands are, and its value (`env`: the params' values)."""
    from .expr import evaluate
    n = e
    while True:
        for c in children(n):
            if not bool(evaluate(c, r0, env).isfinite().all()):
                n = c
                break
        else:
            v = float(evaluate(n, r0, env).reshape(-1)[0])
            return n, "NaN" if math.isnan(v) else f"{v}"




def _bad_variable(n: Var, fs: FieldSpec, params: dict | None = None) -> SpecError:
    var, what = fs.user_var, f"a {fs.name} map"
    if n.name in FUNCTIONS:
        return SpecError(f"'{n.name}' is a function, not a variable", n.span, help=f"call it: {n.name}({var})")
    others = {s.user_var: s.name for s in FIELDS.values() if s.user_var and s.user_var != var}
    if n.name in others:
        return SpecError(f"'{n.name}' is not defined in {what}; its variable is '{var}'", n.span,
                         help=f"'{n.name}' is the variable of {others[n.name]} maps; in {fs.name}({var}) = EXPR "
                              f"use '{var}'")
    declared = f"; declared params: {', '.join(params)}" if params else ""
    return SpecError(f"unknown variable '{n.name}' in {what}", n.span,
                     help=f"{fs.name}({var}) = EXPR reads '{var}' and the block's params{declared} "
                          f"(declare one with `param {n.name} = 1.0`, or `param {n.name}[heads] = 1.0` per head)")


# --- cross-field rules -------------------------------------------------------------------------


def check_combination(spec: AttentionSpec) -> None:
    sampling, kernel = spec.sampling.name, spec.kernel.name
    if spec.position.name == "t5":
        buckets, reach = int(spec.position["buckets"]), int(spec.position["max_distance"])
        side = buckets if spec.causal else buckets // 2      # without a mask, half for the later keys
        if side < 2:
            raise SpecError(f"t5 without a causal mask needs buckets >= 4 (half for the keys after the query), "
                            f"got {buckets}", spec.span_of("position"), help="T5 uses t5(buckets=32, max_distance=128)")
        if reach <= side // 2:
            raise SpecError(f"t5(buckets={buckets}, max_distance={reach}): max_distance must exceed {side // 2}, "
                            f"the distances with a bucket each", spec.span_of("position"),
                            help="T5 uses t5(buckets=32, max_distance=128)")
    if sampling != "none" and kernel != "softmax":
        shown = "a user map" if kernel == "user" else kernel
        raise SpecError(f"sampling = {sampling} needs kernel = softmax, but the kernel is {shown}",
                        spec.span_of("sampling"),
                        help="KDE and uniform sampling estimate exact softmax attention; "
                             "remove `sampling` or set kernel = softmax")
    if sampling == "kde" and spec.causal:
        raise SpecError("sampling = kde cannot be combined with mask = causal", spec.span_of("sampling"),
                        help="the KDEformer estimator samples keys from the whole sequence and is "
                             "non-causal; use sampling = uniform or remove the causal mask")
    if sampling != "none" and spec.position.name != "none":
        raise SpecError(f"sampling = {sampling} cannot be combined with a position term",
                        spec.span_of("sampling"),
                        help="the sampled estimators sort and sample keys without their positions; "
                             "remove `position` or `sampling` (exact softmax takes any position term)")
    if sampling == "kde":
        buckets = spec.sampling["buckets"]
        if buckets & (buckets - 1):
            raise SpecError(f"kde buckets must be a power of two, got {buckets}", spec.span_of("sampling"),
                            help=f"the buckets are the sign patterns of log2(buckets) hyperplanes; "
                                 f"try {1 << (buckets.bit_length() - 1)} or {1 << buckets.bit_length()}")
        heavy, samples = spec.sampling["heavy"], spec.sampling["samples"]
        if heavy is not None and heavy > samples:
            raise SpecError(f"kde heavy={heavy} is more than its samples={samples}", spec.span_of("sampling"),
                            help="the heavy keys are the part of the samples taken exactly; "
                                 f"use heavy ≤ {samples} (default samples / 2), or more samples")
    if spec.window is not None:
        check_window(spec)
    for p in spec.params:
        if not uses(spec.position.expr, {p.name}) and p.name not in spec.map_params:
            raise SpecError(f"param '{p.name}' is declared but not used", p.span,
                            help=f"params are read by position(r) = EXPR, e.g. position(r) = -{p.name} * abs(r), "
                                 f"and kernel(x) = EXPR, e.g. kernel(x) = elu({p.name} * x) + 1; "
                                 f"use it there or remove it")
    check_eps(spec)
    if spec.apply.name == "values" and spec.position.name == "none":
        raise SpecError("apply = values needs a position term: there is nothing to apply",
                        spec.span_of("apply"),
                        help="set position = toeplitz(max_distance=...), alibi or position(r) = EXPR, "
                             "or remove `apply`")


def check_window(spec: AttentionSpec) -> None:
    """A sliding window is a relative-position weight that is 0 beyond ±size: the forms that weigh
    keys by distance take it, the sampled ones and a position term on the values do not."""
    mask = spec.mask.name
    if spec.sampling.name != "none":
        raise SpecError(f"sampling = {spec.sampling.name} cannot be combined with mask = {mask}",
                        spec.span_of("mask"),
                        help="the sampled estimators sample keys from the whole sequence; an exact "
                             "softmax with the window computes only the keys inside it: remove `sampling`")
    if spec.apply.name == "values":
        raise SpecError(f"apply = values cannot be combined with mask = {mask}", spec.span_of("apply"),
                        help="the FFT form of a position term on the values spans every distance; keep "
                             "the window with apply = scores, or use mask = causal / none")


def check_eps(spec: AttentionSpec) -> None:
    """eps floors a feature map's normalizer; softmax's is ≥ 1 and a stabilized map's is rescaled."""
    if not spec.eps:
        return
    kernel = spec.kernel
    if kernel.name == "softmax":
        raise SpecError("eps applies to feature-map kernels; softmax takes none", spec.span_of("eps"),
                        help="softmax's normalizer is at least 1 once its row maximum is subtracted, "
                             "so it never vanishes; remove `eps`")
    if spec.stabilized:
        raise SpecError(f"eps cannot be combined with {STABILIZED[kernel.name]}", spec.span_of("eps"),
                        help="its stabilizer rescales every normalizer by a factor that depends on the "
                             "inputs, so a floor would too; the map is strictly positive and needs none: "
                             "remove `eps`" + (", or write favor(stabilize=false)" if kernel.name == "favor"
                                               else ""))

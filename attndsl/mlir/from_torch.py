"""PyTorch attention -> a spec: `attndsl.from_torch(fn_or_module, (q, k, v))`.

The function is exported by torch-mlir's fx importer (torch dialect) and interpreted op by op on
the example inputs: every value gets its number (torch.ops.aten on the op's operands) and the set
of inputs it depends on. Values that depend on no input (masks, position buckets, embedding
lookups) are constants of the example length; what depends on q, k, v is matched against

    softmax:  softmax(s·φq·φkᵀ + B, masked) v,  φ(x) = c·x      -> kernel = softmax, scale = s·c_q·c_k
                                                                    B = c_h − s_h·|i − j| -> position = alibi
                                                                    other Toeplitz B -> position = toeplitz(W)
                                                                    mask = triu -> mask = causal
    linear:   contractions of φ(q), φ(k) and v (a cumsum: causal) -> kernel = NAME or kernel(x) = EXPR

where φ is read off the elementwise ops between an input and its first non-elementwise use. The
candidate spec is then run through attndsl's reference on fresh random inputs, of the example length
and of twice it, and must reproduce the function's output at both (a table read at the example length
that is still changing there is wrong beyond it); anything else is a `FromTorchError` naming the op it
could not place, or what did not match.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

import torch

from ..ast import Binary, Call, Expr, Num, Var
from ..expr import BUILTIN_MAPS, evaluate, to_text
from ..expr import _add, _div, _mul, _neg, _sub      # the derivative's simplifiers: 1·x -> x, x + 0 -> x


class FromTorchError(ValueError):
    """The function is not (recognisably) an attention the DSL can express."""


RECOGNISED = ("softmax(s·q·kᵀ + bias) v with an optional causal mask and a relative-position "
              "bias (a Toeplitz table), or linear attention φ(q)(φ(k)ᵀv) with elementwise φ")

# --- the interpreter -------------------------------------------------------------------------------

SCALAR_TYPES = {0: torch.uint8, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.int64,
                5: torch.float16, 6: torch.float32, 7: torch.float64, 11: torch.bool, 15: torch.bfloat16}
MEMORY_FORMATS = {0: torch.contiguous_format, 1: torch.preserve_format, 2: torch.channels_last}
ELEMENT_TYPES = {"f32": torch.float32, "f64": torch.float64, "f16": torch.float16, "bf16": torch.bfloat16,
                 "si64": torch.int64, "si32": torch.int32, "i1": torch.bool, "ui8": torch.uint8, "si8": torch.int8}


@dataclass
class Value:
    """An SSA value as interpreted: its number on the example inputs and the inputs it depends on."""
    number: object
    deps: frozenset
    op: "Op | None" = None         # the defining op (None for arguments)


@dataclass(frozen=True)
class Op:
    """A torch-dialect op as the matcher sees it; values are named by keys, not MLIR handles."""
    name: str
    operands: tuple
    results: tuple
    location: str


def _resources(text: str) -> dict[str, bytes]:
    """The dense_resource blobs of a printed module (parameters and buffers): name -> bytes."""
    out = {}
    for name, hexdata in re.findall(r"(torch_tensor_[\w.]+):\s*\"0x([0-9A-Fa-f]+)\"", text):
        out[name] = bytes.fromhex(hexdata)[4:]          # the first 4 bytes are the alignment
    return out


def _literal(attr, resources: dict[str, bytes]) -> torch.Tensor:
    text = str(attr)
    shape_m = re.search(r"tensor<((?:\d+x)*)(\w+)>", text)
    shape = [int(d) for d in shape_m[1].split("x") if d]
    dtype = ELEMENT_TYPES[shape_m[2]]
    if text.startswith("dense_resource"):
        name = re.match(r"dense_resource<([\w.]+)>", text)[1]
        return torch.frombuffer(bytearray(resources[name]), dtype=dtype).reshape(shape).clone()
    import numpy as np
    return torch.from_numpy(np.array(attr).copy()).to(dtype).reshape(shape)


def _aten(name: str):
    """torch.aten.add.Tensor -> torch.ops.aten.add.Tensor; torch.aten.bmm -> ...bmm.default."""
    parts = name.split(".")
    ns, base = getattr(torch.ops, parts[1]), parts[2]
    packet = getattr(ns, base)
    return getattr(packet, parts[3] if len(parts) > 3 else "default")


def _call(op_fn, args: list):
    """op_fn on the operands in schema order: keyword-only ones by name, enum-typed ones
    (ScalarType, MemoryFormat, Layout, Device) decoded from their MLIR integers and strings."""
    positional, named = [], {}
    for a, schema_arg in zip(args, op_fn._schema.arguments):
        ty = str(schema_arg.type)
        if isinstance(a, int) and not isinstance(a, bool) and "ScalarType" in ty:
            a = SCALAR_TYPES[a]
        elif isinstance(a, int) and not isinstance(a, bool) and "MemoryFormat" in ty:
            a = MEMORY_FORMATS[a]
        elif isinstance(a, int) and not isinstance(a, bool) and "Layout" in ty:
            a = torch.strided
        elif isinstance(a, str) and "Device" in ty:
            a = torch.device(a)
        if schema_arg.kwarg_only:
            named[schema_arg.name] = a
        else:
            positional.append(a)
    return op_fn(*positional, **named)


def interpret(fn, example_inputs) -> tuple[list[Op], dict]:
    """Export `fn` with torch-mlir and evaluate it op by op: (ops in order, {key: Value})."""
    from torch_mlir import fx, ir
    module = fn if isinstance(fn, torch.nn.Module) else _Wrap(fn)
    with warnings.catch_warnings():                  # torch.export's own deprecation notices
        warnings.simplefilter("ignore", FutureWarning)
        exported = fx.export_and_import(module.eval(), *example_inputs, output_type="torch")
    resources = _resources(str(exported))
    block = exported.body.operations[0].regions[0].blocks[0]
    index: dict = {}

    def key(v):
        v = v.maybe_downcast()
        if isinstance(v, ir.BlockArgument):
            return ("arg", v.arg_number)
        return (index[v.owner], v.result_number)

    values: dict = {("arg", i): Value(x, frozenset(name)) for i, (name, x) in enumerate(zip("qkv", example_inputs))}
    ops = []
    for i, mop in enumerate(block.operations):
        name = mop.name
        if name == "func.return":
            break
        index[mop.operation] = i
        op = Op(name, tuple(key(o) for o in mop.operands), tuple((i, r) for r in range(len(mop.results))),
                str(mop.location))
        operands = [values[o] for o in op.operands]
        deps = frozenset().union(*(v.deps for v in operands)) if operands else frozenset()
        if name in ("torch.constant.int", "torch.constant.float", "torch.constant.bool", "torch.constant.str"):
            number = mop.attributes["value"].value
        elif name == "torch.constant.device":
            number = str(mop.attributes["value"]).strip('"')
        elif name == "torch.constant.none":
            number = None
        elif name == "torch.prim.ListConstruct":
            number = [v.number for v in operands]
        elif name == "torch.vtensor.literal":
            number = _literal(mop.attributes["value"], resources)
        elif name.startswith(("torch.aten.", "torch.prims.")):
            try:
                number = _call(_aten(name), [v.number for v in operands])
            except Exception as e:                   # noqa: BLE001 (any failure of the op itself)
                raise FromTorchError(f"could not evaluate {name}{_where(op)} on the example inputs: "
                                     f"{str(e).splitlines()[0]}") from None
        else:
            raise FromTorchError(f"unrecognised op {name}{_where(op)}; attndsl.from_torch reads "
                                 f"torch-dialect aten ops")
        numbers = [number] if len(op.results) == 1 else list(number)
        for r, x in zip(op.results, numbers):
            values[r] = Value(x, deps, op)
        ops.append(op)
    return ops, values


class _Wrap(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, q, k, v):
        return self.fn(q, k, v)


# --- elementwise maps as expressions ---------------------------------------------------------------

def _num(x) -> Num | None:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return Num(float(x))
    if isinstance(x, torch.Tensor) and x.numel() == 1 and x.dtype != torch.bool:
        return Num(float(x.reshape(())))
    return None


UNARY = {"exp": "exp", "log": "log", "abs": "abs", "sqrt": "sqrt", "relu": "relu", "sigmoid": "sigmoid",
         "tanh": "tanh", "sin": "sin", "cos": "cos"}
STRUCTURAL = {"view", "reshape", "permute", "transpose", "unsqueeze", "squeeze", "expand", "clone",
              "contiguous", "to", "_to_copy", "type_as", "detach", "alias", "_unsafe_view", "t",
              "broadcast_to", "expand_as"}
SOFTMAX = {"exp", "_softmax", "softmax", "_safe_softmax"}
CONTRACTIONS = {"bmm", "matmul", "mm", "einsum", "mul", "sum", "div", "cumsum", "add", "sub", "max", "amax",
                "masked_fill", "where", "rsub", "reciprocal", *SOFTMAX,
                "eq", "ne", "isinf", "all", "any", "logical_not"}    # _safe_softmax's fully-masked-row guard


def _base(op) -> str:
    return op.name.split(".")[2]


def elementwise_expr(op, operands: list[Value], arg_exprs: list) -> Expr | None:
    """The expression of an elementwise op whose symbolic operands have expressions `arg_exprs`
    (None for constants), or None when the op is not an elementwise map."""
    base, parts = _base(op), op.name.split(".")
    over = parts[3] if len(parts) > 3 else ""
    e = [a if a is not None else _num(v.number) for a, v in zip(arg_exprs, operands)]
    if base in UNARY and len(e) == 1:
        return Call(UNARY[base], (e[0],))
    if base == "log1p":
        return Call("log", (_add(Num(1.0), e[0]),))
    if base in ("maximum", "minimum") and None not in e[:2]:
        return Call("max" if base == "maximum" else "min", (e[0], e[1]))
    if base == "elu" and [float(o.number) for o in operands[1:4]] == [1.0, 1.0, 1.0]:
        return Call("elu", (e[0],))
    if base == "softplus" and float(operands[1].number) == 1.0:
        return Call("softplus", (e[0],))
    if base == "neg":
        return _neg(e[0])
    if base in ("add", "sub") and None not in e[:2]:          # a ± alpha·b
        alpha = _num(operands[2].number) if len(operands) > 2 else Num(1.0)
        return (_add if base == "add" else _sub)(e[0], _mul(alpha, e[1]))
    if base == "rsub" and None not in e[:2]:                  # b − alpha·a
        return _sub(e[1], _mul(_num(operands[2].number), e[0]))
    if base == "mul" and None not in e[:2]:
        return _mul(e[0], e[1])
    if base == "div" and over in ("Scalar", "Tensor") and None not in e[:2]:
        return _div(e[0], e[1])
    if base == "pow" and None not in e[:2]:
        return Binary("**", e[0], e[1])
    return None


def same_map(a: Expr, b: Expr) -> bool:
    x = torch.linspace(-4, 4, 161, dtype=torch.float64)
    return torch.allclose(evaluate(a, x), evaluate(b, x), rtol=1e-9, atol=1e-12, equal_nan=True)


def kernel_field(e: Expr) -> str:
    for name, builtin in BUILTIN_MAPS.items():
        if same_map(e, builtin):
            return f"kernel = {name}"
    return f"kernel(x) = {to_text(e)}"


def linear_factor(e: Expr) -> float | None:
    """c when EXPR(x) = c·x."""
    x = torch.linspace(-4, 4, 161, dtype=torch.float64)
    c = float(evaluate(e, torch.ones(1, dtype=torch.float64)))
    return c if torch.allclose(evaluate(e, x), c * x, rtol=1e-9, atol=1e-12) else None


def elementwise_values(ops, values) -> dict:
    """{key: Expr} for every value that is an elementwise map of one input (the input: x)."""
    exprs = {x: Var("x") for x, val in values.items() if val.op is None and val.deps}
    for op in ops:
        if not op.results:
            continue
        res = op.results[0]
        if len(values[res].deps) != 1 or any(values[o].deps and o not in exprs for o in op.operands):
            continue
        e = elementwise_expr(op, [values[o] for o in op.operands], [exprs.get(o) for o in op.operands])
        if e is not None:
            exprs[res] = e
    return exprs


def feature_maps(ops, values, exprs) -> dict:
    """{input: φ}: the map whose value a non-elementwise op reads (the raw input when none is)."""
    phi: dict = {}
    for op in ops:
        for o in op.operands:
            if o in exprs and op.results and op.results[0] not in exprs:
                (inp,) = values[o].deps
                if inp in phi and not same_map(phi[inp], exprs[o]):
                    raise FromTorchError(f"{inp} is read through two different maps ({to_text(phi[inp])} "
                                         f"and {to_text(exprs[o])}); a spec has one kernel(x)")
                phi.setdefault(inp, exprs[o])
    return phi


# --- the match -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Imported:
    """What from_torch found: the spec text, and the learned position table (H, 2W+1) it needs."""
    text: str
    heads: int
    head_dim: int
    value_dim: int
    position_table: torch.Tensor | None = None

    def __str__(self) -> str:
        return self.text

    def compile(self, **kwargs):
        """attndsl.compile of the spec, with the table loaded."""
        from .. import compile
        attn = compile(self.text, heads=self.heads, head_dim=self.head_dim, value_dim=self.value_dim, **kwargs)
        if self.position_table is not None:
            with torch.no_grad():
                attn.position_table.copy_(self.position_table)
        return attn


def from_torch(fn, example_inputs, *, name: str = "imported") -> Imported:
    """An attention implementation fn(q, k, v) (or an nn.Module), q, k (B, H, N, Dk), v (B, H, N, Dv),
    as an attndsl spec. Constants (masks, biases) are read at the example length N: export at an N
    longer than the model's largest relative distance to see where its table is clipped (the spec is
    checked at 2N, and refused where it does not match there)."""
    q, k, v = example_inputs
    ops, values = interpret(fn, example_inputs)
    exprs = elementwise_values(ops, values)
    for op in ops:                                     # every op on the inputs must have a place
        res = op.results[0] if op.results else None
        if res is not None and values[res].deps and res not in exprs and _base(op) not in STRUCTURAL | CONTRACTIONS:
            raise FromTorchError(f"unrecognised op {op.name}{_where(op)} on the attention inputs; "
                                 f"from_torch recognises {RECOGNISED}")
    phi = feature_maps(ops, values, exprs)
    first_exp = next((i for i, op in enumerate(ops)
                      if _base(op) in SOFTMAX and {"q", "k"} <= values[op.operands[0]].deps), None)
    softmax = first_exp is not None
    eps = _added_epsilon(ops[first_exp + 1:] if softmax else ops, ops, values, exprs, softmax)
    heads, dk, dv = q.shape[1], q.shape[3], v.shape[3]
    table = None
    if softmax:
        spec_lines, table = _softmax_fields(ops, values, phi, q, k)
    else:
        spec_lines = [*_linear_fields(ops, values, phi), f"eps = {eps:g}"]   # written even when 0: fn's floor
    text = f"attention {name} {{\n" + "".join(f"    {ln}\n" for ln in spec_lines) + "}\n"
    imported = Imported(text, heads, dk, dv, table)
    _verify(fn, imported, example_inputs)
    return imported


def _where(op: Op) -> str:
    """' at FILE:LINE' of the user's source, when the exporter recorded one outside attndsl."""
    m = re.match(r'loc\("([^"]+)":(\d+)', op.location)
    return f" at {m[1]}:{m[2]}" if m and "/attndsl/" not in m[1] else ""


def _phi(phi: dict, inp: str) -> Expr:
    e = phi.get(inp)
    if e is None:
        raise FromTorchError(f"could not read the map applied to {inp}; from_torch recognises {RECOGNISED}")
    return e


def _added_epsilon(candidates, ops, values, exprs, softmax: bool) -> float:
    """The epsilon of linear attention's normalizer, `num / (den + 1e-6)`: the spec's eps (0 when
    fn has none). Any other nonzero scalar added to (or subtracted from) a value of the inputs that is
    neither a feature map of one input (φ: `elu(x) + 1`) nor a score before the softmax (where it
    cancels) is refused: the spec would drop it (softmax takes no eps: its normalizer is ≥ 1)."""
    users: dict = {}
    for op in ops:
        for i, o in enumerate(op.operands):
            users.setdefault(o, []).append((op, i))

    def divisor(key, seen=0) -> bool:                # read, through layout ops, as a divisor
        for op, i in users.get(key, ()):
            base = _base(op)
            if (base == "div" and i == 1) or base == "reciprocal":
                return True
            if base in STRUCTURAL and op.results and seen < 32 and divisor(op.results[0], seen + 1):
                return True
        return False

    found: dict[float, Op] = {}
    for op in candidates:
        if _base(op) not in ("add", "sub", "rsub") or not op.results or op.results[0] in exprs:
            continue
        operands = [values[o] for o in op.operands[:2]]
        if len(operands) < 2 or sum(bool(v.deps) for v in operands) != 1:
            continue
        const = next(v for v in operands if not v.deps)
        c = _num(const.number)
        if c is None or c.value == 0.0:
            continue
        if divisor(op.results[0]):
            if softmax:
                raise FromTorchError(
                    f"fn adds the constant {c.value:g} to the softmax's normalizer ({op.name}{_where(op)}): "
                    f"a spec's softmax takes no eps (its normalizer is at least 1), so the imported spec "
                    f"would drop it and change every output by about that much, relatively. Import fn "
                    f"without the epsilon, or keep it in PyTorch")
            if _base(op) != "add" or c.value < 0:
                raise FromTorchError(
                    f"fn subtracts {abs(c.value):g} from the normalizer φ(q)·Σφ(k) ({op.name}{_where(op)}); "
                    f"a spec's eps is a floor added to it (eps ≥ 0)")
            found[c.value] = op
            continue
        raise FromTorchError(
            f"fn adds the constant {c.value:g} to a value of the attention inputs ({op.name}{_where(op)}) "
            f"outside the feature maps and the score bias; from_torch recognises {RECOGNISED}")
    if len(found) > 1:
        where = ", ".join(f"{c:g} ({op.name}{_where(op)})" for c, op in found.items())
        raise FromTorchError(f"fn adds different constants to the normalizer: {where}; a spec has one eps")
    return next(iter(found), 0.0)


def _linear_fields(ops, values, phi) -> list[str]:
    fq, fk = _phi(phi, "q"), _phi(phi, "k")
    if not same_map(fq, fk):
        raise FromTorchError(f"q and k go through different maps ({to_text(fq)} vs {to_text(fk)}); "
                             f"a spec has one kernel(x)")
    causal = any(_base(op) == "cumsum" for op in ops if op.results and values[op.results[0]].deps)
    return [kernel_field(fq), "scale = 1", *(["mask = causal"] if causal else [])]


def _softmax_fields(ops, values, phi, q, k):
    """kernel, scale, position, mask of softmax(L) v. Constants added to the scores before the first
    exp (or softmax) are the bias B, masked_fill / where / −inf entries the mask; the scale s is fit
    from L = s·q·kᵀ + B − (a constant per row), the row constants of a decomposed softmax cancel."""
    if linear_factor(_phi(phi, "q")) is None or linear_factor(_phi(phi, "k")) is None:
        raise FromTorchError("softmax over scores of mapped q, k: only s·q·kᵀ (q, k scaled, not mapped) "
                             "is softmax attention")
    heads, n = q.shape[1], q.shape[2]
    bias, masked, logits = torch.zeros(heads, n, n, dtype=torch.float64), None, None
    for op in ops:                                   # the logits' path: up to the first exp / softmax
        res = values[op.results[0]] if op.results else None
        if res is None or not {"q", "k"} <= res.deps:
            continue
        base, operands = _base(op), [values[o] for o in op.operands]
        if base in SOFTMAX:
            logits = operands[0].number
            break
        const = [o for o in operands[:2] if not o.deps and isinstance(o.number, torch.Tensor) and o.number.numel() > 1]
        if base in ("add", "sub") and const and not all(o.deps for o in operands[:2]):
            alpha = float(operands[2].number) if len(operands) > 2 else 1.0
            bias = bias + _per_head(const[0].number.double() * alpha * (1.0 if base == "add" else -1.0),
                                    res.number, heads, n)
        elif base == "masked_fill":
            m = _per_head(operands[1].number.double(), res.number, heads, n) > 0
            masked = m if masked is None else masked | m
        elif base == "where" and not operands[0].deps:
            cond = _per_head(operands[0].number.double(), res.number, heads, n) > 0
            m = ~cond if operands[1].deps else cond       # the constant side is the fill
            masked = m if masked is None else masked | m
    neg = bias < -1e4                                    # an additive −inf (or −1e9) mask
    masked = neg if masked is None else masked | neg
    causal = bool(masked.any())
    if causal and not torch.equal(masked, torch.ones(n, n, dtype=torch.bool).triu(1).expand(heads, n, n)):
        raise FromTorchError("the scores are masked, but not causally (j > i); a spec's mask is none or causal")
    bias = torch.where(neg, torch.zeros_like(bias), bias)
    scale = _fit_scale(logits, bias, masked, q, k)
    lines = ["kernel = softmax", f"scale = {scale:.7g}"]         # fit in float32: 7 digits
    table = None
    if bias.abs().max() > 0:
        b = _relative(bias, causal)
        position = _linear_in_distance(b, causal)
        if position is None:
            table, w = _clip(b)
            position = f"position = toeplitz(max_distance={w})"
        lines.append(position)
    if causal:
        lines.append("mask = causal")
    return lines, table


def _fit_scale(logits, bias, masked, q, k) -> float:
    """s in L − B = s·q·kᵀ − c_i (least squares over the unmasked entries, per row centred)."""
    qk = (q.double() @ k.double().transpose(-1, -2))
    lhs = logits.double().reshape(qk.shape) - bias
    keep = ~masked.expand_as(qk)
    def centred(x):
        x = torch.where(keep, x, torch.zeros_like(x))
        return torch.where(keep, x - x.sum(-1, keepdim=True) / keep.sum(-1, keepdim=True), torch.zeros_like(x))
    a, b = centred(qk), centred(lhs)
    return float((a * b).sum() / (a * a).sum())


def _per_head(term: torch.Tensor, like: torch.Tensor, heads: int, n: int) -> torch.Tensor:
    """A constant broadcast to the scores it is added to, as (H, N, N) (the same for every batch)."""
    t = torch.broadcast_to(term, like.shape).reshape(-1, heads, n, n)
    if not torch.equal(t, t[:1].expand_as(t)):
        raise FromTorchError("the score bias differs between batch entries; a spec's bias is per head")
    return t[0].double()


def _relative(bias: torch.Tensor, causal: bool) -> torch.Tensor:
    """b_h(r), r = −(N−1)..N−1, of a bias (H, N, N) that is Toeplitz, as (H, 2N−1) (float64)."""
    heads, n, _ = bias.shape
    i = torch.arange(n)
    r = i[:, None] - i[None, :]
    b = torch.stack([torch.stack([bias[h, max(d, 0), max(-d, 0)] for d in range(-(n - 1), n)]) for h in range(heads)])
    rebuilt = b[:, r + n - 1]
    keep = r >= 0 if causal else torch.ones(n, n, dtype=torch.bool)
    if not torch.allclose(rebuilt[:, keep], bias[:, keep], rtol=1e-6, atol=1e-6 * float(bias.abs().max())):
        raise FromTorchError("the score bias is not a function of i − j (Toeplitz); a spec's position "
                             "term is relative")
    if causal:
        b[:, : n - 1] = b[:, n - 1: n]                  # r < 0 is masked: any value; take b(0)
    return b


def _linear_in_distance(b: torch.Tensor, causal: bool) -> str | None:
    """The position field of a bias b_h(r) = c_h − s_h·|r| (c_h cancels in the softmax): `alibi` for
    the ALiBi paper's slopes 2^(−8h/H), `alibi(slope=s)` for one slope s > 0 on every head,
    `position(r) = s·abs(r)` for one growing slope; None when b is not linear in |r|. Per-head slopes
    of any other kind are refused: no field says them, and a table would be clipped at the export
    length (wrong beyond it)."""
    from ..reference import alibi_slopes
    heads, n = b.shape[0], (b.shape[1] + 1) // 2
    r = torch.arange(-(n - 1), n, dtype=torch.float64)
    keep = r >= 0 if causal else torch.ones_like(r, dtype=torch.bool)
    if n < 3:                                        # two distances: any table is "linear"
        return None
    a, y = r[keep].abs(), b[:, keep]
    design = torch.stack([torch.ones_like(a), -a], 1)
    c, s = torch.linalg.lstsq(design, y.T).solution  # (H,) each
    fit = c[:, None] - s[:, None] * a
    if not torch.allclose(fit, y, rtol=0, atol=1e-5 * max(float(y.abs().max()), 1e-30)):
        return None
    if float(s.abs().max()) <= 1e-6 * float(y.abs().max()) / n:
        return None                                  # constant per head: a table of width 0
    if torch.allclose(s, s.mean().expand_as(s), rtol=1e-5, atol=0):
        s0 = float(s.mean())
        return f"position = alibi(slope={s0:.7g})" if s0 > 0 else f"position(r) = {-s0:.7g} * abs(r)"
    if torch.allclose(s, alibi_slopes(heads), rtol=1e-5, atol=0):
        return "position = alibi"
    raise FromTorchError(
        f"the score bias is −s_h·|i − j| with per-head slopes s = [{', '.join(f'{x:.4g}' for x in s.tolist())}], "
        f"neither one slope for every head (position = alibi(slope=s)) nor the ALiBi slopes 2^(−8h/H) "
        f"of {heads} heads (position = alibi); a spec has no field for other per-head slopes, and a "
        f"toeplitz table read at the export length would be clipped there (wrong at longer lengths)")


def _clip(b: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A relative bias (H, 2N−1) as a table (H, 2W+1) clipped at the smallest W beyond which it is
    constant on each side."""
    n = (b.shape[1] + 1) // 2
    w = n - 1
    while w > 0 and torch.equal(b[:, n - 1 + w], b[:, n - 2 + w]) and torch.equal(b[:, n - 1 - w], b[:, n - w]):
        w -= 1
    return b[:, n - 1 - w: n + w].float(), w


TOLERANCE = 1e-4          # max |spec − fn| / max |fn| on fresh inputs (fn runs in the example dtype)


def _verify(fn, imported: Imported, example_inputs) -> None:
    """The spec's meaning must reproduce fn on fresh inputs of the example shapes, and at twice
    the example length: the constants were read at the example length, the spec claims every length."""
    n = example_inputs[0].shape[2]
    err = _mismatch(fn, imported, example_inputs, n)
    if err > TOLERANCE:
        raise FromTorchError(f"read fn as\n{imported.text}but that spec does not reproduce fn on fresh "
                             f"inputs ({_error_text(err)}); from_torch recognises {RECOGNISED}")
    longer = 2 * n
    err = _mismatch(fn, imported, example_inputs, longer)
    if err <= TOLERANCE:
        return
    table = imported.position_table
    if table is not None:
        w = (table.shape[1] - 1) // 2
        seen = (f"is still changing at distance {n - 1}, the largest the export shows" if w == n - 1 else
                f"is constant from distance {w} to {n - 1}, the largest the export shows, but changes "
                f"again beyond it")
        why = (f"the position bias read at N={n} {seen}: the export length is too short to see where the "
               f"table is clipped, and toeplitz(max_distance={w}) is wrong at longer lengths. Export at a "
               f"length past the model's largest distinct relative distance (where its bias stops changing)")
    else:
        why = (f"fn depends on the sequence length in a way the export at N={n} does not show (its masks "
               f"and biases are read at the example length)")
    raise FromTorchError(f"read fn as\n{imported.text}which reproduces fn at the export length N={n} but not "
                         f"at N={longer} ({_error_text(err)}): {why}")


def _mismatch(fn, imported: Imported, example_inputs, n: int) -> float:
    """max |spec − fn| / max |fn| at length n on fresh random inputs (inf where one is non-finite and
    the other is not, or differently so)."""
    from .. import parse
    from ..reference import reference
    spec = parse(imported.text).block()
    g = torch.Generator().manual_seed(1234 + n)
    batch = example_inputs[0].shape[0] if n == example_inputs[0].shape[2] else 1    # longer: N² memory
    fresh = [torch.randn((batch, x.shape[1], n, *x.shape[3:]), generator=g, dtype=torch.float64)
             for x in example_inputs]
    with torch.no_grad():
        try:
            want = fn(*[x.to(example_inputs[0].dtype) for x in fresh]).double()
        except Exception as e:                       # noqa: BLE001 (fn itself fails at this length)
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise FromTorchError(f"fn does not run at N={n} ({first}); from_torch checks the spec at twice "
                                 f"the example length, so export at most at half the longest length fn "
                                 f"runs at") from None
        got = reference(spec, *fresh, position_table=None if imported.position_table is None
                        else imported.position_table.double())
    if got.shape != want.shape:
        return math.inf
    finite = torch.isfinite(want)
    if not torch.equal(finite, torch.isfinite(got)) or not torch.equal(
            want[~finite].nan_to_num(), got[~finite].nan_to_num()):
        return math.inf
    if not finite.any():
        return 0.0
    return float((got - want)[finite].abs().max() / want[finite].abs().max().clamp_min(1e-300))


def _error_text(err: float) -> str:
    return ("non-finite where fn is finite, or the other way" if not math.isfinite(err)
            else f"max error {err:.1e} of fn's largest output")

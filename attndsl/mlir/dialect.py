"""The `attn` dialect: one op per IR node type, declared in IRDL and loaded into torch-mlir's
MLIR bindings (`irdl.load_dialects`).

The IRDL text is generated from the node dataclasses in `attndsl.ir`, so every node type has its
op: Node fields are operands, the width of a (BH, N, width) node is its result type
`tensor<?x?xWxf32>` (N×N nodes are `tensor<?x?x?xf32>`), the other fields are attributes.

    irdl.operation @feature_map {
      %x = irdl.base "!builtin.tensor"
      ...
      irdl.operands(x: %x)
      irdl.attributes {"kernel" = %kernel, "role" = %role, "prescale" = %prescale}
      irdl.results(out: %out)
    }

A `Choice` is `#attn.choice<"favor", {features = 64 : i64, ...}>` or, for a user map,
`#attn.user_map<"(-0.5 * abs(r))">`. IRDL has no optional attributes: the fields that may be
None (`form`, `phi`, a fused map's `prescale`) are left out when None and checked by
`attndsl.mlir.parse` when present.
"""
from __future__ import annotations

import functools
import typing
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields

from torch_mlir import ir
from torch_mlir.dialects import irdl

from ..ast import Choice
from ..ir import FeatureMap, Input, Node, _snake

NODE_TYPES: tuple[type[Node], ...] = tuple(Node.__subclasses__())
OPS: dict[str, type[Node]] = {f"attn.{_snake(c.__name__)}": c for c in NODE_TYPES}

FROM_TYPE = ("dim", "width")          # Input.dim, FeatureMap.width: the result type's last dimension
ONE_OF = {                            # string attributes with a closed set of values (as verify.py)
    (Input, "name"): ("q", "k", "v"),
    (FeatureMap, "role"): ("q", "k"),
}


def one_of(cls: type[Node], name: str) -> tuple[str, ...] | None:
    """The values a string field may take: a fixed set, or the planner's forms for the node type."""
    if name == "form":
        from ..lowering.registry import FORMS
        return tuple(f.name for f in FORMS.values() if cls in f.sites())
    return ONE_OF.get((cls, name))


@dataclass(frozen=True)
class Field:
    """A node field as the dialect sees it: where it goes ("operand", "attribute" or "type")."""
    name: str
    kind: type                        # Node, Choice, str, float, bool or int
    optional: bool                    # may be None
    where: str


@functools.cache
def fields(cls: type[Node]) -> tuple[Field, ...]:
    """Every field of a node type but its span, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclass_fields(cls):
        if f.name == "span":
            continue
        args = typing.get_args(hints[f.name])
        kind = next((a for a in args if a is not type(None)), hints[f.name]) if args else hints[f.name]
        where = "operand" if kind is Node else "type" if f.name in FROM_TYPE else "attribute"
        out.append(Field(f.name, kind, type(None) in args, where))
    return tuple(out)


# IRDL constraint definitions by kind, for a field named {f}. IRDL binds a constraint value to one
# type or attribute per op, so each field has its own (shapes agree: attndsl.verify, when read back).
CONSTRAINTS = {
    Node: ['%{f} = irdl.base "!builtin.tensor"'],
    str: ['%{f} = irdl.base "#builtin.string"'],
    float: ['%{f} = irdl.base "#builtin.float"'],
    bool: ["%{f}_true = irdl.is true", "%{f}_false = irdl.is false", "%{f} = irdl.any_of(%{f}_true, %{f}_false)"],
    Choice: ["%{f}_named = irdl.base @attn::@choice", "%{f}_user = irdl.base @attn::@user_map",
             "%{f} = irdl.any_of(%{f}_named, %{f}_user)"],
}
KIND_TEXT = {str: "a string", float: "a float (f64)", bool: "true or false",
             Choice: '#attn.choice<"name", {params}> or #attn.user_map<"expr">'}

ATTRIBUTES = """\
  irdl.attribute @choice {
    %string = irdl.base "#builtin.string"
    %dict = irdl.base "#builtin.dictionary"
    irdl.parameters(name: %string, params: %dict)
  }
  irdl.attribute @user_map {
    %string = irdl.base "#builtin.string"
    irdl.parameters(expr: %string)
  }"""


def _constraint(cls: type[Node], f: Field) -> list[str]:
    values = one_of(cls, f.name)
    if not values:
        return [line.format(f=f.name) for line in CONSTRAINTS[f.kind]]
    names = [f"%{f.name}_{v}" for v in values]
    return [*(f'{n} = irdl.is "{v}"' for n, v in zip(names, values)),
            f"%{f.name} = irdl.any_of({', '.join(names)})"]


def _operation(op: str, cls: type[Node]) -> str:
    lines, operands, attributes = [], [], []
    for f in fields(cls):
        if f.where == "operand":
            operands.append(f"{f.name}: {'optional ' if f.optional else ''}%{f.name}")
        elif f.where == "attribute" and not f.optional:
            attributes.append(f'"{f.name}" = %{f.name}')
        else:
            continue
        lines += _constraint(cls, f)
    lines.append(CONSTRAINTS[Node][0].format(f="out"))
    if operands:
        lines.append(f"irdl.operands({', '.join(operands)})")
    if attributes:
        lines.append(f"irdl.attributes {{{', '.join(attributes)}}}")
    lines.append("irdl.results(out: %out)")
    body = "\n".join(f"    {line}" for line in lines)
    return f"  irdl.operation @{op} {{\n{body}\n  }}"


@functools.cache
def irdl_text() -> str:
    """The IRDL module declaring the dialect."""
    ops = [_operation(name.removeprefix("attn."), cls) for name, cls in OPS.items()]
    return "irdl.dialect @attn {\n" + "\n".join([ATTRIBUTES, *ops]) + "\n}\n"


def signature(op: str) -> str:
    """`attn.feature_map(x) {kernel: ..., role: "q" | "k", prescale: a float (f64)}`, for messages."""
    cls = OPS[op]
    fs = fields(cls)
    operands = ", ".join(f.name + ("?" if f.optional else "") for f in fs if f.where == "operand")
    attrs = []
    for f in fs:
        if f.where == "attribute":
            values = one_of(cls, f.name)
            kind = " | ".join(f'"{v}"' for v in values) if values else KIND_TEXT[f.kind]
            attrs.append(f"{f.name}{'?' if f.optional else ''}: {kind}")
    return f"{op}({operands}){' {' + ', '.join(attrs) + '}' if attrs else ''}"


@functools.cache
def _loaded() -> tuple[ir.Context, ir.Module]:
    ctx = ir.Context()
    with ctx, ir.Location.unknown():
        definitions = ir.Module.parse(irdl_text())
        irdl.load_dialects(definitions)
    return ctx, definitions                # the definitions live as long as the context


def context() -> ir.Context:
    """The MLIR context (one per process) in which the attn dialect is loaded."""
    return _loaded()[0]

"""IR -> the attn dialect: a `func.func` per attention block, one op per node, children first.

    func.func @linear_elu() -> tensor<?x?x64xf32> {
      %0 = "attn.input"() {name = "q"} : () -> tensor<?x?x64xf32>
      ...
      %3 = "attn.linear_attention"(%0, %1, %2) {causal = false, form = "linear", ...}
             : (tensor<?x?x64xf32>, tensor<?x?x64xf32>, tensor<?x?x64xf32>) -> tensor<?x?x64xf32>
      return %3 : tensor<?x?x64xf32>
    }
"""
from __future__ import annotations

from typing import Mapping

from torch_mlir import ir
from torch_mlir.dialects import func

from ..ast import Choice, Value
from ..expr import to_text
from ..ir import Node, postorder
from . import dialect


ELEMENTS = {"f32": ir.F32Type.get, "f64": ir.F64Type.get}


def tensor_type(shape: tuple, element: str = "f32") -> ir.RankedTensorType:
    """(BH, N, 64) -> tensor<?x?x64xf32>; symbolic dimensions are dynamic."""
    dims = [d if isinstance(d, int) else ir.ShapedType.get_dynamic_size() for d in shape]
    return ir.RankedTensorType.get(dims, ELEMENTS[element](), loc=ir.Location.unknown())


SCALARS = {
    bool: ir.BoolAttr.get,
    int: lambda v: ir.IntegerAttr.get(ir.IntegerType.get_signless(64), v),
    float: ir.FloatAttr.get_f64,
    str: ir.StringAttr.get,
}


def scalar(v: Value | None) -> ir.Attribute:
    """A parameter value: bool -> true, int -> i64, float -> f64, str -> "…", None -> unit."""
    return ir.UnitAttr.get() if v is None else SCALARS[type(v)](v)


def choice(c: Choice) -> ir.Attribute:
    """#attn.choice<"favor", {features = 64 : i64, ...}> or #attn.user_map<"(-0.5 * abs(r))">; a
    tabulated term #attn.choice<"tabulated", {max_distance = ..., expr = "(...)"}>."""
    if c.expr is not None and c.name == "tabulated":        # ast.tabulated: its EXPR as a parameter
        params = ir.DictAttr.get({**{k: scalar(v) for k, v in c.params}, "expr": scalar(to_text(c.expr))})
        return ir.DynamicAttr.get("attn.choice", [ir.StringAttr.get(c.name), params])
    if c.expr is not None:
        if (c.name, c.params) != ("user", ()):
            raise ValueError(f"a user map is Choice('user', expr=...), not {c!r}")
        return ir.DynamicAttr.get("attn.user_map", [ir.StringAttr.get(to_text(c.expr))])
    params = ir.DictAttr.get({k: scalar(v) for k, v in c.params})
    return ir.DynamicAttr.get("attn.choice", [ir.StringAttr.get(c.name), params])


def _op(n: Node, values: dict[Node, ir.Value], element: str) -> ir.Operation:
    operands, attributes = [], {}
    for f in dialect.fields(type(n)):
        v = getattr(n, f.name)
        if v is None or f.where == "type":
            continue
        if f.where == "operand":
            operands.append(values[v])
        else:
            attributes[f.name] = choice(v) if f.kind is Choice else SCALARS[f.kind](f.kind(v))
    return ir.Operation.create(f"attn.{n.op}", results=[tensor_type(n.shape, element)], operands=operands,
                               attributes=attributes)


def to_module(roots: Mapping[str, Node], element: str = "f32") -> ir.Module:
    """{block name: IR root} -> a verified module with one function per block (tensors of
    `element`, f32 or f64)."""
    with dialect.context(), ir.Location.unknown():
        module = ir.Module.create()
        with ir.InsertionPoint(module.body):
            for name, root in roots.items():
                f = func.FuncOp(name, ir.FunctionType.get([], [tensor_type(root.shape, element)]))
                with ir.InsertionPoint(f.add_entry_block()):
                    values: dict[Node, ir.Value] = {}
                    for n in postorder(root):
                        values[n] = _op(n, values, element).result
                    func.ReturnOp([values[root]])
        module.operation.verify()
    return module


def to_mlir(roots: Mapping[str, Node]) -> str:
    """The module's text: it parses and verifies with the attn dialect loaded."""
    return str(to_module(roots))

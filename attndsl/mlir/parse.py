"""The attn dialect -> IR, the inverse of `attndsl.mlir.emit`: from_mlir(to_mlir(roots)) == roots.

torch-mlir parses and verifies the module against the IRDL declarations; this module then checks
what IRDL cannot say (optional attributes, a choice's parameters, a user map's expression, shapes)
and rebuilds each function's tree, verified by `attndsl.verify`. Every mistake is an
`MLIRFormatError` that points at the op in the text.
"""
from __future__ import annotations

import re

from torch_mlir import ir

from ..ast import FUNCTIONS, Choice, Span, Var, children
from ..check import FIELDS, Option, Param, check_expr
from ..diagnostics import SpecError, did_you_mean, render
from ..ir import Node
from ..verify import CHECKS, IRVerificationError, verify
from . import dialect
from .emit import tensor_type

# the spec field whose choices an IR field holds (the order of their parameters, a map's variable)
SPEC_FIELD = {"kernel": "kernel", "phi": "kernel", "position": "position", "sampling": "sampling"}
ATTRIBUTE_TYPES = {str: ir.StringAttr, float: ir.FloatAttr, bool: ir.BoolAttr}
PARAMETER_TYPES = (ir.BoolAttr, ir.IntegerAttr, ir.FloatAttr, ir.StringAttr, ir.UnitAttr)
# the position kinds only the planner writes (ast.windowed, ast.tabulated), which no spec names
PLANNED_POSITIONS = {
    "window": Option("window", (Param("max_distance", int), Param("size", int), Param("within", str))),
    "tabulated": Option("tabulated", (Param("max_distance", int), Param("expr", str))),
}


class MLIRFormatError(ValueError):
    """A module that is not attn IR. `str(err)` is located, rustc-style, when the text is known."""

    def __init__(self, message: str, span: Span | None = None, help: str | None = None):
        self.message, self.span, self.help = message, span, help
        super().__init__(render(message, span, help))


def from_mlir(text: str, filename: str = "<mlir>") -> dict[str, Node]:
    """Parse and verify `text` with the attn dialect loaded; {function name: IR root}."""
    with dialect.context():
        try:
            module = ir.Module.parse(text)
        except ir.MLIRError as e:
            raise _Reader(text, filename).parse_error(e) from None
        return _Reader(text, filename).module(module)


def from_module(module: ir.Module) -> dict[str, Node]:
    """The IR of every function in a module built or parsed in `dialect.context()`."""
    return _Reader("", "<module>").module(module)


class _Reader:
    def __init__(self, source: str, filename: str):
        self.source, self.filename = source, filename

    def span(self, loc: ir.Location) -> Span | None:
        """The span of the token at `loc("-":LINE:COL)` in the source, if the text is known."""
        m = re.match(r'loc\("(?:[^"\\]|\\.)*":(\d+):(\d+)', str(loc))
        lines = self.source.splitlines()
        if not m or not 0 < int(m[1]) <= len(lines):
            return None
        line, col = int(m[1]), int(m[2])
        token = re.match(r'"[^"]*"|[^\s(){},]+', lines[line - 1][col - 1:])
        return Span(self.filename, line, col, line, col + (len(token.group()) if token else 1), self.source)

    def error(self, op: ir.Operation, message: str, help: str | None = None) -> MLIRFormatError:
        span = self.span(op.location)
        where = "" if span else f" (in {op.name})"
        return MLIRFormatError(message + where, span or Span(self.filename, 0, 0, 0, 0), help)

    def parse_error(self, e: ir.MLIRError) -> MLIRFormatError:
        """torch-mlir's first diagnostic, located; the op's signature as help for an attn op."""
        diag = e.error_diagnostics[0] if e.error_diagnostics else None
        if diag is None:
            return MLIRFormatError(str(e))
        span = self.span(diag.location)
        name = re.match(r'"(attn\.\w+)"', span.line_text()[span.column - 1:]) if span else None
        help = None
        if name and name[1] in dialect.OPS:
            help = f"expected {dialect.signature(name[1])}"
        elif name:
            help = did_you_mean(name[1], dialect.OPS, "attn ops")
        return MLIRFormatError(diag.message, span, help)

    def module(self, module: ir.Module) -> dict[str, Node]:
        roots = {}
        with module.context:
            for op in module.body.operations:
                op = op.operation
                if op.name != "func.func":
                    raise self.error(op, f"expected a func.func per attention block, not {op.name}")
                roots[ir.StringAttr(op.attributes["sym_name"]).value] = self.function(op)
        return roots

    def function(self, f: ir.Operation) -> Node:
        values: dict[ir.Value, Node] = {}
        for op in f.regions[0].blocks[0].operations:
            op = op.operation
            if op.name == "func.return":
                if len(op.operands) != 1 or op.operands[0] not in values:
                    raise self.error(op, "a function returns the one value of an attn op")
                try:
                    return verify(values[op.operands[0]])
                except IRVerificationError as e:
                    raise self.error(f, f"not well-formed IR: {str(e).splitlines()[0]}") from None
            values[op.result] = self.node(op, values)
        raise self.error(f, "the function has no return")

    def node(self, op: ir.Operation, values: dict[ir.Value, Node]) -> Node:
        cls = dialect.OPS.get(op.name)
        if cls is None:
            raise self.error(op, f"{op.name} is not an attn op", help=did_you_mean(op.name, dialect.OPS, "ops"))
        help = f"expected {dialect.signature(op.name)}"
        operands, kwargs = list(op.operands), {}
        fields = dialect.fields(cls)
        unknown = set(op.attributes) - {f.name for f in fields if f.where == "attribute"}
        if unknown:
            raise self.error(op, f"unknown attribute '{sorted(unknown)[0]}' of {op.name}", help)
        for f in fields:
            if f.where == "operand" and operands:
                value = operands.pop(0)
                if value not in values:
                    raise self.error(op, f"operand '{f.name}' of {op.name} is not the result of an attn op")
                kwargs[f.name] = values[value]
            elif f.where == "type":
                kwargs[f.name] = self.width(op, help)
            elif f.where == "attribute" and f.name in op.attributes:
                kwargs[f.name] = self.attribute(op, f, op.attributes[f.name], help)
            elif f.optional:
                kwargs[f.name] = None
            else:
                raise self.error(op, f"{op.name} needs '{f.name}'", help)
        if operands:
            raise self.error(op, f"{op.name} takes {sum(f.where == 'operand' for f in fields)} operands", help)
        node = cls(**kwargs)
        if not CHECKS[cls](node):
            shapes = ", ".join(f"{f.name}: {tensor_type(kwargs[f.name].shape)}" for f in fields
                               if f.where == "operand" and kwargs[f.name] is not None)
            raise self.error(op, f"ill-formed {op.name} (attndsl.verify): {shapes}", help)
        if tensor_type(node.shape) != op.result.type:
            raise self.error(op, f"{op.name} on these operands returns {tensor_type(node.shape)}, "
                                 f"not {op.result.type}", help)
        return node

    def width(self, op: ir.Operation, help: str) -> int:
        """The static last dimension of a (BH, N, width) result."""
        t = op.result.type.maybe_downcast()
        if not isinstance(t, ir.RankedTensorType) or t.rank != 3 or t.is_dynamic_dim(2):
            raise self.error(op, f"{op.name} returns tensor<?x?xWIDTHxf32>, not {t}", help)
        return t.shape[2]

    def attribute(self, op: ir.Operation, f: dialect.Field, attr: ir.Attribute, help: str):
        if f.kind is Choice:
            return self.choice(op, f, attr)
        attr = attr.maybe_downcast()
        if not isinstance(attr, ATTRIBUTE_TYPES[f.kind]):
            raise self.error(op, f"'{f.name}' of {op.name} must be {dialect.KIND_TEXT[f.kind]}, not {attr}", help)
        values = dialect.one_of(dialect.OPS[op.name], f.name)
        if values and attr.value not in values:
            raise self.error(op, f"'{f.name}' of {op.name} is {attr}", did_you_mean(attr.value, values, "values"))
        return attr.value

    def choice(self, op: ir.Operation, f: dialect.Field, attr: ir.Attribute) -> Choice:
        field = FIELDS[SPEC_FIELD[f.name]]
        d = ir.DynamicAttr(attr)                     # IRDL checked: #attn.choice or #attn.user_map
        if d.attr_name == "attn.user_map":
            return Choice("user", expr=self.user_map(op, field, ir.StringAttr(d.params[0]).value))
        name, params = ir.StringAttr(d.params[0]).value, ir.DictAttr(d.params[1])
        option = field.options.get(name) or (PLANNED_POSITIONS.get(name) if field.name == "position" else None)
        if option is None:
            raise self.error(op, f"unknown {field.name} '{name}'", did_you_mean(name, field.options, field.plural))
        declared = {p.name: p for p in option.params}      # the order of Choice.params
        given = {}
        for a in params:
            value, p = a.attr.maybe_downcast(), declared.get(a.name)
            if p is None:
                raise self.error(op, f"unknown parameter '{a.name}' of {name}",
                                 did_you_mean(a.name, declared, f"parameters of {name}"))
            if not isinstance(value, PARAMETER_TYPES):
                raise self.error(op, f"'{a.name}' of {name} is {value}: a parameter is a bool, i64, f64, "
                                     f"string or unit (None)")
            given[a.name] = None if isinstance(value, ir.UnitAttr) else value.value
            if type(given[a.name]) is not p.type and not (given[a.name] is None and p.default is None):
                raise self.error(op, f"'{a.name}' of {name} must be {p.type.__name__}, not {value}")
        if name == "tabulated":
            return Choice(name, (("max_distance", given["max_distance"]),),
                          expr=self.tabulated(op, field, given["expr"]))
        return Choice(name, tuple((k, given[k]) for k in declared if k in given))

    def tabulated(self, op: ir.Operation, field, text: str):
        """EXPR of a tabulated position term (ast.tabulated): r and the spec's params, whose names
        the text alone gives (each free name is a param); functions and arities checked."""
        from ..parse import expression
        try:
            e = expression(text, field.name, field.user_var)
            names, todo = set(), [e]
            while todo:
                n = todo.pop()
                if isinstance(n, Var) and n.name != field.user_var and n.name not in FUNCTIONS:
                    names.add(n.name)
                todo.extend(children(n))
            check_expr(e, field, dict.fromkeys(names))
        except SpecError as err:
            raise self.error(op, f"not a tabulated {field.name} term: {text!r} ({err.message})", err.help) from None
        return e

    def user_map(self, op: ir.Operation, field, text: str):
        from .. import parse
        try:
            spec = parse(f"attention m {{ {field.name}({field.user_var}) = {text} }}").block()
        except SpecError as e:
            raise self.error(op, f"not a {field.name} map: {text!r} ({e.message})", e.help) from None
        return getattr(spec, field.name).expr


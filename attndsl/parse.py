"""Spec text -> AST: Lark (LALR) parse tree -> the spec as written -> `check` -> `SpecFile`.

Every failure is a `SpecError` pointing at the source: undecodable bytes, stray characters,
unbalanced brackets, syntax errors (explained from the tokens the parser would have accepted),
absurd nesting, then the semantic checks of `attndsl.check`.
"""
from __future__ import annotations

from dataclasses import dataclass

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from ._grammar_path import grammar_path
from .ast import (Binary, Call, Expr, Num, SpecFile, Span, Unary, Var, WrittenArg, WrittenBlock,
                  WrittenField, WrittenValue)
from .check import FIELD_NAMES, check
from .diagnostics import SpecError

MAX_PARENS = 100    # nested '(' in one place
MAX_DEPTH = 200     # levels of the parse tree (a long chain of + or - also counts)
MAX_BYTES = 1 << 20  # a spec is a few blocks of a few lines: anything longer is the wrong file

_PARSER = Lark(grammar_path().read_text(encoding="utf-8"), parser="lalr", lexer="basic",
               propagate_positions=True, maybe_placeholders=True)


def parse(text: str | bytes, filename: str = "<spec>") -> SpecFile:
    """Parse and check a spec file; raises `SpecError` (a ValueError) at the first mistake."""
    source = _decode(text, filename)
    try:
        tree = _syntax_tree(source, filename)
        _check_depth(tree, filename, source)
        blocks = _Builder(filename, source).blocks(tree)
    except RecursionError:   # a backstop: the limits above keep every tree shallow
        raise SpecError(f"{filename} is nested too deeply to read", None,
                        help=f"keep expressions under {MAX_PARENS} levels of parentheses") from None
    return check(blocks, filename, source)


def expression(text: str, field: str = "position", var: str = "r") -> Expr:
    """EXPR of `field(var) = text`, parsed but not checked: every other name stays a variable
    (the MLIR reader's tabulated terms, whose names are params; it checks what it needs)."""
    source = f"attention m {{ {field}({var}) = {text} }}"
    tree = _syntax_tree(source, "<expression>")
    _check_depth(tree, "<expression>", source)
    return _Builder("<expression>", source).blocks(tree)[0].fields[0].expr


def too_large(size: int, filename: str) -> SpecError:
    """The error for a spec of `size` bytes (or characters) beyond MAX_BYTES."""
    shown = f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
    return SpecError(f"{filename} is {shown}: a spec is at most 1 MiB", Span(filename, 0, 0, 0, 0),
                     help="a spec holds `attention NAME { ... }` blocks of a few lines each; "
                          "is this the right file?")


def _decode(text: str | bytes, filename: str) -> str:
    if isinstance(text, (str, bytes, bytearray, memoryview)) and len(text) > MAX_BYTES:
        raise too_large(len(text), filename)
    if isinstance(text, (bytes, bytearray, memoryview)):
        data = bytes(text)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            before = data[:e.start].decode("utf-8", "replace")
            line, col = before.count("\n") + 1, len(before) - before.rfind("\n")
            span = Span(filename, line, col, line, col + 1, data.decode("utf-8", "replace"))
            raise SpecError(f"{filename} is not UTF-8 text: byte 0x{data[e.start]:02x} cannot be decoded",
                            span, help="a spec is a UTF-8 text file; save it as UTF-8") from None
    if not isinstance(text, str):
        raise TypeError(f"parse() takes the spec text as str or bytes, not {type(text).__name__}")
    return text.removeprefix("\ufeff")


# --- syntax -------------------------------------------------------------------------------------


@dataclass
class _Opener:
    token: Token
    label: str       # "attention perf" for '{', the callee for '('


def _syntax_tree(source: str, filename: str) -> Tree:
    """Feed tokens to the LALR parser ourselves, to check brackets and drop newlines inside ( )."""
    ip = _PARSER.parse_interactive()
    opened: list[_Opener] = []
    fed: list[Token] = []
    try:
        for tok in _PARSER.lex(source):
            if tok.type == "_NL" and opened and opened[-1].token.type == "LPAR":
                continue                                   # argument lists may wrap
            if tok.type in ("RPAR", "RBRACE"):
                _close(tok, opened, filename, source)
            ip.feed_token(tok)
            if tok.type == "LBRACE":
                name = next((t for t in reversed(fed) if t.type == "NAME"), "?")
                opened.append(_Opener(tok, f"attention {name}"))
            elif tok.type == "LPAR":
                if sum(o.token.type == "LPAR" for o in opened) >= MAX_PARENS:
                    raise SpecError(f"parentheses nested more than {MAX_PARENS} deep",
                                    _token_span(tok, filename, source),
                                    help="simplify the expression")
                opened.append(_Opener(tok, str(fed[-1]) if fed and fed[-1].type == "NAME" else ""))
            fed.append(tok)
        return ip.feed_eof(_last_visible(fed))
    except UnexpectedCharacters as e:
        raise _bad_character(e, filename, source) from None
    except UnexpectedToken as e:
        e.interactive_parser = ip
        raise _SyntaxExplainer(e, fed, opened, filename, source).error() from None
    except UnexpectedInput as e:   # other Lark errors: still located, never a Lark traceback
        line, col = e.line if e.line > 0 else 1, e.column if e.column > 0 else 1
        raise SpecError("syntax error", Span(filename, line, col, line, col + 1, source)) from None


def _close(tok: Token, opened: list[_Opener], filename: str, source: str) -> None:
    want = "LPAR" if tok.type == "RPAR" else "LBRACE"
    span = _token_span(tok, filename, source)
    if opened and opened[-1].token.type == want:
        opened.pop()
        return
    if opened and opened[-1].token.type == "LPAR":
        o = opened[-1].token
        raise SpecError(f"expected ')' to close the '(' opened at line {o.line}, column {o.column}, "
                        f"found '{tok}'", span, help="close every '(' before the end of the field")
    raise SpecError(f"unmatched '{tok}'", span,
                    help=f"there is no open '{'(' if tok == ')' else '{'}' for it to close")


def _last_visible(fed: list[Token]) -> Token | None:
    return next((t for t in reversed(fed) if t.type != "_NL"), None)


def _token_span(tok: Token, filename: str, source: str) -> Span:
    end_line, end_col = (tok.end_line, tok.end_column) if tok.type != "_NL" else (tok.line, tok.column + 1)
    return Span(filename, tok.line, tok.column, end_line, end_col, source)


def _bad_character(e: UnexpectedCharacters, filename: str, source: str) -> SpecError:
    span = Span(filename, e.line, e.column, e.line, e.column + 1, source)
    if e.char in "\"'":
        return SpecError(f"unexpected quote {e.char!r}", span,
                         help="the language has no strings; write names bare, e.g. init=normal")
    return SpecError(f"unexpected character {e.char!r}", span,
                     help="a spec holds names, numbers, = ( ) { } [ ] , ; + - * / ** and # comments")


# What the parser was waiting for, told from the terminals it would have accepted: the first
# row whose terminals are all accepted (exactly so, where `exact`) and whose `after` matches wins.
@dataclass(frozen=True)
class _Situation:
    needs: frozenset[str]
    expected: str
    help: str = ""
    exact: bool = False
    after: str | None = None     # type of the previous token
    lacks: str | None = None     # a terminal that must not be accepted


def _row(needs: str, expected: str, help: str = "", **kw) -> _Situation:
    return _Situation(frozenset(needs.split()), expected, help, **kw)


FIELDS_HELP = (f"a block holds fields ({', '.join(FIELD_NAMES)}) and `param NAME = VALUE` lines, one per "
               f"line or separated by ';'")
VALUE_HELP = "a value is a name (causal), a call (favor(features=256)), a number or true/false"
EXPR_HELP = ("an expression uses numbers, the map's variable, + - * / **, parentheses and the "
             "functions exp, log, abs, sqrt, relu, elu, sigmoid, tanh, softplus, sin, cos, min, max")
SITUATIONS = [
    _row("ATTENTION", "'attention NAME { ... }'",
         "a spec file holds `attention NAME { ... }` blocks and # comments only"),
    _row("NAME", "a block name after 'attention'", "write `attention my_variant { ... }`",
         exact=True, after="ATTENTION"),
    _row("NAME", "the map's variable name", "write kernel(x) = EXPR or position(r) = EXPR",
         exact=True, after="LPAR"),
    _row("LBRACE", "'{' after '{block}'", "a block is written `attention NAME { ... }`"),
    _row("NAME RBRACE", "a field name or '}'", FIELDS_HELP, lacks="EQUAL"),
    _row("EQUAL LPAR", "'=' after '{prev}'", "write `{prev} = VALUE`", exact=True),
    _row("EQUAL", "'=' after the map's header", "write kernel(x) = EXPR or position(r) = EXPR",
         exact=True),
    _row("RPAR", "')': a map has exactly one variable", "write kernel(x) = EXPR or position(r) = EXPR",
         exact=True),
    _row("TRUE NUMBER NAME", "a value after '{prev}'", VALUE_HELP),
    _row("NUMBER", "a number after '-'", VALUE_HELP, exact=True),
    _row("NUMBER NAME LPAR MINUS", "an expression after '{prev}'", EXPR_HELP),
    _row("STAR RPAR", "an operator, ',' or ')'", "the '(' at {open_at} is still open"),
    _row("STAR", "an operator (+ - * / **) or the end of the field",
         "multiply with '*', as in 2 * x; put each field on its own line or separate fields with ';'"),
    _row("COMMA RPAR", "',' or ')' in the arguments of '{callee}'",
         "the '(' at {open_at} is still open; write arguments as favor(256, seed=0)"),
    _row("RBRACE _NL", "a newline or ';' after the value of '{field}'", FIELDS_HELP),
]


class _SyntaxExplainer:
    """An `UnexpectedToken` -> a SpecError saying, in words, what was expected."""

    def __init__(self, e: UnexpectedToken, fed: list[Token], opened: list[_Opener], filename: str,
                 source: str):
        self.e, self.fed, self.opened = e, fed, opened
        self.filename, self.source = filename, source
        self.accepts = set(e.accepts or e.expected)

    def error(self) -> SpecError:
        tok = self.e.token
        found = {"$END": "the end of the file", "_NL": "the end of the line"}.get(tok.type, f"'{tok}'")
        span = self._span(tok)
        o = self.opened[-1] if self.opened else None
        closer = {"LPAR": "RPAR", "LBRACE": "RBRACE"}.get(o.token.type) if o else None
        if o and closer in self.accepts and tok.type in ("$END", "ATTENTION"):
            if closer == "RBRACE":
                msg = f"expected '}}' to close '{o.label}' opened at line {o.token.line}"
            else:
                msg = f"expected ')' to close the '(' opened at line {o.token.line}, column {o.token.column}"
            return SpecError(f"{msg}, found {found}", span, help="every '{' and '(' needs its closing pair")
        for s in SITUATIONS:
            if self._matches(s):
                ctx = self._context()
                return SpecError(f"expected {_fill(s.expected, ctx)}, found {found}", span,
                                 help=_fill(s.help, ctx) or None)
        words = ", ".join(sorted(_describe(t) for t in self.accepts))
        return SpecError(f"unexpected {found}", span, help=f"expected one of: {words}")

    def _matches(self, s: _Situation) -> bool:
        prev = self.fed[-1].type if self.fed else None
        return (s.needs <= self.accepts and (not s.exact or s.needs == self.accepts)
                and (s.after is None or s.after == prev)
                and (s.lacks is None or s.lacks not in self.accepts))

    def _context(self) -> dict[str, str]:
        fed = self.fed
        shown = [t for t in fed if t.type != "_NL"]
        prev = str(shown[-1]) if shown else ""
        if len(shown) > 1 and shown[-1].type == "EQUAL":
            prev = self.source[shown[-2].start_pos:shown[-1].end_pos]   # 'kernel =' or 'seed='
        block = next((f"attention {fed[i + 1]}" for i in range(len(fed) - 2, -1, -1)
                      if fed[i].type == "ATTENTION" and fed[i + 1].type == "NAME"), "attention")
        field = next((str(fed[i]) for i in range(len(fed) - 1, 0, -1)        # a NAME opening a field
                      if fed[i].type == "NAME" and fed[i - 1].type in ("LBRACE", "_NL", "SEMICOLON")), "?")
        paren = next((o for o in reversed(self.opened) if o.token.type == "LPAR"), None)
        open_at = f"line {paren.token.line}, column {paren.token.column}" if paren else "?"
        return {"prev": prev, "block": block, "field": field, "callee": paren.label if paren else "?", "open_at": open_at}

    def _span(self, tok: Token) -> Span:
        if tok.type == "$END":   # just after the last thing written
            last = _last_visible(self.fed)
            line, col = (last.end_line, last.end_column) if last else (1, 1)
            return Span(self.filename, line, col, line, col + 1, self.source)
        return _token_span(tok, self.filename, self.source)


def _fill(template: str, ctx: dict[str, str]) -> str:
    for key, value in ctx.items():
        template = template.replace("{" + key + "}", value)
    return template


def _describe(terminal: str) -> str:
    words = {"NAME": "a name", "NUMBER": "a number", "_NL": "a newline", "$END": "the end of the file"}
    if terminal in words:
        return words[terminal]
    return f"'{_PARSER.get_terminal(terminal).pattern.value}'"


def _check_depth(tree: Tree, filename: str, source: str) -> None:
    """Refuse trees deeper than MAX_DEPTH, walking without recursion."""
    todo = [(tree, 1)]
    while todo:
        node, depth = todo.pop()
        if depth > MAX_DEPTH:
            m = node.meta
            raise SpecError(f"expression nested more than {MAX_DEPTH} levels deep",
                            Span(filename, m.line, m.column, m.end_line, m.end_column, source),
                            help="split it into simpler terms")
        todo.extend((c, depth + 1) for c in node.children if isinstance(c, Tree))


# --- parse tree -> the spec as written ----------------------------------------------------------

BINARY = {"add": "+", "sub": "-", "mul": "*", "div": "/", "pow": "**"}


class _Builder:
    def __init__(self, filename: str, source: str):
        self.filename, self.source = filename, source

    def span(self, node: Tree | Token) -> Span:
        m = node if isinstance(node, Token) else node.meta
        return Span(self.filename, m.line, m.column, m.end_line, m.end_column, self.source)

    def text(self, node: Tree | Token) -> str:
        m = node if isinstance(node, Token) else node.meta
        return self.source[m.start_pos:m.end_pos]

    def blocks(self, tree: Tree) -> tuple[WrittenBlock, ...]:
        return tuple(self.block(b) for b in tree.children)

    def block(self, t: Tree) -> WrittenBlock:
        name, *fields = [c for c in t.children if c is not None]
        return WrittenBlock(str(name), tuple(self.field(f) for f in fields), self.span(t), self.span(name))

    def field(self, t: Tree) -> WrittenField:
        name = t.children[0]
        if t.data == "declare":                  # param NAME [shape] = value
            shape = t.children[1]
            return WrittenField(str(name), self.span(t), self.span(name), value=self.value(t.children[2]),
                                declared=True, shape=None if shape is None else str(shape.children[0]),
                                shape_span=None if shape is None else self.span(shape))
        if t.data == "setting":
            return WrittenField(str(name), self.span(t), self.span(name), value=self.value(t.children[1]))
        param, expr = t.children[1], t.children[2]
        return WrittenField(str(name), self.span(t), self.span(name), param=str(param),
                            param_span=self.span(param), expr=self.expr(expr))

    def value(self, t: Tree) -> WrittenValue:
        span, text = self.span(t), self.text(t)
        if t.data in ("true", "false"):
            return WrittenValue("bool", t.data == "true", text, span)
        if t.data in ("number", "negative"):
            n = _number(str(t.children[0]))
            return WrittenValue("number", -n if t.data == "negative" else n, text, span)
        name = t.children[0]
        if t.data == "ident":
            return WrittenValue("name", str(name), text, span, name_span=self.span(name))
        args = tuple(self.arg(a) for a in t.children[1:] if a is not None)
        return WrittenValue("call", str(name), text, span, args, name_span=self.span(name))

    def arg(self, t: Tree) -> WrittenArg:
        if t.data == "kwarg":
            keyword, value = t.children
            return WrittenArg(str(keyword), self.value(value), self.span(t), self.span(keyword))
        return WrittenArg(None, self.value(t), self.span(t))

    def expr(self, t: Tree) -> Expr:
        span = self.span(t)
        if t.data == "num":
            return Num(float(t.children[0]), span)
        if t.data == "var":
            return Var(str(t.children[0]), span)
        if t.data == "neg":
            return Unary("-", self.expr(t.children[0]), span)
        if t.data in BINARY:
            return Binary(BINARY[t.data], self.expr(t.children[0]), self.expr(t.children[1]), span)
        if t.data == "fkwarg":
            raise SpecError("functions in an expression take positional arguments only",
                            self.span(t.children[0]), help="write max(x, 0), not max(a=x, b=0)")
        name, *args = t.children   # fcall
        return Call(str(name), tuple(self.expr(a) for a in args if a is not None), span)


def _number(text: str) -> int | float:
    """An int when written without '.' or exponent; ints past 4000 digits are clamped (absurd anyway)."""
    if text.isdigit():
        return int(text) if len(text) <= 4000 else 10**4000
    return float(text)   # 1e400 -> inf, refused by check

"""Good specs parse to the expected AST: every choice, defaults, spans, expression precedence."""
from __future__ import annotations

import pytest

from attndsl.ast import Binary, Call, Choice, Num, Unary, Var
from attndsl.parse import parse

DESIGN_EXAMPLE = """\
# examples/performer_rpe.attn
attention performer_rpe {
    kernel   = favor(features=256, orthogonal=true, stabilize=true, seed=0)
    position = toeplitz(max_distance=512)     # learned b[h, r], r = i - j, clipped to ±512
    apply    = scores                         # exp(b) multiplies the kernel (Luo et al.)
    mask     = causal
}
"""


def one(body: str):
    """The single block of `attention t { body }`."""
    return parse(f"attention t {{\n{body}\n}}\n", filename="t.attn").block()


def test_design_example():
    spec = parse(DESIGN_EXAMPLE, filename="performer_rpe.attn").block("performer_rpe")
    assert spec.kernel == Choice("favor", (("features", 256), ("orthogonal", True), ("stabilize", True),
                                           ("seed", 0)))
    assert spec.position == Choice("toeplitz", (("max_distance", 512), ("init", "zeros")))
    assert (spec.apply, spec.sampling, spec.mask) == (Choice("scores"), Choice("none"), Choice("causal"))
    assert spec.scale is None and spec.causal


def test_defaults():
    spec = parse("attention plain {}").block()
    assert spec.name == "plain"
    assert [spec.kernel, spec.position, spec.apply, spec.sampling, spec.mask] == [
        Choice("softmax"), Choice("none"), Choice("scores"), Choice("none"), Choice("none")]
    assert spec.scale is None
    assert spec.field_spans == ()
    assert spec.span_of("kernel") == spec.kernel.span == spec.span


CHOICES = [
    ("kernel", "softmax", Choice("softmax")),
    ("kernel", "relu", Choice("relu")),
    ("kernel", "elu1", Choice("elu1")),
    ("kernel", "exp_shift", Choice("exp_shift")),
    ("kernel", "favor", Choice("favor", (("features", 256), ("orthogonal", True), ("stabilize", True),
                                         ("seed", 0)))),
    ("kernel", "favor()", Choice("favor", (("features", 256), ("orthogonal", True), ("stabilize", True),
                                           ("seed", 0)))),
    ("kernel", "favor(64, false, seed=3)", Choice("favor", (("features", 64), ("orthogonal", False),
                                                            ("stabilize", True), ("seed", 3)))),
    ("kernel", "hyperbolic(features=32)", Choice("hyperbolic", (("features", 32), ("seed", 0)))),
    ("kernel", "hyperbolic", Choice("hyperbolic", (("features", 128), ("seed", 0)))),
    ("kernel", "trig(16, 2)", Choice("trig", (("features", 16), ("sigma", 2.0), ("seed", 0)))),
    ("kernel", "trig(sigma=0.5, seed=7)", Choice("trig", (("features", 128), ("sigma", 0.5), ("seed", 7)))),
    ("position", "none", Choice("none")),
    ("position", "toeplitz(64)", Choice("toeplitz", (("max_distance", 64), ("init", "zeros")))),
    ("position", "toeplitz(max_distance=0, init=normal)",
     Choice("toeplitz", (("max_distance", 0), ("init", "normal")))),
    ("position", "alibi", Choice("alibi", (("slope", None),))),
    ("position", "alibi(0.5)", Choice("alibi", (("slope", 0.5),))),
    ("position", "alibi(slope=1)", Choice("alibi", (("slope", 1.0),))),
    ("apply", "scores", Choice("scores")),
    ("sampling", "none", Choice("none")),
    ("sampling", "kde", Choice("kde", (("buckets", 16), ("block", 128), ("samples", 128), ("seed", 0),
                                       ("heavy", None), ("tail", "mean"), ("residual", "columns")))),
    ("sampling", "kde(8, samples=0)", Choice("kde", (("buckets", 8), ("block", 128), ("samples", 0),
                                                     ("seed", 0), ("heavy", None), ("tail", "mean"),
                                                     ("residual", "columns")))),
    ("sampling", "kde(heavy=4, tail=sampled, residual=values)",
     Choice("kde", (("buckets", 16), ("block", 128), ("samples", 128), ("seed", 0), ("heavy", 4),
                    ("tail", "sampled"), ("residual", "values")))),
    ("sampling", "uniform(samples=64, seed=1)", Choice("uniform", (("samples", 64), ("seed", 1)))),
    ("mask", "none", Choice("none")),
    ("mask", "causal", Choice("causal")),
]


@pytest.mark.parametrize("field, text, expected", CHOICES, ids=[f"{f}={t}" for f, t, _ in CHOICES])
def test_every_choice(field, text, expected):
    spec = one(f"{field} = {text}")
    assert getattr(spec, field) == expected


def test_apply_values_with_position():
    spec = one("position = alibi\napply = values")
    assert spec.apply == Choice("values")


def test_float_params_take_ints_as_floats():
    sigma = one("kernel = trig(sigma=2)").kernel["sigma"]
    assert sigma == 2.0 and isinstance(sigma, float)


@pytest.mark.parametrize("text, value", [("0.125", 0.125), ("2", 2.0), ("1e-3", 1e-3), (".5", 0.5),
                                         ("3.", 3.0), ("2.5E2", 250.0)])
def test_scale(text, value):
    scale = one(f"scale = {text}").scale
    assert scale == value and isinstance(scale, float)


def test_comments_semicolons_blank_lines_and_wrapped_arguments():
    spec = one("""
    # a comment line

    kernel = favor(features=64,   # the arguments may wrap
                   seed=1,)
    mask = causal; scale = 0.5    # two fields on a line
    """)
    assert spec.kernel["features"] == 64 and spec.kernel["seed"] == 1
    assert spec.causal and spec.scale == 0.5


def test_several_blocks():
    f = parse("attention a { kernel = relu }\n\n# between\nattention b { mask = causal }\n"
              "attention c {\n}\n", filename="many.attn")
    assert [b.name for b in f.blocks] == ["a", "b", "c"]
    assert f.block("a").kernel == Choice("relu") and f.block("b").causal
    assert f.filename == "many.attn"


def test_bytes_and_byte_order_mark():
    assert parse("\ufeffattention a { kernel = relu }".encode()).block().kernel == Choice("relu")


def test_user_maps():
    spec = one("kernel(x) = elu(x) + 1\nposition(r) = -0.5 * abs(r)")
    assert spec.kernel == Choice("user", expr=Binary("+", Call("elu", (Var("x"),)), Num(1.0)))
    assert spec.position == Choice("user", expr=Binary("*", Unary("-", Num(0.5)), Call("abs", (Var("r"),))))


def test_spans_point_at_the_source():
    f = parse(DESIGN_EXAMPLE, filename="p.attn")
    spec = f.block()
    kernel = spec.span_of("kernel")
    assert (kernel.filename, kernel.line, kernel.column) == ("p.attn", 3, 5)
    assert (spec.kernel.span.line, spec.kernel.span.column, spec.kernel.span.end_column) == (3, 16, 76)
    assert (spec.position.span.line, spec.position.span.column) == (4, 16)
    assert (spec.mask.span.line, spec.mask.span.column) == (6, 16)
    assert (spec.span.line, spec.span.end_line) == (2, 7)
    assert [k for k, _ in spec.field_spans] == ["kernel", "position", "apply", "mask"]
    assert spec.sampling.span == spec.span          # a default points at its block
    assert str(kernel) == "p.attn:3:5" and kernel.line_text().strip().startswith("kernel")


def test_expression_spans():
    expr = one("kernel(x) = 1 + exp(x)").kernel.expr
    call = expr.right
    assert (call.span.line, call.span.column, call.span.end_column) == (2, 17, 23)
    assert (call.args[0].span.column, expr.span.column) == (21, 13)


def expr(text: str):
    return one(f"kernel(x) = {text}").kernel.expr


PRECEDENCE = [
    ("-x**2", Unary("-", Binary("**", Var("x"), Num(2.0)))),
    ("2**3**2", Binary("**", Num(2.0), Binary("**", Num(3.0), Num(2.0)))),
    ("2**-x", Binary("**", Num(2.0), Unary("-", Var("x")))),
    ("1 - x - 2", Binary("-", Binary("-", Num(1.0), Var("x")), Num(2.0))),
    ("x / 2 / 4", Binary("/", Binary("/", Var("x"), Num(2.0)), Num(4.0))),
    ("1 + x * 2", Binary("+", Num(1.0), Binary("*", Var("x"), Num(2.0)))),
    ("(1 + x) * 2", Binary("*", Binary("+", Num(1.0), Var("x")), Num(2.0))),
    ("-x * 2", Binary("*", Unary("-", Var("x")), Num(2.0))),
    ("--x", Unary("-", Unary("-", Var("x")))),
    ("max(x, 0) ** 2", Binary("**", Call("max", (Var("x"), Num(0.0))), Num(2.0))),
    ("exp(-(x))", Call("exp", (Unary("-", Var("x")),))),
    ("1.5e-2", Num(0.015)),
]


@pytest.mark.parametrize("text, tree", PRECEDENCE, ids=[t for t, _ in PRECEDENCE])
def test_expression_precedence(text, tree):
    assert expr(text) == tree

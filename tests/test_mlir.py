"""The attn MLIR dialect: every spec, after every pipeline stage, prints as a module that torch-mlir
parses and verifies, and reads back as the same IR; malformed modules are refused at the op."""
import dataclasses
import functools
import inspect
from pathlib import Path

import pytest
from torch_mlir import ir

from attndsl import ir as attn_ir
from attndsl import parse, pipeline
from attndsl.ast import Choice
from attndsl.cli import main
from attndsl.ir import Input, LinearAttention, postorder
from attndsl.mlir import MLIRFormatError, dialect, from_mlir, from_module, to_mlir, to_module

EXAMPLES = Path(__file__).parent.parent / "examples"
HEAD_DIM, VALUE_DIM = 64, 32

# what the examples do not show: sampling, exp_shift, alibi with a slope, a unary minus under **, eps
EXTRA = """
attention relu_floor { kernel = relu; eps = 0.25; position = toeplitz(max_distance=8); mask = causal }
attention kde_scaled { sampling = kde(buckets=8); scale = 0.5 }
attention user_position { position(r) = (-abs(r)) ** 2 * -0.001 }
attention uniform_causal { sampling = uniform(samples=64, seed=3); mask = causal }
attention alibi_slope { kernel = elu1; position = alibi(slope=0.25); mask = causal }
attention exp_shift_values { kernel = exp_shift; position = toeplitz(max_distance=8); apply = values }
"""

BLOCKS = {b.name: b for path in sorted(EXAMPLES.glob("*.attn")) for b in parse(path.read_text()).blocks}
BLOCKS.update({b.name: b for b in parse(EXTRA).blocks})


@functools.cache
def planned(name: str) -> pipeline.Planned:
    return pipeline.run(BLOCKS[name], HEAD_DIM, VALUE_DIM)


def strict(x):
    """x with the type of every value kept (== alone takes 1 == 1.0 == True); spans left out."""
    if dataclasses.is_dataclass(x):
        return type(x).__name__, tuple(strict(getattr(x, f.name)) for f in dataclasses.fields(x) if f.compare)
    if isinstance(x, tuple):
        return tuple(strict(v) for v in x)
    return type(x).__name__, x


@pytest.mark.parametrize("stage", pipeline.STAGES)
@pytest.mark.parametrize("name", BLOCKS)
def test_round_trip(name, stage):
    root = planned(name).stage(stage)
    text = to_mlir({name: root})
    with dialect.context():
        assert ir.Module.parse(text).operation.verify()
    back = from_mlir(text)
    assert back == {name: root}
    assert strict(back[name]) == strict(root)
    assert from_module(to_module({name: root})) == {name: root}


def test_every_node_type_has_an_op_and_every_op_round_trips():
    node_types = {c for _, c in inspect.getmembers(attn_ir, inspect.isclass)
                  if issubclass(c, attn_ir.Node) and c is not attn_ir.Node}
    assert set(dialect.OPS.values()) == node_types
    seen = {type(n) for name in BLOCKS for _, root in planned(name).stages for n in postorder(root)}
    assert seen == node_types


RELU_CAUSAL = """
func.func @relu_causal() -> tensor<?x?x8xf32> {
  %q = "attn.input"() {name = "q"} : () -> tensor<?x?x8xf32>
  %k = "attn.input"() {name = "k"} : () -> tensor<?x?x8xf32>
  %v = "attn.input"() {name = "v"} : () -> tensor<?x?x8xf32>
  %out = "attn.linear_attention"(%q, %k, %v) {causal = true, form = "prefix_sum", phi = #attn.choice<"relu", {}>,
         prescale = 5.0e-01 : f64} : (tensor<?x?x8xf32>, tensor<?x?x8xf32>, tensor<?x?x8xf32>) -> tensor<?x?x8xf32>
  return %out : tensor<?x?x8xf32>
}
"""


def test_a_hand_written_module_reads_as_ir():
    q, k, v = Input("q", 8), Input("k", 8), Input("v", 8)
    expected = LinearAttention(q, k, v, causal=True, form="prefix_sum", phi=Choice("relu"), prescale=0.5)
    assert from_mlir(RELU_CAUSAL) == {"relu_causal": expected}


MALFORMED = {   # id: (replace, with, what the message says)
    "input-name": ('name = "k"', 'name = "z"',
                   ['"z"\' does not satisfy the constraint', "x.mlir:4:8", 'expected attn.input() {name: "q" | "k" | "v"}']),
    "bool-as-int": ("causal = true", "causal = 1 : i64", ["'1 : i64' does not satisfy the constraint", "x.mlir:6:10"]),
    "missing-attribute": ("causal = true, ", "", ['attribute "causal" is expected but not provided']),
    "unknown-attribute": ("causal = true", 'causal = true, mask = "causal"', ["unknown attribute 'mask'"]),
    "unknown-form": ('"prefix_sum"', '"prefix_sums"', ["'form' of attn.linear_attention is \"prefix_sums\"",
                                                       "did you mean 'prefix_sum'?"]),
    "float-as-string": ("5.0e-01 : f64", '"0.5"', ["'prescale' of attn.linear_attention must be a float (f64)"]),
    "unknown-kernel": ('"relu"', '"rleu"', ["unknown kernel 'rleu'", "did you mean 'relu'?"]),
    "unknown-parameter": ('"relu", {}', '"relu", {alpha = 1.0 : f64}', ["unknown parameter 'alpha' of relu"]),
    "bad-user-map": ('#attn.choice<"relu", {}>', '#attn.user_map<"relu(r)">',
                     ["not a kernel map: 'relu(r)'", "'r' is not defined in a kernel map"]),
    "unknown-op": ('"attn.linear_attention"', '"attn.linear_attn"',
                   ["unregistered operation 'attn.linear_attn'", "did you mean 'attn.linear_attention'?"]),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_module_is_refused_at_the_op(case):
    old, new, says = MALFORMED[case]
    assert old in RELU_CAUSAL
    with pytest.raises(MLIRFormatError) as e:
        from_mlir(RELU_CAUSAL.replace(old, new, 1), "x.mlir")
    for part in says:
        assert part in str(e.value)
    assert "--> x.mlir:" in str(e.value) and "^" in str(e.value)


def test_operands_that_do_not_fit_are_refused_at_the_op():
    narrow_k = (RELU_CAUSAL.replace('{name = "k"} : () -> tensor<?x?x8xf32>', '{name = "k"} : () -> tensor<?x?x4xf32>')
                .replace("(tensor<?x?x8xf32>, tensor<?x?x8xf32>, tensor", "(tensor<?x?x8xf32>, tensor<?x?x4xf32>, tensor"))
    with pytest.raises(MLIRFormatError, match=r"ill-formed attn.linear_attention \(attndsl.verify\): "
                                              r"qf: tensor<\?x\?x8xf32>, kf: tensor<\?x\?x4xf32>"):
        from_mlir(narrow_k)


@pytest.mark.parametrize("after", ["ir", "plan"])
def test_cli_emit_mlir(after, capsys):
    path = EXAMPLES / "positions.attn"
    assert main(["emit", str(path), "--stage", "mlir", "--after", after,
                 "--head-dim", str(HEAD_DIM), "--value-dim", str(VALUE_DIM)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"// {path}: the IR after {after}")
    names = [b.name for b in parse(path.read_text()).blocks]
    assert from_mlir(out) == {name: planned(name).stage(after) for name in names}


def test_cli_emit_mlir_names_an_unknown_stage(capsys):
    assert main(["emit", str(EXAMPLES / "softmax.attn"), "--stage", "mlir", "--after", "pln"]) == 1
    assert "unknown stage 'pln'" in capsys.readouterr().err

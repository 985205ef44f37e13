"""Nested user maps: bounded TIR, and kernels that agree with the reference.

exp(exp(exp(x))) or sigmoid(sigmoid(sigmoid(x))) used to expand exponentially (vmath.exp reads its
argument 44 times, the derivative repeats subexpressions): TIR passes then ran for minutes. The
lowering now shares subexpressions through let-bindings and takes the libm forms for large
arguments (attndsl.expr.plan); lets in vectorized loops must still compute lane by lane, so every
case is checked against the reference, forward and backward, float32 and float64.
"""
from __future__ import annotations

import pytest
import torch

import attndsl
from attndsl.ast import Call, Var
from attndsl.expr import diff, plan

from conftest import assert_matches_reference, shared


def nest(func: str, depth: int, var: str = "x") -> str:
    return f"{func}(" * depth + var + ")" * depth


def chain(func: str, depth: int):
    """func(func(...func(x))) as a tree (deeper than the checker lets through)."""
    e = Var("x")
    for _ in range(depth):
        e = Call(func, (e,))
    return e


@pytest.mark.parametrize("func", ["exp", "sigmoid", "sin", "cos", "tanh"])
def test_expanded_size_grows_polynomially_with_nesting(func):
    """A chain of calls and its derivative expand to O(depth²) operations, not O(c^depth)."""
    sizes = {d: plan(diff(chain(func, d), "x")).expanded for d in (10, 20, 40)}
    assert sizes[40] < 5 * sizes[20] < 25 * sizes[10], sizes


def test_tir_of_a_nested_derivative_stays_small():
    """The TIR of d/dx sigmoid^12(x) is a few thousand nodes when printed (it was 44^12)."""
    from tvm import tirx

    from attndsl.lowering.tir.expr import to_tir
    x = tirx.Var("x", "float32")
    lengths = {d: len(str(to_tir(diff(chain("sigmoid", d), "x"), x, "float32"))) for d in (6, 12)}
    assert lengths[12] < 4 * lengths[6] and lengths[12] < 100_000, lengths


CASES = {
    # linear form, the map fused into the linear kernels (lowering/cpu/linear.py)
    "exp3-full": "kernel(x) = exp(exp(exp(x)))",
    # prefix sums, fused; the derivative in unrolled, vectorized loops
    "sigmoid4-causal": f"kernel(x) = {nest('sigmoid', 4)}\n    mask = causal",
    # a position term: the map is its own kernel (lowering/cpu/featuremap.py elementwise_*)
    "mixed-decayed": "kernel(x) = softplus(elu(sin(x)) * cos(x)) + 0.1\n    position(r) = -0.1 * abs(r)",
    # softmax with a nested position term, computed inside the quadratic kernels
    "position-quadratic": "position(r) = sigmoid(sigmoid(sin(r / 8))) - exp(-exp(cos(r / 5)))\n"
                          "    mask = causal",
}
def compiled(case: str) -> attndsl.Attention:
    return shared(f"attention t {{\n    {CASES[case]}\n}}\n", heads=2, head_dim=8, value_dim=6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_nested_maps_match_the_reference(case, dtype):
    attn = compiled(case)
    q, k, v = 0.5 * torch.randn(2, 2, 37, 8), 0.5 * torch.randn(2, 2, 37, 8), torch.randn(2, 2, 37, 6)
    assert_matches_reference(attn, q, k, v, dtype)

"""eps, the normalizer's floor: out_i = Σ_j A_ij v_j / (Σ_j A_ij + eps) (docs/numerics.md).

The spec field (defaults, refusals), then every form that has a normalizer (linear, prefix_sum,
decayed, banded, toeplitz_fft, values_fft; the TVM kernels, the portable kernels and the MLIR
backend) against the reference, forward and backward, with rows whose features all vanish
(relu of a negative row) and an eps large enough to change every row; the banded and FFT kernels
divide their weights by exp(max b) and the decayed form drops a constant of b(r), so tables far
above 0 and a user position with a constant check that eps is scaled with them.
"""
from __future__ import annotations

import pytest
import torch

import attndsl
from attndsl.ast import DEFAULT_EPS
from attndsl.ir import format_ir
from attndsl.reference import reference
from conftest import RTOL, assert_matches_reference, shared

# spec body -> the form it must plan as (plan= forces the banded/FFT choice for a table)
FORMS = {
    "linear": ("kernel = relu; eps = 4", "auto"),
    "prefix_sum": ("kernel = relu; eps = 4; mask = causal", "auto"),
    "decayed": ("kernel = relu; eps = 4; position(r) = 2 - 0.2 * abs(r)", "auto"),
    "banded": ("kernel = relu; eps = 4; position = toeplitz(max_distance=5); mask = causal", "banded"),
    "toeplitz_fft": ("kernel = relu; eps = 4; position = toeplitz(max_distance=40)", "toeplitz_fft"),
    "values_fft": ("kernel = relu; eps = 4; position = toeplitz(max_distance=40); apply = values", "auto"),
}


def built(form: str, target="llvm", head_dim: int = 4, value_dim: int = 3, eps: str | None = None):
    """The form's spec compiled (with eps written as `eps`, or none when ""), cached per module."""
    body, plan = FORMS[form]
    if eps is not None:
        body = body.replace("eps = 4", f"eps = {eps}") if eps else body.replace("eps = 4; ", "")
    attn = shared(f"attention t {{ {body} }}", init=_low_table, heads=2, head_dim=head_dim,
                  value_dim=value_dim, target=target, plan=plan)
    if form != "values_fft":
        assert f"form {form}" in attn.explain()
    return attn


def _low_table(attn):
    """A table far from 0: the kernels divide by exp(max b)."""
    if attn.position_table is not None:
        with torch.no_grad():
            attn.position_table.copy_(-3 + 0.5 * torch.randn_like(attn.position_table))


def inputs(n: int, dk: int, dv: int, dtype=torch.float64):
    """q, k, v (1, 2, n, ·) with every third query row negative: relu gives it no features."""
    q, k, v = torch.randn(1, 2, n, dk, dtype=dtype), torch.randn(1, 2, n, dk, dtype=dtype), torch.randn(
        1, 2, n, dv, dtype=dtype)
    q[:, :, ::3] = -q[:, :, ::3].abs()
    return q, k, v


# --- the field -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel,floor", [
    ("relu", DEFAULT_EPS), ("trig(features=4)", DEFAULT_EPS), ("kernel(x) = x * x", DEFAULT_EPS),
    ("elu1", 0.0), ("favor(features=4)", 0.0), ("hyperbolic(features=4)", 0.0), ("exp_shift", 0.0),
    ("softmax", 0.0)])
def test_default_floor(kernel, floor):
    field = kernel if kernel.startswith("kernel(") else f"kernel = {kernel}"
    assert attndsl.parse(f"attention t {{ {field} }}").block().floor == floor


def test_written_floor_reaches_the_planned_ir():
    assert attndsl.parse("attention t { kernel = relu; eps = 0.25 }").block().floor == 0.25
    assert "eps=4" in format_ir(built("prefix_sum").planned.root) and "eps 4" in built("prefix_sum").explain()
    assert "eps" not in format_ir(attndsl.compile("attention t { kernel = elu1 }", heads=1, head_dim=4).planned.root)


@pytest.mark.parametrize("body,message,help", [
    ("kernel = softmax; eps = 1e-6", "eps applies to feature-map kernels; softmax takes none", "never vanishes"),
    ("eps = 1e-6", "softmax takes none", "remove `eps`"),
    ("kernel = favor(features=4); eps = 1e-6", "eps cannot be combined with favor(stabilize=true)",
     "favor(stabilize=false)"),
    ("kernel = exp_shift; eps = 0.1", "eps cannot be combined with exp_shift", "strictly positive"),
    ("kernel = relu; eps = -1e-6", "eps must be >= 0", "eps: a number >= 0"),
    ("kernel = relu; eps = relu", "eps must be a number", "eps:"),
    ("kernel = relu\n eps(x) = x", "eps is a number, not a map", "eps = 1e-6"),
])
def test_bad_eps_is_a_located_error(body, message, help):
    with pytest.raises(attndsl.SpecError) as e:
        attndsl.parse(f"attention t {{ {body} }}")
    assert message in str(e.value) and help in str(e.value)
    assert "^" in str(e.value)


def test_eps_zero_and_unstabilized_favor_are_accepted():
    assert attndsl.parse("attention t { kernel = favor(features=4, stabilize=false); eps = 1e-3 }").block().floor == 1e-3
    assert attndsl.parse("attention t { kernel = softmax; eps = 0 }").block().floor == 0.0


# --- the reference ---------------------------------------------------------------------------------

def test_reference_floors_vanishing_rows():
    """relu with no eps gives 0/0 on a row whose features vanish; the default floor gives 0."""
    q, k, v = inputs(7, 4, 3)
    zero = attndsl.parse("attention t { kernel = relu; eps = 0 }").block()
    floored = attndsl.parse("attention t { kernel = relu }").block()
    assert torch.isnan(reference(zero, q, k, v)[:, :, ::3]).all()
    out = reference(floored, q, k, v)
    assert torch.isfinite(out).all() and (out[:, :, ::3] == 0).all()


# --- every form against the reference ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_form_matches_reference(form, dtype):
    attn = built(form, head_dim=8, value_dim=6)
    q, k, v = inputs(70, 8, 6)
    out = assert_matches_reference(attn, q, k, v, dtype)
    assert torch.isfinite(out).all()
    # eps matters here: without it the rows differ by far more than the tolerance
    spec = attn.spec
    unfloored = reference(type(spec)(**{**spec.__dict__, "eps": 1e-12}), q, k, v,
                                  position_table=attn.position_table.detach().double()
                                  if attn.position_table is not None else None)
    assert (unfloored - out.double()).abs().max() > 100 * RTOL[dtype]


@pytest.mark.parametrize("form", sorted(FORMS))
def test_form_gradcheck_float64(form):
    attn = built(form, head_dim=8, value_dim=6)      # the float64 kernels of test_form_matches_reference
    q, k, v = (t.requires_grad_() for t in inputs(9, 8, 6))
    assert torch.autograd.gradcheck(attn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_default_floor_keeps_vanishing_rows_finite():
    """kernel = relu without eps: the rows with no features are 0, not 0/0, in every dtype."""
    attn = built("prefix_sum", eps="")
    for dtype in (torch.float32, torch.float64):
        q, k, v = (t.to(dtype) for t in inputs(40, 4, 3))
        out = attn(q, k, v)
        assert torch.isfinite(out).all() and (out[:, :, ::3] == 0).all()


@pytest.mark.parametrize("form", ["prefix_sum", "decayed", "banded", "toeplitz_fft"])
def test_portable_form_matches_reference(form):
    """The portable kernels (what GPU targets build), on this CPU."""
    attn = built(form, target=attndsl.Target("llvm", kernels="portable"), head_dim=8, value_dim=6)
    assert "portable kernels" in attn.explain()
    assert_matches_reference(attn, *inputs(70, 8, 6), torch.float64)


@pytest.mark.parametrize("form", ["linear", "decayed", "banded"])
def test_mlir_backend_matches_reference(form):
    attn = built(form, target="mlir-cpu", head_dim=8, value_dim=6)
    q, k, v = inputs(20, 8, 6)
    with torch.no_grad():                    # the MLIR backend runs the forward pass only
        torch.testing.assert_close(attn(q, k, v), attn.reference(q, k, v), rtol=1e-9, atol=1e-12)

"""The Toeplitz-FFT form is right or refuses (docs/numerics.md): its worst row stays within the
dtype's tolerance of the reference, computed in float64 where float32 cannot, else a PrecisionError.
The module's tests run on one test worker (pytest -n --dist loadgroup), which builds the
module-scoped fixtures once."""
from __future__ import annotations

import warnings

import pytest
import torch

import attndsl
from attndsl.precision import TOL, PrecisionError, condition
from attndsl.reference import reference

N_MAX = 600
pytestmark = pytest.mark.xdist_group("precision")


@pytest.fixture(scope="module")
def table_attn():
    def get(causal):
        mask = "; mask = causal" if causal else ""
        return attndsl.compile(f"attention t {{ kernel = elu1; position = toeplitz(max_distance={N_MAX}){mask} }}",
                               heads=1, head_dim=16, plan="toeplitz_fft")
    return {c: get(c) for c in (False, True)}


def worst_row(out, ref):
    return ((out.double() - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()


def grown(slope, shape):
    r = torch.arange(2 * N_MAX + 1) - N_MAX
    return (slope * (r.abs() if shape == "abs" else -r)).float()[None]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", ["abs", "ramp"])
@pytest.mark.parametrize("slope", [0.0, 0.01, 0.03, 0.06, 0.2])
def test_every_answer_is_within_tolerance_or_refused(table_attn, causal, shape, slope):
    attn, n = table_attn[causal], 512
    with torch.no_grad():
        attn.position_table.copy_(grown(slope, shape))
    q, k, v = (torch.randn(1, 1, n, 16) for _ in range(3))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = attn(q, k, v)
    except PrecisionError as e:
        assert "plan='banded'" in str(e) and "N=512" in str(e)
        return
    ref = attn.reference(q.double(), k.double(), v.double())
    assert worst_row(out, ref) <= TOL[torch.float32]


def test_a_table_grown_past_float32_computes_in_float64_with_a_warning(table_attn):
    attn = table_attn[True]
    with torch.no_grad():
        attn.position_table.copy_(grown(0.02, "abs"))        # the learned table
    q, k, v = (torch.randn(1, 1, 500, 16, requires_grad=True) for _ in range(3))   # warned once per N
    with pytest.warns(UserWarning, match="computes in float64"):
        out = attn(q, k, v)
    assert out.dtype == torch.float32
    ref = attn.reference(q.double(), k.double(), v.double())
    assert worst_row(out, ref) <= TOL[torch.float32]
    g = torch.autograd.grad(out.sum(), q)[0]
    qd = q.detach().double().requires_grad_()
    want = torch.autograd.grad(attn.reference(qd, k.double(), v.double()).sum(), qd)[0]
    assert ((g.double() - want).norm() / want.norm()).item() <= TOL[torch.float32]


GROWING = "attention g { kernel = relu; position(r) = 0.05 * abs(r); mask = causal }"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_position_function_the_forced_fft_resolves_only_at_short_lengths_is_refused_at_call(dtype):
    attn = attndsl.compile(GROWING, heads=1, head_dim=8, plan="toeplitz_fft")
    assert "float32 inputs up to N=256, float64 up to N=128" in attn.explain()
    q, k, v = (torch.randn(1, 1, 512, 8, dtype=dtype) for _ in range(3))
    with pytest.raises(PrecisionError, match="Toeplitz-FFT form cannot compute this position term at N=512"):
        attn(q, k, v)


def test_past_the_fft_s_reach_auto_runs_the_exact_pairwise_form():
    attn = attndsl.compile(GROWING, heads=1, head_dim=8, dtype=None)
    assert [p.forms for p in attn.plans] == [("pairwise",), ("toeplitz_fft",)]
    assert attn.plans[attn._plan_index(512)].forms == ("pairwise",)
    q, k, v = (torch.randn(1, 1, 512, 8, dtype=torch.float64) for _ in range(3))
    out = attn(q, k, v)
    assert worst_row(out, attn.reference(q, k, v)) <= TOL[torch.float64]


@pytest.mark.parametrize("n,exact", [(200, True), (1024, False)])
def test_where_float64_costs_more_than_the_exact_form_a_padded_call_runs_the_exact_form(n, exact, monkeypatch):
    """A key padding mask leaves rows whose kept keys lie far away (weights e^(−18)): the FFT form
    would need float64. At N = 200 the cost model puts the pairwise form below twice the FFT's
    (precision.FLOAT64_COST), and the call runs it in float32; at N = 1024 it does not, and the
    call runs the FFT form in float64. Both warned, both within tolerance of the reference."""
    from attndsl import ops
    attn = attndsl.compile("attention t { kernel = elu1; position(r) = -0.3 * abs(r) + 0.5 * cos(r / 3) }",
                           heads=2, head_dim=8, dtype=None)
    assert [p.forms for p in attn.plans] == [("pairwise",), ("toeplitz_fft",)]
    assert attn.plans[attn._plan_index(n)].forms == ("toeplitz_fft",)
    seen = []
    for op in ("pairwise_attention", "toeplitz_attention"):
        real = getattr(ops.fast, op)
        monkeypatch.setattr(ops.fast, op, lambda qf, *rest, op=op, real=real: seen.append((op, qf.dtype)) or real(qf, *rest))
    q, k, v = (torch.randn(2, 2, n, 8) for _ in range(3))
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[1, n - 60:] = True
    warned = "runs the exact pairwise form in float32" if exact else "computes in float64"
    with pytest.warns(UserWarning, match=warned):
        out = attn(q, k, v, key_padding_mask=mask)
    assert seen == [("pairwise_attention", torch.float32) if exact else ("toeplitz_attention", torch.float64)]
    assert out.dtype == torch.float32
    assert worst_row(out, attn.reference(q.double(), k.double(), v.double(), key_padding_mask=mask)) <= TOL[torch.float32]


def test_a_position_function_the_fft_cannot_resolve_at_any_useful_length_is_refused_at_compile():
    """... when the FFT form is forced; auto plans the exact pairwise form at every length."""
    text = "attention g {\n kernel = elu1\n position(r) = -r\n}"
    with pytest.raises(attndsl.SpecError, match="cannot compute this position term past N=16") as e:
        attndsl.compile(text, heads=1, head_dim=8, plan="toeplitz_fft")
    assert "<spec>:3:" in str(e.value) and "decays" in str(e.value) and "pairwise" in str(e.value)
    attn = attndsl.compile(text, heads=1, head_dim=8, dtype=None)
    assert [attn.plans[i].forms for *_, i in attn._spans] == [("pairwise",)]
    q, k, v = (torch.randn(1, 1, 200, 8, dtype=torch.float64) for _ in range(3))    # b spans ±199
    assert worst_row(attn(q, k, v), attn.reference(q, k, v)) <= TOL[torch.float64]


def test_the_condition_of_flat_and_decaying_biases_is_small():
    r = torch.arange(-511, 512, dtype=torch.float64)
    assert condition(torch.zeros(1, 1023), causal=False) == pytest.approx(512 ** 0.5 * 1023 ** 0.5 / 512)
    assert condition((-0.1 * r.abs())[None], causal=True) < 100
    assert condition((0.05 * r.abs())[None], causal=True) > 1e10
    assert condition(torch.full((1, 1023), float("nan")), causal=False) == float("inf")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_banded_resolves_a_table_past_float32_s_exp_range(causal):
    """exp(100) overflows float32: the banded kernels weigh by exp(b − max b)."""
    mask = "; mask = causal" if causal else ""
    attn = attndsl.compile(f"attention t {{ kernel = elu1; position = toeplitz(max_distance=8){mask} }}",
                           heads=2, head_dim=8, plan="banded")
    with torch.no_grad():
        attn.position_table.zero_()
        attn.position_table[:, 6:11] = 100.0
    q, k, v = (torch.randn(1, 2, 64, 8, requires_grad=True) for _ in range(3))
    out = attn(q, k, v)
    table = attn.position_table.detach().double().requires_grad_()
    ref = reference(attn.spec, q.double(), k.double(), v.double(), position_table=table)
    assert worst_row(out, ref) <= 1e-5
    got = torch.autograd.grad(out.sum(), attn.position_table)[0]
    want = torch.autograd.grad(ref.sum(), table)[0]
    assert torch.isfinite(got).all() and torch.allclose(got.double(), want, rtol=1e-3, atol=1e-5)


# --- the stabilized maps: a row's normalizer near underflow -------------------------------------------

@pytest.fixture(scope="module")
def favor_causal():
    """favor at head_dim 256, where one key's features can outscore the others' by ~130 nats."""
    return attndsl.compile("attention f { kernel = favor(features=16, seed=0); mask = causal }",
                           heads=1, head_dim=256)


def _keys(case: str, k: torch.Tensor) -> torch.Tensor:
    from attndsl.featuremaps import random_projection
    k = k.clone()
    if case == "aligned later key":              # x = w_0 maximizes w_0·x − |x|²/2: every earlier
        w = random_projection(16, 256, 0, True).float()        # key's features fall below 1e-38
        k[0, 0, 40] = w[0] / 256 ** -0.25
    elif case == "large first key":              # its features underflow beside the others'
        k[0, 0, 0] *= 5
    return k


@pytest.mark.parametrize("case,n", [("aligned later key", 64), ("large first key", 65)])
def test_stabilizer_underflow_computes_in_float64(favor_causal, case, n):
    """Before: the rows before the aligned key (the first row, for the large first key) were 0/0;
    the call now finds a normalizer below float32's floor and runs in float64 (warned once per N)."""
    q, k, v = (torch.randn(1, 1, n, 256) for _ in range(3))
    k = _keys(case, k)
    with pytest.warns(UserWarning, match=r"computes in float64: the favor stabilizer"):
        out = favor_causal(q, k, v)
    ref = favor_causal.reference(q.double(), k.double(), v.double())
    assert out.dtype == torch.float32 and worst_row(out, ref) < TOL[torch.float32]


def test_ordinary_inputs_stay_in_float32(favor_causal):
    q, k, v = (torch.randn(2, 1, 300, 256) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = favor_causal(q, k, v)
    assert worst_row(out, favor_causal.reference(q.double(), k.double(), v.double())) < TOL[torch.float32]


def test_stabilizer_beyond_float64_is_refused(favor_causal):
    q, k, v = (torch.randn(1, 1, 32, 256) for _ in range(3))
    k[0, 0, 0] *= 40                              # ~ −2·10^5 nats below the others
    with pytest.raises(PrecisionError, match=r"stabilizer cannot hold these keys even in float64.*LayerNorm"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            favor_causal(q, k, v)

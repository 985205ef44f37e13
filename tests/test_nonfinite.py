"""docs/numerics.md: NaN in gives NaN out, in exactly the rows whose mask lets them see it, in every form."""
from __future__ import annotations

import pytest
import torch

import attndsl

from conftest import RTOL, assert_close

N, D = 64, 8
BAD = 40                                   # the position that holds the NaN

SPECS = {                                  # id: (spec body, the form it plans)
    "prefix_sum": "kernel = elu1; mask = causal",
    "linear-relu": "kernel = relu",
    "linear-max": "kernel(x) = max(x, 0)",
    "quadratic": "mask = causal",
    "decayed": "kernel = elu1; position = alibi; mask = causal",
    "banded": "kernel = elu1; position = toeplitz(max_distance=8); mask = causal",
    "toeplitz_fft": "kernel = elu1; position = toeplitz(max_distance=100); mask = causal",
    "values_fft": "kernel = elu1; position = toeplitz(max_distance=100); apply = values; mask = causal",
    "favor": "kernel = favor(features=16); mask = causal",
    "kde": "sampling = kde(buckets=4, block=16, samples=8)",
}


@pytest.fixture(scope="module")
def compiled():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = attndsl.compile(f"attention t {{ {SPECS[name]} }}", heads=2, head_dim=D)
        return cache[name]
    return get


def inputs(where: str, value=float("nan")):
    q, k, v = (torch.randn(1, 2, N, D, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        dict(q=q, k=k, v=v)[where][0, 1, BAD, 0] = value
    return q, k, v


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("name", list(SPECS))
def test_nan_reaches_exactly_the_rows_its_mask_lets_it_see(compiled, name, where):
    attn = compiled(name)
    q, k, v = inputs(where)
    out = attn(q, k, v)
    ref = attn.reference(*(t.double() for t in (q, k, v)))
    assert torch.equal(out.isnan(), ref.isnan()), f"NaN at {out.isnan().nonzero()[:4].tolist()}..."
    assert out.isnan().any()
    if name != "kde":                      # kde estimates: its finite rows are checked elsewhere
        fin = ~ref.isnan()
        assert_close("finite rows", ref[fin], out[fin], RTOL[torch.float32])


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("name", ["prefix_sum", "quadratic", "toeplitz_fft", "linear-relu"])
def test_gradients_of_the_rows_a_nan_cannot_reach_stay_finite(compiled, name, where):
    attn = compiled(name)
    q, k, v = inputs(where)
    # causal: rows before the NaN; without a mask every row of its head sees it, so the other head
    unreached = (lambda o: o[:, :, :BAD]) if attn.spec.causal else (lambda o: o[:, 0])
    got = torch.autograd.grad(unreached(attn(q, k, v)).sum(), (q, k, v))
    # §2 on the inputs with the NaN zeroed: the same maths for every row that cannot see it
    clean = [t.detach().nan_to_num(0.0).double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(unreached(attn.reference(*clean)).sum(), clean)
    for name_, g, w in zip("qkv", got, want):
        assert torch.isfinite(g).all(), f"d{name_} has NaN"
        assert_close(f"d{name_}", w, g, 1e-4)


def test_the_loss_of_a_nan_row_sends_nan_to_what_it_depends_on(compiled):
    attn = compiled("prefix_sum")
    q, k, v = inputs("v")
    dq, dk, dv = torch.autograd.grad(attn(q, k, v).sum(), (q, k, v))
    assert dq[0, 1, BAD:].isnan().all() and not dq[0, 1, :BAD].isnan().any()
    assert dk[0, 1].isnan().all() and dv[0, 1].isnan().all()     # row N−1 sees every key
    assert not dq[0, 0].isnan().any()                              # the other head is untouched


@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_inf_is_not_finite_exactly_where_the_reference_is_not(compiled, value, where):
    attn = compiled("prefix_sum")                  # elu1(−inf) + 1 = 0: a key of −inf drops out
    q, k, v = inputs(where, value)
    out, ref = attn(q, k, v), attn.reference(*(t.double() for t in (q, k, v)))
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    assert torch.isfinite(out[0, 1, :BAD]).all()


def test_the_reference_leaves_masked_nan_out():
    spec = attndsl.parse("attention t { kernel = elu1; position = toeplitz(max_distance=4); "
                         "apply = values; mask = causal }").block()
    from attndsl.reference import reference
    q, k, v = (torch.randn(1, 1, 16, 4, dtype=torch.float64) for _ in range(3))
    v[0, 0, 9, 2] = float("nan")
    out = reference(spec, q, k, v, position_table=torch.randn(1, 9, dtype=torch.float64))
    assert torch.isfinite(out[0, 0, :9]).all() and torch.isfinite(out[0, 0, 9:, [0, 1, 3]]).all()
    assert out[0, 0, 9:, 2].isnan().all()


def test_the_rule_holds_under_torch_compile(compiled):
    attn = compiled("prefix_sum")
    fn = torch.compile(attn, fullgraph=True, dynamic=True)
    for where in ("k", "v"):
        q, k, v = inputs(where)
        out, ref = fn(q, k, v), attn.reference(*(t.double() for t in (q, k, v)))
        assert torch.equal(out.isnan(), ref.isnan())
        assert_close("finite rows", ref[~ref.isnan()], out[~ref.isnan()], RTOL[torch.float32])
    q, k, v = inputs("q", 0.5)                     # finite inputs: the same numbers as eager
    assert_close("finite", attn(q, k, v), fn(q, k, v), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("numel", [100, 1 << 15, (1 << 16) + 5, 3 * 1000 * 37])
def test_the_compiled_finite_check(dtype, numel):
    """The check guarded() runs on outputs (a compiled sum from 32768 elements, with a tail that
    is not a whole row of lanes): False for any NaN or ±Inf anywhere, and for a sum that overflows."""
    from attndsl.lowering.cpu.finite import all_finite
    x = torch.randn(numel, dtype=dtype)
    assert all_finite(x) and all_finite(x[::2])                         # non-contiguous: torch's sum
    for bad in (float("nan"), float("inf"), -float("inf")):
        for at in (0, numel // 2, numel - 1):
            y = x.clone()
            y[at] = bad
            assert not all_finite(y), (bad, at)
    assert not all_finite(torch.full((numel,), torch.finfo(dtype).max, dtype=dtype))

"""`position = t5(buckets, max_distance)`: a learned table tied in T5's log buckets."""
from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

import attndsl
from attndsl.ast import t5_slots

from conftest import RTOL, assert_close, shared


def t5_bucket(relative_position, bidirectional, num_buckets, max_distance):
    """T5's own `_relative_position_bucket` (transformers' T5Attention), relative_position = j − i."""
    relative_buckets = 0
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    large = max_exact + (torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return relative_buckets + torch.where(is_small, relative_position, large)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("buckets,reach", [(32, 128), (16, 64), (8, 20)])
def test_slots_are_t5_buckets_at_every_distance(buckets, reach, bidirectional):
    i, j = torch.arange(400)[:, None], torch.arange(400)[None]
    slots = torch.tensor(t5_slots(buckets, reach, bidirectional))
    assert torch.equal(slots[(i - j).clamp(-reach, reach) + reach], t5_bucket(j - i, bidirectional, buckets, reach))


def _spread(attn):
    """float64 parameters (the buckets' gradient compared at float64's tolerance), away from zero."""
    attn.double()
    with torch.no_grad():
        attn.position_table.copy_(0.5 * torch.randn_like(attn.position_table))


CASES = {   # the forms a table takes: quadratic (softmax), banded and pairwise (feature maps)
    "softmax-full": ("kernel = softmax; position = t5(buckets=8, max_distance=20)", "auto"),
    "softmax-causal": ("kernel = softmax; position = t5(buckets=8, max_distance=20); mask = causal", "auto"),
    "elu1-banded": ("kernel = elu1; position = t5(buckets=8, max_distance=20)", "banded"),
    "elu1-pairwise-causal": ("kernel = elu1; position = t5(buckets=8, max_distance=20); mask = causal", "pairwise"),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_the_reference_with_the_buckets_gradient(case):
    body, plan = CASES[case]
    attn = shared(f"attention t {{ {body} }}", init=_spread, heads=2, head_dim=8, value_dim=6, plan=plan)
    assert attn.position_table.shape == (2, 8)
    if plan != "auto":
        assert f"form {plan}" in attn.explain()
    q, k, v = (torch.randn(2, 2, 45, d, dtype=torch.float64) for d in (8, 8, 6))
    g = torch.randn(2, 2, 45, 6, dtype=torch.float64)
    out, ref = attn(q, k, v), attn.reference(q, k, v)
    assert_close("out", ref, out, 5 * RTOL[torch.float64])
    got = torch.autograd.grad((out * g).sum(), attn.position_table)[0]
    want = torch.autograd.grad((ref * g).sum(), attn.position_table)[0]
    assert got.shape == (2, 8) and got.abs().sum() > 0
    assert_close("d buckets", want, got, 50 * RTOL[torch.float64])
    small = [t[:1, :, :7].clone().requires_grad_() for t in (q, k, v)]
    table = attn.position_table.detach().double().clone().requires_grad_()

    def f(q, k, v, table):
        return functional_call(attn, {"position_table": table}, (q, k, v))
    assert torch.autograd.gradcheck(f, (*small, table), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("body, message", [
    ("position = t5(buckets=2)", "needs buckets >= 4"),
    ("position = t5(buckets=32, max_distance=8)", "max_distance must exceed 8"),
    ("position = t5(buckets=32, max_distance=16); mask = causal", "max_distance must exceed 16"),
])
def test_buckets_without_logarithmic_ones_are_a_located_error(body, message):
    with pytest.raises(attndsl.SpecError, match=message) as e:
        attndsl.parse(f"attention t {{ kernel = softmax; {body} }}")
    assert "^" in str(e.value) and "t5(buckets=32, max_distance=128)" in str(e.value)

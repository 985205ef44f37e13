"""Token-by-token decoding (attndsl/decoding.py): each step equals the full causal forward's row."""
from __future__ import annotations

import pytest
import torch

import attndsl
from attndsl import SpecError

from conftest import RTOL, assert_close, shared

# every φ family the step computes (elementwise fused, exp stabilized and not, cos), with and
# without a decayed position term, and a floor
DECODABLE = {
    "elu1": "kernel = elu1; mask = causal",
    "relu-eps": "kernel = relu; eps = 0.01; mask = causal",
    "favor": "kernel = favor(features=16); mask = causal",
    "favor-plain": "kernel = favor(features=8, stabilize=false); eps = 1e-3; mask = causal",
    "hyperbolic": "kernel = hyperbolic(features=8); mask = causal",
    "alibi": "kernel = elu1; position = alibi; mask = causal",
    "favor-affine": "kernel = favor(features=16); position(r) = 1 - 0.2 * abs(r); mask = causal",
    "trig-decay": "kernel = trig(features=8); position(r) = -0.1 * abs(r); mask = causal",
}


def module(case: str):
    return shared(f"attention t {{ {DECODABLE[case]} }}", heads=2, head_dim=8, value_dim=6)


def tokens(B, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 2, N, d, generator=g).to(dtype) for d in (8, 8, 6)]


def decode(attn, q, k, v, state=None):
    """Every token's step output, concatenated (B, H, N, Dv), and the last state."""
    state = attn.initial_state(q.shape[0], dtype=q.dtype) if state is None else state
    outs = []
    with torch.no_grad():
        for i in range(q.shape[2]):
            out, state = attn.step(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], state)
            outs.append(out)
    return torch.cat(outs, 2), state


# every case in float64; float32 for one of each φ family's kind
CASES = [(c, torch.float64) for c in DECODABLE] + [(c, torch.float32) for c in ("elu1", "favor", "alibi")]


@pytest.mark.parametrize("case,dtype", CASES, ids=[f"{c}-{str(d)[-2:]}" for c, d in CASES])
def test_steps_equal_the_full_causal_forward(case, dtype):
    attn = module(case)
    q, k, v = tokens(2, 23, dtype)
    with torch.no_grad():
        full = attn(q, k, v)
    got, state = decode(attn, q, k, v)
    assert got.dtype == dtype and state.length == 23
    assert_close(case, full, got, 5 * RTOL[dtype])
    assert_close(f"{case} vs §2", attn.reference(q.double(), k.double(), v.double()), got, 5 * RTOL[dtype])


@pytest.mark.parametrize("case", ["favor", "alibi"])
def test_grouped_heads_step_as_the_full_forward(case):
    attn = module(case)
    q, k, v = tokens(2, 9, torch.float64)
    k, v = k[:, :1], v[:, :1]                  # one kv head for the two query heads
    with torch.no_grad():
        full = attn(q, k, v)
    got, _ = decode(attn, q, k, v)
    assert_close(case, full, got, 5 * RTOL[torch.float64])
    assert_close(f"{case} vs §2", attn.reference(q, k, v), got, 5 * RTOL[torch.float64])


def test_a_state_is_never_written_so_it_can_be_stepped_twice():
    attn = module("favor")
    q, k, v = tokens(1, 6, torch.float64)
    _, state = decode(attn, q[:, :, :4], k[:, :, :4], v[:, :, :4])
    s, shift = state.s.clone(), state.shift.clone()
    a, _ = decode(attn, q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], state)
    b, _ = decode(attn, q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], state)
    assert torch.equal(a, b) and torch.equal(state.s, s) and torch.equal(state.shift, shift)


def test_half_precision_steps_keep_a_float32_state():
    attn = module("elu1")
    q, k, v = tokens(1, 5, torch.bfloat16)
    got, state = decode(attn, q, k, v)
    assert got.dtype == torch.bfloat16 and state.dtype == torch.float32
    with torch.no_grad():
        assert_close("bf16", attn(q, k, v).float(), got.float(), RTOL[torch.bfloat16])


@pytest.mark.parametrize("body, match", [
    ("kernel = elu1", "no causal mask"),
    ("kernel = softmax; mask = causal", "cannot be decoded token by token"),
    ("kernel = elu1; position = toeplitz(max_distance=4); mask = causal", "the forms decayed, prefix_sum"),
])
def test_specs_without_a_running_state_are_refused(body, match):
    attn = attndsl.compile(f"attention t {{ {body} }}", heads=2, head_dim=8, dtype=None)
    with pytest.raises(SpecError, match=match):
        attn.initial_state(1)


def test_bad_steps_say_what_is_wrong():
    attn = module("elu1")
    q, k, v = tokens(2, 3, torch.float32)
    state = attn.initial_state(2)
    with pytest.raises(ValueError, match="takes one token"):
        attn.step(q, k, v, state)
    with pytest.raises(ValueError, match="takes one token"):
        attn.step(q[:, :, :1], k, v, state)
    with pytest.raises(ValueError, match="holds 3 sequences"):
        attn.step(q[:, :, :1], k[:, :, :1], v[:, :, :1], attn.initial_state(3))
    with pytest.raises(TypeError, match="initial_state\\(batch, dtype=torch.float64\\)"):
        attn.step(*(t[:, :, :1].double() for t in (q, k, v)), state)
    with pytest.raises(TypeError, match="DecodeState"):
        attn.step(q[:, :, :1], k[:, :, :1], v[:, :, :1], None)
    with pytest.raises(RuntimeError, match="torch.no_grad"):
        attn.step(q[:, :, :1].requires_grad_(), k[:, :, :1], v[:, :, :1], state)

"""Compiled linear forms vs the O(N²) reference: every kernel map × {full, causal} × dtype,
forward and backward, float64 gradcheck, torch.compile and opcheck."""
from __future__ import annotations

import pytest
import torch

import attndsl
from attndsl import ops
from attndsl.ir import postorder

from conftest import RTOL, assert_close, assert_matches_reference, shared

KERNELS = {
    "relu": "kernel = relu",
    "elu1": "kernel = elu1",
    "exp_shift": "kernel = exp_shift",
    "favor": "kernel = favor(features=32, seed=3)",
    "favor_plain": "kernel = favor(features=24, orthogonal=false, stabilize=false, seed=1)",
    "hyperbolic": "kernel = hyperbolic(features=16)",
    "trig": "kernel = trig(features=32, sigma=4.0)",
    "user": "kernel(x) = softplus(x) ** 2 + 0.01",
}
MASKS = {"full": "", "causal": "mask = causal"}


def spec(kernel: str, mask: str) -> str:
    return f"attention t {{\n    {KERNELS[kernel]}\n    {MASKS[mask]}\n}}\n"


def compiled(kernel: str, mask: str, heads=2, head_dim=8, value_dim=6) -> attndsl.Attention:
    return shared(spec(kernel, mask), heads=heads, head_dim=head_dim, value_dim=value_dim)


def inputs(B, H, N, Dk, Dv, dtype, kernel="relu"):
    q, k, v = torch.randn(B, H, N, Dk), torch.randn(B, H, N, Dk), torch.randn(B, H, N, Dv)
    if kernel == "relu":          # keep every row's normalizer away from 0
        q, k = q.abs() + 0.1, k.abs() + 0.1
    return [t.to(dtype) for t in (q, k, v)]


CASES = [(kern, mask) for kern in KERNELS for mask in MASKS]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kernel,mask", CASES, ids=[f"{k}-{m}" for k, m in CASES])
def test_forward_backward_match_reference(kernel, mask, dtype):
    attn = compiled(kernel, mask)
    q, k, v = inputs(2, 2, 37, 8, 6, dtype, kernel)
    out = assert_matches_reference(attn, q, k, v, dtype)
    assert out.dtype == dtype and out.shape == (2, 2, 37, 6)


@pytest.mark.parametrize("kernel,mask", CASES, ids=[f"{k}-{m}" for k, m in CASES])
def test_gradcheck_float64(kernel, mask):
    attn = compiled(kernel, mask)            # the float64 kernels test_forward_backward_match_reference builds
    q, k, v = (t.requires_grad_() for t in inputs(1, 2, 5, 8, 6, torch.float64, kernel))
    assert torch.autograd.gradcheck(attn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 1000], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("mask", ["full", "causal"])
def test_one_build_serves_every_length(mask, n):
    attn = compiled("elu1", mask)
    q, k, v = inputs(1, 2, n, 8, 6, torch.float32, "elu1")
    assert_close("out", attn.reference(q.double(), k.double(), v.double()), attn(q, k, v), 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_inputs_accumulate_in_float32(dtype):
    attn = compiled("elu1", "causal")
    q, k, v = inputs(2, 2, 200, 8, 6, torch.float32, "elu1")
    out = attn(q.to(dtype), k.to(dtype), v.to(dtype))
    assert out.dtype == dtype
    ref = attn.reference(*(t.to(dtype).double() for t in (q, k, v)))
    assert_close("out", ref, out, RTOL[dtype])


def test_favor_does_not_overflow_in_float32_at_65536():
    """Inputs aligned with a random feature w: exp(w·x − |x|²/2) = exp(|w|²/2) ≈ e^128 overflows
    float32 unless stabilized; the stabilized float32 run matches the float64 run."""
    text = "attention t {{ kernel = favor(features=64, stabilize={}, seed=0); mask = causal }}"
    attn = attndsl.compile(text.format("true"), heads=1, head_dim=256, value_dim=4)
    bare = attndsl.compile(text.format("false"), heads=1, head_dim=256, value_dim=4)
    n, root_s = 65536, 256 ** -0.25
    w = attn.projection[0]
    assert (w @ w) / 2 > 100                              # e^(|w|²/2) > float32 max
    q, k = (w / root_s + 0.2 * torch.randn(1, 1, n, 256) for _ in range(2))
    v = torch.randn(1, 1, n, 4)
    out = attn(q, k, v)
    assert torch.isfinite(out).all()
    assert_close("out", attn(q.double(), k.double(), v.double()), out, 1e-4)
    assert not torch.isfinite(bare(q, k, v)).all()        # the same inputs without the stabilizer


def test_projection_is_seeded_and_exposed():
    a, b = compiled("favor", "full"), attndsl.compile(spec("favor", "full"), heads=2, head_dim=8,
                                                      value_dim=6)
    assert a.projection.shape == (32, 8)
    torch.testing.assert_close(a.projection, b.projection)
    assert compiled("hyperbolic", "full").projection.shape == (32, 8)     # [W; −W]
    assert compiled("relu", "full").projection is None


def test_torch_compile_fullgraph():
    # built for float32 up front (compile()'s default): a library cannot be built while dynamo traces
    attn = attndsl.compile(spec("favor", "causal"), heads=2, head_dim=8, value_dim=6)
    q, k, v = inputs(2, 2, 33, 8, 6, torch.float32, "favor")
    fn = torch.compile(attn, fullgraph=True, dynamic=True)
    qc = q.clone().requires_grad_()
    out = fn(qc, k, v)
    assert_close("out", attn(q, k, v), out, 1e-6)
    out.sum().backward()
    assert qc.grad is not None and torch.isfinite(qc.grad).all()
    q2, k2, v2 = inputs(1, 2, 50, 8, 6, torch.float32, "favor")     # another length, same graph
    assert_close("out", attn(q2, k2, v2), fn(q2, k2, v2), 1e-6)


@pytest.mark.parametrize("mask", ["full", "causal"])
def test_opcheck(mask):
    attn = compiled("favor", mask)
    lib = attn._library("float64")
    x = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    w, wt = attn._projection(torch.float64)
    torch.library.opcheck(ops.feature_map, (x, w, wt, lib, "feature_map1", 32))
    qf = torch.rand(2, 9, 32, dtype=torch.float64, requires_grad=True) + 0.1
    kf = torch.rand(2, 9, 32, dtype=torch.float64, requires_grad=True) + 0.1
    v = torch.randn(2, 9, 6, dtype=torch.float64, requires_grad=True)
    name = next(f"{n.op}{i}" for i, n in enumerate(postorder(attn.planned.root))
                if n.op == "linear_attention")
    torch.library.opcheck(ops.linear_attention, (qf, kf, v, v.new_zeros(1, 1), v.new_zeros(0, 0, dtype=torch.bool),
                                                 lib, name))


def test_non_contiguous_inputs_are_accepted():
    attn = compiled("elu1", "full")
    q, k, v = inputs(2, 2, 10, 8, 6, torch.float32, "elu1")
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)        # same values, other strides
    assert not qt.is_contiguous()
    torch.testing.assert_close(attn(qt, k, v), attn(q, k, v))


def test_explain_shows_plan_kernels_and_every_pass():
    attn = compiled("favor", "causal")
    attn(*inputs(1, 2, 5, 8, 6, torch.float32, "favor"))       # built at the first call
    text = attn.explain()
    for piece in ("prefix_sum", "quadratic O(N²)", "feature_map", "_fwd", "IR after ir",
                  "IR after linearize", "IR after plan", "build float32"):
        assert piece in text


def test_compile_builds_the_dtype_it_is_given_and_the_others_at_their_first_call():
    text = spec("elu1", "causal")
    default = attndsl.compile(text, heads=2, head_dim=8)
    f64 = attndsl.compile(text, heads=2, head_dim=8, dtype=torch.float64)
    lazy = attndsl.compile(text, heads=2, head_dim=8, dtype=None)
    half = attndsl.compile(text, heads=2, head_dim=8, dtype=torch.bfloat16)
    assert [sorted(d for _, d in m._libs) for m in (default, f64, lazy, half)] == [["float32"], ["float64"], [], ["float32"]]
    lazy(*inputs(1, 2, 5, 8, 8, torch.float64, "elu1"))
    assert sorted(d for _, d in lazy._libs) == ["float64"]
    with pytest.raises(ValueError, match=r"dtype must be torch.float32, .* or None .*got torch.int32"):
        attndsl.compile(text, heads=2, head_dim=8, dtype=torch.int32)


def test_a_replaced_or_rewritten_projection_is_what_the_kernels_use():
    """The module keeps its projection per dtype between calls: a buffer replaced (possibly at the
    old one's address) or written in place is picked up by the next call."""
    attn = attndsl.compile("attention t { kernel = favor(features=8); mask = causal }", heads=1, head_dim=4)
    q, k, v = inputs(1, 1, 6, 4, 4, torch.float32, "favor")
    with torch.no_grad():
        for _ in range(5):
            attn.projection = torch.randn(8, 4)
            assert_close("replaced", attn.reference(q.double(), k.double(), v.double()), attn(q, k, v), 1e-5)
            attn.projection.mul_(0.5)
            assert_close("in place", attn.reference(q.double(), k.double(), v.double()), attn(q, k, v), 1e-5)

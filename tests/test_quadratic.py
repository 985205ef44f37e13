"""The quadratic form (softmax, flash-style TVM kernels) vs the O(N²) reference: every position
kind × mask × dtype, forward and backward (d position_table included), float64 gradcheck, apply =
values beside it, lengths one build serves, huge logits, opcheck, torch.compile, the plan, grouped
heads read without a copy."""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

import attndsl
from attndsl import ops
from attndsl.ir import SoftmaxAttention, postorder

from conftest import RTOL, assert_close, shared, spy_on

POSITIONS = {
    "none": "position = none",
    "table": "position = toeplitz(max_distance=6, init=normal)",       # clipped: N ≫ W
    "table_full": "position = toeplitz(max_distance=80, init=normal)",  # W ≥ N: every r its own slot
    "alibi": "position = alibi",
    "alibi_slope": "position = alibi(slope=0.3)",
    "user": "position(r) = -0.05 * abs(r) + 0.5 * sin(r / 3)",
}
CASES = [(p, "scores", m) for p in POSITIONS for m in ("full", "causal")]
CASES += [(p, "values", m) for p in ("table", "user") for m in ("full", "causal")]
IDS = [f"{p}-{a}-{m}" for p, a, m in CASES]

def spec(position: str, apply: str = "scores", mask: str = "full") -> str:
    return (f"attention t {{\n    kernel = softmax\n    {POSITIONS[position]}\n"
            f"    apply = {apply}\n    mask = {'causal' if mask == 'causal' else 'none'}\n}}\n")


def compiled(position, apply="scores", mask="full", head_dim=8, value_dim=6) -> attndsl.Attention:
    return shared(spec(position, apply, mask), heads=2, head_dim=head_dim, value_dim=value_dim)


def inputs(B, N, Dk, Dv, dtype, spread=1.0):
    q, k, v = spread * torch.randn(B, 2, N, Dk), spread * torch.randn(B, 2, N, Dk), torch.randn(B, 2, N, Dv)
    return [t.to(dtype) for t in (q, k, v)]


def grads(attn, out, q, k, v, g):
    params = [q, k, v] + ([attn.position_table] if attn.position_table is not None else [])
    return torch.autograd.grad(out, params, g)


def check_against_reference(attn, B, N, Dk, Dv, dtype, spread=1.0, out_tol=5.0, grad_tol=50.0):
    q, k, v = (t.requires_grad_() for t in inputs(B, N, Dk, Dv, dtype, spread))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, ref = attn(q, k, v), attn.reference(q64, k64, v64)
    assert out.dtype == dtype and out.shape == (B, 2, N, Dv)
    assert_close("out", ref, out, out_tol * RTOL[dtype])
    g = torch.randn_like(ref)
    names = ("dq", "dk", "dv", "dtable")
    for name, a, b in zip(names, grads(attn, ref, q64, k64, v64, g), grads(attn, out, q, k, v, g.to(dtype))):
        assert_close(name, a, b, grad_tol * RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("position,apply,mask", CASES, ids=IDS)
def test_forward_backward_match_reference(position, apply, mask, dtype):
    # N = 70 crosses tile borders in both dtypes (tiles of 32 or 64 rows in float32, 16 or 32 in float64)
    check_against_reference(compiled(position, apply, mask), 2, 70, 8, 6, dtype)


@pytest.mark.parametrize("mask", ["full", "causal"])
@pytest.mark.parametrize("position", ["none", "table"])
def test_head_dim_64_register_tiles(position, mask):
    """Dk = Dv = 64: the register tiles of the real sizes (4 rows × 64 lanes in float32)."""
    attn = compiled(position, "scores", mask, head_dim=64, value_dim=64)
    check_against_reference(attn, 1, 150, 64, 64, torch.float32)


# n = 35 crosses a tile border (float64 tiles hold 16 rows with AVX2, 32 with AVX-512)
GRADCHECK = [(*c, 6) for c in CASES] + [("table", "scores", "causal", 35), ("table_full", "scores", "full", 35),
                                        ("user", "scores", "causal", 35)]


@pytest.mark.parametrize("position,apply,mask,n", GRADCHECK, ids=[f"{p}-{a}-{m}-n{n}" for p, a, m, n in GRADCHECK])
def test_gradcheck_float64(position, apply, mask, n):
    attn = compiled(position, apply, mask)
    q, k, v = (t.requires_grad_() for t in inputs(1, n, 8, 6, torch.float64))
    if attn.position_table is None:
        assert torch.autograd.gradcheck(attn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)
        return
    table = attn.position_table.detach().double().requires_grad_()

    def f(q, k, v, table):
        return functional_call(attn, {"position_table": table}, (q, k, v))
    assert torch.autograd.gradcheck(f, (q, k, v, table), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 17, 64, 130])
def test_one_build_serves_every_length(n):
    attn = compiled("table", "scores", "causal")
    check_against_reference(attn, 1, n, 8, 6, torch.float32)
    assert sum(e.startswith("float32") for e in attn._build_log) == 1    # built (or loaded) once


@pytest.mark.parametrize("mask", ["full", "causal"])
def test_large_logits_do_not_overflow(mask):
    """Logits of several thousand overflow exp in any dtype; the running max keeps every exp ≤ 1."""
    attn = compiled("alibi", "scores", mask)
    q, k, v = inputs(1, 90, 8, 6, torch.float32, spread=40.0)
    with torch.no_grad():
        out = attn(q, k, v)
        ref = attn.reference(q.double(), k.double(), v.double())
    assert torch.isfinite(out).all()
    assert_close("out", ref, out, 1e-4)


def test_large_table_values_do_not_overflow():
    attn = compiled("table", "scores", "causal")
    with torch.no_grad():
        attn.position_table.normal_().mul_(30).add_(120)
    try:
        check_against_reference(attn, 1, 50, 8, 6, torch.float32, grad_tol=500.0)
    finally:
        with torch.no_grad():
            attn.position_table.normal_()


def test_table_gradient_reaches_the_parameter_and_trains():
    attn = compiled("table_full", "scores", "full")
    q, k, v = inputs(2, 40, 8, 6, torch.float32)
    before = attn.position_table.detach().clone()
    opt = torch.optim.SGD(attn.parameters(), lr=0.5)
    loss = attn(q, k, v).square().mean()
    loss.backward()
    assert attn.position_table.grad is not None and attn.position_table.grad.abs().sum() > 0
    opt.step()
    attn.zero_grad()
    assert not torch.equal(before, attn.position_table.detach())
    assert attn(q, k, v).square().mean() < loss


@pytest.mark.parametrize("kv_rows", [2, 1], ids=["heads", "grouped"])
@pytest.mark.parametrize("position", ["none", "table"])
def test_opcheck(position, kv_rows):
    """The op with a key row per query row, and grouped (two query rows reading one key row:
    its backward sums their dk, dv)."""
    attn = compiled(position, "scores", "causal")
    lib = attn._library("float64")
    name = next(f"{n.op}{i}" for i, n in enumerate(postorder(attn.planned.root)) if n.op == "softmax_attention")
    q = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(kv_rows, 9, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(kv_rows, 9, 6, dtype=torch.float64, requires_grad=True)
    tab = (torch.randn(2, 13, dtype=torch.float64, requires_grad=True) if position == "table"
           else torch.zeros(1, 1, dtype=torch.float64))
    torch.library.opcheck(ops.softmax_attention, (q, k, v, tab, k.new_zeros(k.shape[:2]), lib, name))


# (position, mask, dtype, N): the narrow kernels (float32, N ≤ one vector of lanes) and the wide ones
GROUPED = [("alibi", "causal", torch.float32, 9), ("alibi", "causal", torch.float32, 70),
           ("table", "full", torch.float32, 70), ("user", "causal", torch.float64, 70)]


@pytest.mark.parametrize("position,mask,dtype,n", GROUPED,
                         ids=[f"{p}-{m}-{str(d)[-2:]}-n{n}" for p, m, d, n in GROUPED])
def test_grouped_heads_read_the_shared_kv_head_without_a_copy(position, mask, dtype, n, monkeypatch):
    """Multi-query k and v (one kv head for the two query heads) with a position term or a causal
    mask: the kernels read the kv head for both query heads (no copy to two heads), and output and
    gradients equal those of k and v expanded to two heads, a key padding mask included."""
    attn = compiled(position, "scores", mask)
    seen = spy_on(monkeypatch, "softmax_attention")
    B = 3
    q = torch.randn(B, 2, n, 8, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, 1, n, d, dtype=dtype, requires_grad=True) for d in (8, 6))
    mask_ = torch.zeros(B, n, dtype=torch.bool)
    mask_[1, n // 2:] = True
    qe, ke, ve = (t.detach().clone().requires_grad_() for t in (q, k.expand(B, 2, n, 8), v.expand(B, 2, n, 6)))
    out, want = attn(q, k, v, key_padding_mask=mask_), attn(qe, ke, ve, key_padding_mask=mask_)
    assert [(a[0], b[0]) for a, b, _ in seen] == [(B * 2, B), (B * 2, B * 2)]
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g)
    torch.testing.assert_close(q.grad, qe.grad, rtol=0, atol=0)
    torch.testing.assert_close(k.grad, ke.grad.sum(1, keepdim=True), rtol=0, atol=0)
    torch.testing.assert_close(v.grad, ve.grad.sum(1, keepdim=True), rtol=0, atol=0)


def test_grouped_heads_gradcheck_float64():
    """One kv head for two query heads, a learned table, causal, across a tile border."""
    attn = compiled("table", "scores", "causal")
    q = torch.randn(1, 2, 35, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 35, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 35, 6, dtype=torch.float64, requires_grad=True)
    table = attn.position_table.detach().double().requires_grad_()

    def f(q, k, v, table):
        return functional_call(attn, {"position_table": table}, (q, k, v))
    assert torch.autograd.gradcheck(f, (q, k, v, table), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_torch_compile_fullgraph():
    attn = compiled("table", "scores", "causal")
    fn = torch.compile(attn, fullgraph=True, dynamic=True)
    q, k, v = inputs(1, 33, 8, 6, torch.float32)
    want = attn(q, k, v)                 # eager first: builds the kernels a lazy module lacks
    torch.testing.assert_close(fn(q, k, v), want)
    k1, v1 = k[:, :1], v[:, :1]          # grouped heads: one kv head for both query heads
    torch.testing.assert_close(fn(q, k1, v1), attn(q, k1, v1))


def test_torch_compile_of_an_unbuilt_module_says_what_to_do():
    attn = attndsl.compile("attention t { position = alibi }", heads=2, head_dim=8, value_dim=6, dtype=None)
    q, k, v = inputs(1, 33, 8, 6, torch.float32)
    with pytest.raises(Exception, match="cannot build them while it traces: compile with dtype=torch.float32"):
        torch.compile(attn, fullgraph=True)(q, k, v)


def test_plan_and_explain_show_the_quadratic_form():
    attn = compiled("user", "scores", "causal")
    [decision] = attn.planned.decisions
    assert decision.form == "quadratic" and isinstance(decision.site, SoftmaxAttention)
    text = attn.explain()
    assert "softmax_attention: quadratic" in text and "IR after fuse_softmax" in text
    assert "form quadratic, causal=True" in text and "sin((r / 3))" in text


def test_values_term_sits_beside_the_quadratic_form():
    forms = sorted(d.form for d in compiled("table", "values", "causal").planned.decisions)
    assert forms == ["quadratic", "values_fft"]

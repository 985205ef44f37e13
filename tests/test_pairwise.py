"""The pairwise form: its kernels against the maths in torch (every position kind, causal or not,
ragged lengths, the row shift at extreme bias ranges), and as a module against the reference,
forward, backward and a float64 gradcheck, grouped heads read without a copy."""
import pytest
import torch

from attndsl.parse import parse

from conftest import assert_masked_matches_reference, assert_matches_reference, shared, spy_on

POSITIONS = {
    "none": None,
    "table": "position = toeplitz(max_distance=8)",
    "alibi": "position = alibi",
    # b spans ±60 over N = 77: without the row shift, exp(b) overflows float32's ±88 in the sums
    "steep": "position(r) = 0.8 * abs(r) - 0.3 * r",
}


def _kernels(M, D, dtype, causal, position):
    from attndsl.lowering.build import build, resolve_target
    from attndsl.lowering.cpu import pairwise
    pos = None
    if position is not None:
        pos = parse(f"attention t {{\n kernel = relu\n {position}\n}}").block(None).position
    return build({"f": pairwise.pairwise_forward("f", M, D, dtype, causal, pos, eps=None),
                  "b": pairwise.pairwise_backward("b", M, D, dtype, causal, pos, pos is not None
                                                  and pos.name == "toeplitz")},
                 resolve_target("llvm")), pos


def _bias(kind, tab, N):
    r = (torch.arange(N)[:, None] - torch.arange(N)[None, :]).double()
    if kind == "none":
        return torch.zeros(1, N, N, dtype=torch.float64)
    if kind == "table":
        W = (tab.shape[1] - 1) // 2
        return tab[:, (r.long().clamp(-W, W) + W)]
    if kind == "alibi":
        return -tab[:, :1, None] * r.abs()
    return (0.8 * r.abs() - 0.3 * r)[None]


@pytest.mark.parametrize("kind", POSITIONS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_kernels_match_torch(kind, causal):
    """Forward (out, and the normalizer up to each row's shift) and backward (Qf, Kf, V and a
    table's gradient) in float64 at a ragged length, H = 2 heads over BH = 4 rows."""
    M, D, N, H, BH = 16, 8, 77, 2, 4
    lib, pos = _kernels(M, D, "float64", causal, POSITIONS[kind])
    g = torch.Generator().manual_seed(2)
    qf, kf = (torch.rand(BH, N, M, generator=g, dtype=torch.float64) + 0.1 for _ in range(2))
    v, dout = (torch.randn(BH, N, D, generator=g, dtype=torch.float64) for _ in range(2))
    tab = {"table": 0.5 * torch.randn(H, 17, generator=g, dtype=torch.float64),
           "alibi": torch.tensor([[0.5], [0.125]], dtype=torch.float64)}.get(kind, torch.zeros(1, 1, dtype=torch.float64))
    out, den = torch.empty_like(v), torch.empty(BH, N, dtype=torch.float64)
    lib["f"](qf, kf, v, tab, out, den)

    leaves = [t.clone().requires_grad_() for t in (qf, kf, v, tab)]
    b = _bias(kind, leaves[3], N).repeat(BH // _bias(kind, tab, N).shape[0], 1, 1)
    r = torch.arange(N)[:, None] - torch.arange(N)[None, :]
    mask = (r >= 0) if causal else torch.ones(N, N, dtype=torch.bool)
    shift = b.detach().masked_fill(~mask, -torch.inf).amax(-1, keepdim=True)     # each row's max b
    a = (b - shift).exp() * (leaves[0] @ leaves[1].transpose(1, 2)) * mask
    ref_den = a.sum(-1)
    ref = (a @ leaves[2]) / ref_den[..., None]
    torch.testing.assert_close(out, ref.detach(), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(den, ref_den.detach(), rtol=1e-9, atol=1e-12)
    grads = torch.autograd.grad(ref, leaves, dout, allow_unused=True)
    mine = [torch.empty_like(t) for t in (qf, kf, v)] + [torch.zeros_like(tab)]
    lib["b"](qf, kf, v, tab, out, den, dout, *mine)
    for got, want in zip(mine[:3], grads[:3]):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    if kind == "table":
        torch.testing.assert_close(mine[3], grads[3], rtol=1e-8, atol=1e-10)


SPECS = {
    "table-causal": "attention t { kernel = elu1; mask = causal; position = toeplitz(max_distance=16, init=normal) }",
    "smooth-full": "attention t { kernel = favor(features=8); position(r) = -0.1 * log(1 + abs(r)) }",
    "alibi-eps": "attention t { kernel = relu; position = alibi; eps = 1e-3 }",
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", SPECS)
def test_forced_pairwise_matches_the_reference(name, dtype):
    attn = shared(SPECS[name], heads=2, head_dim=8, plan="pairwise")
    assert [d.form for d in attn.planned.decisions] == ["pairwise"]
    q, k, v = (torch.randn(2, 2, 45, 8) for _ in range(3))
    assert_matches_reference(attn, q, k, v, dtype)


def test_pairwise_gradcheck_with_a_learned_table():
    attn = shared(SPECS["table-causal"], heads=2, head_dim=8, plan="pairwise")
    q, k, v = (torch.randn(1, 2, 13, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(attn, (q, k, v), eps=1e-6, atol=1e-6)
    (mine,) = torch.autograd.grad(attn(q, k, v).sum(), attn.position_table)
    (want,) = torch.autograd.grad(attn.reference(q, k, v).sum(), attn.position_table)
    torch.testing.assert_close(mine, want, rtol=1e-5, atol=1e-7)   # float32 parameter, float64 maths


@pytest.mark.parametrize("text, forms", [
    ("attention t { kernel = elu1; position(r) = -0.02 * abs(r) + 0.5 * cos(r / 16) }", ("pairwise", "toeplitz_fft")),
    ("attention t { kernel = relu; mask = causal; position = toeplitz(max_distance=8, init=normal) }",
     ("pairwise", "banded")),
])
def test_each_call_runs_the_plan_chosen_for_its_length(text, forms):
    """One module, a plan per range of N (the cost model's crossover), each call on its own plan
    and equal to the reference, forward and backward; explain(n=) names the choice."""
    attn = shared(text, heads=2, head_dim=8)
    spans = attn._spans
    assert tuple(attn.plans[i].forms[0] for *_, i in spans) == forms
    (a0, b0, _), (a1, _, _) = spans
    assert f"N {a0}–{b0}: {forms[0]} · N ≥ {a1}: {forms[1]}" in attn.explain()
    # inside the spans (the FFT's cost steps up past each power of two)
    for n, form in ((max(b0 // 2, 2), forms[0]), (1 << (a1 - 1).bit_length(), forms[1])):
        assert attn.plans[attn._plan_index(n, torch.float64)].forms == (form,)
        assert f"positional_attention: {form}" in attn.explain(n)
        q, k, v = (torch.randn(1, 2, n, 8) for _ in range(3))
        assert_matches_reference(attn, q, k, v, torch.float64)


# --- grouped heads: the kernels read a kv head's features for each of its query heads ------------

@pytest.mark.parametrize("dtype,n", [(torch.float32, 9), (torch.float32, 45), (torch.float64, 45)],
                         ids=["f32-narrow", "f32", "f64"])
@pytest.mark.parametrize("name", SPECS)
def test_grouped_heads_read_the_shared_kv_head_without_a_copy(name, dtype, n, monkeypatch):
    """One kv head for two query heads with a position term: φ(k) is computed once per kv head
    and the kernels read it for both query heads (no copy of k, v or the features), against the
    reference, forward and backward, under a key padding mask."""
    attn = shared(SPECS[name], heads=2, head_dim=8, plan="pairwise")
    seen = spy_on(monkeypatch, "pairwise_attention")
    B = 3
    q = torch.randn(B, 2, n, 8)
    k, v = (torch.randn(B, 1, n, 8) for _ in range(2))
    mask = torch.zeros(B, n, dtype=torch.bool)
    mask[1, n // 2:] = True
    assert_masked_matches_reference(attn, q, k, v, mask, dtype)
    assert [(a[0], b[0]) for a, b, _ in seen] == [(B * 2, B)]


def test_grouped_heads_gradcheck_and_opcheck_float64():
    from attndsl import ops
    from attndsl.ir import postorder
    attn = shared(SPECS["table-causal"], heads=2, head_dim=8, plan="pairwise")
    q = torch.randn(1, 2, 13, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 1, 13, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(attn, (q, k, v), eps=1e-6, atol=1e-6)
    name = next(f"{n.op}{i}" for i, n in enumerate(postorder(attn.planned.root)) if n.op == "positional_attention")
    qf = torch.rand(2, 9, 8, dtype=torch.float64, requires_grad=True) + 0.1
    kf = torch.rand(1, 9, 8, dtype=torch.float64, requires_grad=True) + 0.1      # grouped: one key row
    vv = torch.randn(1, 9, 8, dtype=torch.float64, requires_grad=True)
    tab = torch.randn(2, 33, dtype=torch.float64, requires_grad=True)
    empty = torch.tensor([[False] * 8 + [True]] * 2)
    torch.library.opcheck(ops.pairwise_attention, (qf, kf, vv, tab, empty, attn._library("float64"), name))


def test_grouped_heads_rows_far_from_every_kept_key(monkeypatch):
    """A batch element whose rows see only keys far away (weights e^(−60)) reruns in float64 on
    its own (module._split), its one kv head still read by both query heads; the result matches
    the reference."""
    attn = shared("attention t { kernel = elu1; position(r) = -1.5 * abs(r); mask = causal }", heads=2,
                  head_dim=8, plan="pairwise")
    split, real = [], attn._split

    def spy(env, *rest):
        split.append(tuple(env["k"].shape))
        return real(env, *rest)
    monkeypatch.setattr(attn, "_split", spy)
    B, n = 3, 60
    q, k, v = torch.rand(B, 2, n, 8), torch.rand(B, 1, n, 8), torch.randn(B, 1, n, 8)
    mask = torch.zeros(B, n, dtype=torch.bool)
    mask[1, 20:] = True
    with pytest.warns(UserWarning, match="computes in float64: a row far from every key"):
        assert_masked_matches_reference(attn, q, k, v, mask, torch.float32)
    assert split == [(B, n, 8)]

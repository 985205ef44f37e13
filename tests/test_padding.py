"""Key padding masks (attndsl/padding.py): every form against the reference, forward and backward,
padded keys that carry NaN, rows with no key left, gradchecks, the sampled forms' draws, and
nn.MultiheadAttention against torch's module."""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import (RTOL, assert_close, assert_masked_matches_reference, gradcheck_with_table, shared,
                      shared_form, spy_on)

import attndsl
from attndsl import config, sampling
from attndsl.padding import KEY_OUT
from attndsl.schedules import cpu as cpu_schedule

pytestmark = pytest.mark.xdist_group("padding")

# name -> (spec, plan, the forms it runs)
SPECS = {
    "linear": ("attention a { kernel = elu1 }", "auto", ["linear"]),
    "prefix_sum": ("attention a { kernel = relu; mask = causal }", "auto", ["prefix_sum"]),
    "linear_favor": ("attention a { kernel = favor(features=8) }", "auto", ["linear"]),
    "prefix_favor": ("attention a { kernel = favor(features=8); mask = causal }", "auto", ["prefix_sum"]),
    "decayed": ("attention a { kernel = elu1; position = alibi; mask = causal }", "decayed", ["decayed"]),
    "decayed_two_way": ("attention a { kernel = elu1; position = alibi }", "decayed", ["decayed"]),
    "toeplitz_fft": ("attention a { kernel = elu1; position(r) = -0.1 * log(1 + abs(r)) }", "toeplitz_fft",
                     ["toeplitz_fft"]),
    "banded": ("attention a { kernel = elu1; position = toeplitz(max_distance=4, init=normal); mask = causal }",
               "banded", ["banded"]),
    "pairwise": ("attention a { kernel = favor(features=8); position(r) = -0.1 * abs(r) }", "pairwise",
                 ["pairwise"]),
    "values_fft": ("attention a { kernel = relu; position = toeplitz(max_distance=64, init=normal); "
                   "apply = values; mask = causal }", "auto", ["prefix_sum", "values_fft"]),
    "quadratic": ("attention a { position = alibi; mask = causal }", "auto", ["quadratic"]),
    "quadratic_table": ("attention a { position = toeplitz(max_distance=8, init=normal) }", "auto", ["quadratic"]),
}
B, H, N, D = 4, 2, 37, 8


def padding_mask(n: int = N) -> torch.Tensor:
    """(B, n): none; the last 10 and two inner keys; the first 12 (causal rows with no key); all."""
    m = torch.zeros(B, n, dtype=torch.bool)
    m[1, -10:] = True
    m[1, [3, 17]] = True
    m[2, :12] = True
    m[3] = True
    return m


def qkv(n=N, dtype=torch.float64, batch=B):
    return [torch.randn(batch, H, n, D, dtype=dtype) for _ in range(3)]


PORTABLE = attndsl.Target("llvm", kernels="portable")


def module(name, target="llvm"):
    return shared_form(SPECS[name], heads=H, head_dim=D, target=target)


def test_the_reference_is_sdpa_and_the_plain_sums_with_the_mask():
    from attndsl.reference import alibi_slopes, reference
    q, k, v = qkv()
    mask = padding_mask()
    keep = ~mask[:, None, None, :] & torch.ones(N, N, dtype=torch.bool).tril()
    r = torch.arange(N)
    bias = -alibi_slopes(H)[:, None, None] * (r[:, None] - r[None, :]).abs()
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(~keep, float("-inf")))
    got = reference(attndsl.parse(SPECS["quadratic"][0]).block(), q, k, v, key_padding_mask=mask)
    rows = keep.any(-1).expand(B, H, N)
    torch.testing.assert_close(got[rows], want[rows])
    assert (got[~rows] == 0).all()
    a = (torch.nn.functional.elu(q / D ** 0.25) + 1) @ (torch.nn.functional.elu(k / D ** 0.25) + 1).transpose(-1, -2)
    a = a * ~mask[:, None, None, :]                           # every key of b0..b2 finite: no NaN here
    want = (a @ v) / a.sum(-1, keepdim=True)
    got = reference(attndsl.parse(SPECS["linear"][0]).block(), q, k, v, key_padding_mask=mask)
    torch.testing.assert_close(got[:3], want[:3])
    assert (got[3] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(SPECS))
def test_every_form_leaves_padded_keys_out(name, dtype):
    attn = module(name)
    mask = padding_mask()
    out = assert_masked_matches_reference(attn, *qkv(), mask, dtype)
    if not attn.spec.causal or name == "values_fft":
        return
    # causal, left padding: the rows before the first kept key see none: 0
    assert (out[2, :, :12] == 0).all() and (out[3] == 0).all()


@pytest.mark.xdist_group("padding-portable")
@pytest.mark.parametrize("name", ["prefix_sum", "quadratic", "quadratic_table"])   # the kernels padding changed
def test_the_portable_kernels_leave_padded_keys_out(name):
    assert_masked_matches_reference(module(name, PORTABLE), *qkv(), padding_mask(), torch.float64)


@pytest.mark.parametrize("name", ["linear", "prefix_favor", "toeplitz_fft", "banded", "quadratic_table"])
def test_padded_keys_do_not_matter_even_when_not_finite(name):
    attn = module(name)
    mask = padding_mask()
    q, k, v = qkv(dtype=torch.float32)
    out = attn(q, k, v, key_padding_mask=mask)
    k2, v2 = k.clone(), v.clone()
    k2[mask[:, None, :, None].expand_as(k)] = float("nan")
    v2[1, 0, -1] = float("inf")
    k2[1, 1, 3] = 1e30
    out2 = attn(q, k2, v2, key_padding_mask=mask)
    assert torch.equal(out, out2)
    # a NaN in a kept key still reaches every row that sees it, and no other
    k2[0, 0, 5, 0] = float("nan")
    out3 = attn(q, k2, v2, key_padding_mask=mask)
    hit = out3.isnan().any(-1)
    assert hit[0, 0, 5:].all() and not hit[1:].any() and not hit[0, 1].any()
    assert attn.spec.causal == (not hit[0, 0, :5].any())


# decaying position terms: far from every kept key, a row's normalizer is tiny
FAR = {"fft_decaying": ("attention a { kernel = elu1; position(r) = -0.08 * abs(r) }", "toeplitz_fft"),
       "alibi_steep": ("attention a { kernel = elu1; position = alibi(slope=0.5); mask = causal }", "decayed"),
       "alibi_steep_two_way": ("attention a { kernel = elu1; position = alibi(slope=0.5) }", "decayed")}


def far(name):
    text, plan = FAR[name]
    return shared(text, heads=H, head_dim=D, plan=plan)


def test_rows_far_from_every_kept_key_are_right_or_refused():
    """A decaying position term gives a row far from every kept key a tiny normalizer: the
    Toeplitz-FFT form's condition takes the call to float64 (warned), as the decayed form's
    underflow does for a row inside a long run of padded keys; where float64 underflows too, it is
    refused. The decayed form computes the rows past the last kept key (and, without a causal
    mask, before the first) from the state there, exactly, in the call's dtype."""
    from attndsl.precision import PrecisionError
    q, k, v = (torch.randn(1, H, 256, D) for _ in range(3))
    tail, hole = torch.zeros(1, 256, dtype=torch.bool), torch.zeros(1, 256, dtype=torch.bool)
    tail[0, 100:] = True
    hole[0, 100:240] = True                  # rows 101–239 see key 99 at most, rows 240– their own
    for name, pad, warned in [("fft_decaying", tail, "cannot resolve this position term over the keys this key "
                                                     "padding mask keeps"),
                              ("alibi_steep", hole, "a row far from every key the key padding mask keeps")]:
        attn = far(name)
        with pytest.warns(UserWarning, match=warned):
            out = attn(q, k, v, key_padding_mask=pad)
        assert_close("out", attn.reference(q.double(), k.double(), v.double(), key_padding_mask=pad), out,
                     RTOL[torch.float32])
    q, k, v = (torch.randn(2, H, 1600, D) for _ in range(3))
    for name in ("alibi_steep", "alibi_steep_two_way"):
        attn = far(name)
        pad = torch.zeros(2, 1600, dtype=torch.bool)
        pad[:, 1500:] = True                 # rows up to 99 keys past the last kept one: e^−50 ...
        pad[0, :300] = not attn.spec.causal  # (two-way: and up to 300 before the first)
        pad[1, 100:] = True                  # ... and up to 1500: e^−750, beyond float64
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert_masked_matches_reference(attn, q[:1], k[:1], v[:1], pad[:1], torch.float32)
            out = attn(q, k, v, key_padding_mask=pad)[1:]
        # where the reference's weights underflow, a row past the last kept key (elu1: no floor)
        # equals its query's output at that key
        for i in (100, 700, 1599):
            moved = q[1:].clone()
            moved[:, :, 99] = q[1:, :, i]
            want = attn.reference(moved.double(), k[1:].double(), v[1:].double(), key_padding_mask=pad[1:])
            assert_close(f"row {i}", want[:, :, 99], out[:, :, i], RTOL[torch.float32])
    pad = torch.zeros(1, 1600, dtype=torch.bool)
    pad[0, 50:1580] = True                   # rows up to 1530 keys from a kept one, inside the run
    with pytest.warns(UserWarning), pytest.raises(PrecisionError, match="underflows even in float64"):
        far("alibi_steep")(q[:1], k[:1], v[:1], key_padding_mask=pad)                      # e^−765
    pad[0, 1580:] = True
    with pytest.raises(PrecisionError, match="over the keys this key padding mask keeps at N=1600"):
        far("fft_decaying")(q[:1], k[:1], v[:1], key_padding_mask=pad)


@pytest.mark.parametrize("text", [
    "kernel = elu1; position = alibi(slope=0.5); mask = causal; eps = 0.01",
    "kernel = elu1; position = alibi(slope=0.5)",
    "param s[heads] = 0.5; kernel = elu1; position(r) = -s * abs(r) + 1; mask = causal; eps = 0.01"],
    ids=["causal-floor", "two_way", "learned-floor"])
def test_gradcheck_of_the_decayed_far_rows(text, monkeypatch):
    """The far rows' formula and its hand-written backward (decayed.py), made to take rows a few
    nats out: float64 gradcheck in q, k, v and the params (the rates, through the weights and the
    floor)."""
    from attndsl.lowering.forms import decayed
    monkeypatch.setitem(decayed.BEYOND, torch.float64, 1.0)
    attn = attndsl.compile(f"attention a {{ {text} }}", heads=2, head_dim=4, plan="decayed", dtype=torch.float64)
    pad = torch.zeros(2, 13, dtype=torch.bool)
    pad[0, 9:] = True                         # rows 11-12 lie 3-4 keys past the last kept one: > 1 nat
    pad[1, :5] = not attn.spec.causal         # (two-way: rows 0-2 lie 3-5 keys before the first)
    q, k, v = (torch.randn(2, 2, 13, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    names = list(attn.spec_params)
    values = [attn.spec_params[n].detach().double().clone().requires_grad_() for n in names]

    def f(q, k, v, *ps):
        return torch.func.functional_call(attn, {f"spec_params.{n}": p for n, p in zip(names, ps)}, (q, k, v),
                                          {"key_padding_mask": pad})
    taken, apply = [], decayed._WithFarRows.apply
    monkeypatch.setattr(decayed._WithFarRows, "apply", lambda *a: taken.append(a[7]) or apply(*a))
    assert_close("out", attn.reference(q, k, v, key_padding_mask=pad), f(q, k, v, *values), RTOL[torch.float64])
    assert {far.side for far in taken[0]} == ({0} if attn.spec.causal else {0, 1})    # the far path ran
    assert torch.autograd.gradcheck(f, (q, k, v, *values), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_only_the_batch_elements_whose_rows_underflow_rerun_in_float64():
    attn = attndsl.compile(FAR["alibi_steep"][0], heads=H, head_dim=D, plan="decayed")    # its _run is spied on
    pad = torch.zeros(2, 256, dtype=torch.bool)
    pad[1, 100:230] = True                    # b1's rows inside the run underflow in float32, b0's do not
    q, k, v = (torch.randn(2, H, 256, D, requires_grad=True) for _ in range(3))
    calls, run = [], attn._run

    def spy(env, dtype, i, pad=None):
        calls.append((env["q"].shape[0], dtype))
        return run(env, dtype, i, pad)
    attn._run = spy
    with pytest.warns(UserWarning, match="a row far from every key the key padding mask keeps"):
        out = attn(q, k, v, key_padding_mask=pad)
    assert calls == [(2 * H, torch.float32), (H, torch.float32), (H, torch.float64)]
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attn.reference(*leaves, key_padding_mask=pad)
    assert_close("out", ref, out, RTOL[torch.float32])
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ref, leaves, g), torch.autograd.grad(out, (q, k, v), g.float())):
        assert torch.isfinite(b).all()
        assert_close("grad", a, b, 20 * RTOL[torch.float32])
    calls.clear()
    with torch.no_grad():                     # no autograd: the first run's float32 rows are kept
        assert torch.equal(attn(q, k, v, key_padding_mask=pad), out.detach())
    assert calls == [(2 * H, torch.float32), (H, torch.float64)]


@pytest.mark.parametrize("name", ["prefix_sum", "decayed_two_way", "toeplitz_fft", "banded", "pairwise",
                                  "quadratic_table"])
def test_gradcheck_with_a_padding_mask(name):
    attn = module(name)
    q, k, v = (t[:, :, :9].clone().requires_grad_() for t in qkv(9, batch=2))
    mask = torch.tensor([[False] * 9, [True, True, False, False, True, False, False, False, True]])
    assert torch.autograd.gradcheck(lambda q, k, v: attn(q, k, v, key_padding_mask=mask), (q, k, v),
                                    eps=1e-6, atol=1e-6)


def test_rows_with_no_key_have_zero_output_and_gradient_in_every_form():
    mask = torch.ones(1, N, dtype=torch.bool)
    for name in SPECS:
        attn = module(name)
        q, k, v = (t[:1].clone().requires_grad_() for t in qkv(dtype=torch.float32))
        out = attn(q, k, v, key_padding_mask=mask)
        assert (out == 0).all(), name
        out.backward(torch.randn_like(out))
        for t in (q, k, v):
            assert (t.grad == 0).all(), name


def test_calls_without_autograd_reuse_a_scratch_buffer_safely():
    attn = module("prefix_sum")
    mask = padding_mask()
    q, k, v = qkv(dtype=torch.float32)
    want = attn(q, k, v, key_padding_mask=mask)
    with torch.inference_mode():
        a = attn(q, k, v, key_padding_mask=mask)
    with torch.no_grad():
        b = attn(q, k, v, key_padding_mask=mask)
        c = attn(q, 2 * k, v, key_padding_mask=mask)          # the buffer is refilled, not stale
    assert torch.equal(a, want) and torch.equal(b, want) and not torch.equal(c, want)
    assert torch.equal(c, attn(q, 2 * k, v, key_padding_mask=mask))


def test_a_float_mask_of_zeros_and_minus_infinity_and_the_errors():
    attn = module("quadratic")
    q, k, v = qkv(dtype=torch.float32)
    mask = padding_mask()
    additive = torch.zeros(B, N).masked_fill(mask, float("-inf"))
    assert torch.equal(attn(q, k, v, key_padding_mask=mask), attn(q, k, v, key_padding_mask=additive))
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \(4, 36\), expected \(batch, keys\) = \(4, 37\)"):
        attn(q, k, v, key_padding_mask=mask[:, 1:])
    with pytest.raises(TypeError, match="dtype torch.int64: use bool"):
        attn(q, k, v, key_padding_mask=mask.long())
    with pytest.raises(ValueError, match="only 0 \\(keep\\) and -inf"):
        attn(q, k, v, key_padding_mask=additive.nan_to_num(neginf=-5.0))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        attn(q, k, v, key_padding_mask=[[True]])


def test_a_fused_map_is_read_where_it_vanishes_and_one_that_never_does_is_refused():
    from attndsl.lowering.forms.linear import vanishing
    fused = shared("attention a { kernel(x) = x * exp(x); mask = causal }", heads=H, head_dim=D)
    node = fused.planned.root
    assert vanishing(node.phi, node.prescale) == 0.0          # -inf: 0·(−inf)
    assert_masked_matches_reference(fused, *qkv(), padding_mask(), torch.float64)
    never = shared("attention a { kernel(x) = 1 + x * x }", heads=H, head_dim=D)
    q, k, v = qkv(dtype=torch.float32)
    with pytest.raises(ValueError, match="this φ is 0 at none of -inf, 0, inf, -1, 1"):
        never(q, k, v, key_padding_mask=padding_mask())


def test_the_compiled_map_is_probed_where_torch_says_it_vanishes(monkeypatch):
    """The kernels' arithmetic is not torch's: the point is checked on the compiled kernel once; a
    point where the compiled φ is not 0 is refused."""
    from attndsl.lowering.forms import linear
    attn = attndsl.compile("attention a { kernel(x) = exp(x) - 1 + 1e-3; mask = causal }", heads=H, head_dim=D)
    q, k, v = qkv(dtype=torch.float32)
    monkeypatch.setattr(linear, "vanishing", lambda phi, prescale: 0.0)      # φ(0) = 1e-3, not 0
    with pytest.raises(ValueError, match="as the kernels compute it"):
        attn(q, k, v, key_padding_mask=padding_mask())
    assert False in linear._VANISHES.values()


@pytest.mark.xdist_group("padding-portable")
@pytest.mark.parametrize("target", ["llvm", PORTABLE], ids=["cpu", "portable"])
def test_the_sampled_forms_draw_no_padded_key(target):
    mask = padding_mask(64)
    kde = shared("attention a { sampling = kde(buckets=4, block=8, samples=16, heavy=8, seed=0) }",
                 heads=H, head_dim=D, target=target)
    uniform = shared("attention a { sampling = uniform(samples=16, seed=0); mask = causal }", heads=H, head_dim=D,
                     target=target)
    by_values = shared("attention a { sampling = kde(buckets=4, block=8, samples=16, residual=values, seed=0) }",
                       heads=H, head_dim=D, target=target)
    q, k, v = qkv(64, dtype=torch.float32)
    rows = [t.reshape(B * H, 64, D) for t in (q, k, v)]
    keys = mask[:, None, :].expand(B, H, 64).reshape(B * H, 64)
    for attn in (kde, uniform, by_values):
        s = sampling.draw(*rows, attn.planned.root.sampling, attn.lsh_planes, 0, attn.scale, keys)
        drawn = keys.gather(1, s.si.long())
        assert (s.lw[drawn] == KEY_OUT).all()               # a padded key drawn weighs 0
        assert not drawn[:4].any()                          # the rows with enough kept keys draw none
        out = attn(q, k, v, key_padding_mask=mask)
        k2, v2 = k.masked_fill(mask[:, None, :, None], float("nan")), v.masked_fill(mask[:, None, :, None], 7.0)
        assert torch.equal(out, attn(q, k2, v2, key_padding_mask=mask))
        huge = v.masked_fill(mask[:, None, :, None], 1e30)       # |v|² overflows: still weight 0
        assert torch.equal(out, attn(q, k, huge, key_padding_mask=mask))
        assert (out[3] == 0).all() and torch.isfinite(out).all()


@pytest.mark.xdist_group("padding-portable")
@pytest.mark.parametrize("target", ["llvm", PORTABLE], ids=["cpu", "portable"])
def test_kde_with_the_block_covering_the_sequence_is_the_padded_reference(target):
    attn = shared("attention a { sampling = kde(buckets=2, block=64, samples=8, seed=0) }",
                  heads=H, head_dim=D, target=target)
    assert_masked_matches_reference(attn, *qkv(40), padding_mask(40), torch.float64)


# --- cross-attention and grouped heads (module._cross: the O(N²) forms as they are, the others padded) --

@pytest.mark.parametrize("shape", [(29, 37, 2), (45, 21, 1), (37, 37, 1)], ids=["nq<nk", "nq>nk,mqa", "gqa"])
@pytest.mark.parametrize("name", list(SPECS))
def test_every_form_computes_cross_attention_and_grouped_heads(name, shape):
    nq, nk, hkv = shape
    attn = module(name)
    q = torch.randn(B, H, nq, D, dtype=torch.float64)
    k, v = (torch.randn(B, hkv, nk, D, dtype=torch.float64) for _ in range(2))
    mask = padding_mask(nk)
    mask[3] = False                          # one sequence whole
    q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
    ref = attn.reference(q64, k64, v64, key_padding_mask=mask)
    qc, kc, vc = (t.clone().requires_grad_() for t in (q, k, v))
    out = attn(qc, kc, vc, key_padding_mask=mask)
    assert out.shape == (B, H, nq, D)
    assert_close("out", ref, out, RTOL[torch.float64])
    g = torch.randn_like(ref)
    for what, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad(ref, (q64, k64, v64), g),
                          torch.autograd.grad(out, (qc, kc, vc), g)):
        assert_close(what, a, b, 20 * RTOL[torch.float64])


def test_cross_attention_and_grouped_heads_are_sdpa_s():
    attn = module("quadratic")
    q = torch.randn(2, H, 29, D, dtype=torch.float64)
    k, v = (torch.randn(2, 1, 41, D, dtype=torch.float64) for _ in range(2))
    from attndsl.reference import alibi_slopes
    r = torch.arange(29)[:, None] - torch.arange(41)[None, :]
    bias = (-alibi_slopes(H)[:, None, None] * r.abs()).masked_fill(r < 0, float("-inf"))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    torch.testing.assert_close(attn(q, k, v), want)
    torch.testing.assert_close(attn.reference(q, k, v), want)


def test_cross_attention_and_grouped_heads_errors():
    attn = module("linear")
    q = torch.randn(1, H, 9, D)
    with pytest.raises(ValueError, match="k has 3 heads, which does not divide the 2 heads of q"):
        attn(q, torch.randn(1, 3, 9, D), torch.randn(1, 3, 9, D))
    with pytest.raises(ValueError, match=r"k has shape \(1, 9, 2, 8\): dimension 1 must be heads .*k\.transpose\(1, 2\)"):
        attn(q, torch.randn(1, 9, H, D), torch.randn(1, 9, H, D))
    with pytest.raises(ValueError, match=r"v has shape \(1, 2, 8, 8\), expected \(1, 1, 8, 8\)"):
        attn(q, torch.randn(1, 1, 8, D), torch.randn(1, 2, 8, D))
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \(1, 9\), expected \(batch, keys\) = \(1, 8\)"):
        attn(q, torch.randn(1, 1, 8, D), torch.randn(1, 1, 8, D), key_padding_mask=torch.zeros(1, 9, dtype=torch.bool))
    mlir = attndsl.compile(SPECS["linear"][0], heads=H, head_dim=D, target="mlir-cpu")
    with pytest.raises(ValueError, match="computes self-attention only"):
        mlir(q, torch.randn(1, 1, 8, D), torch.randn(1, 1, 8, D))


# specs whose plan takes Nq ≠ Nk as it is (Form.cross): name -> (spec, plan, the op it runs)
CROSS = {
    "plain": ("attention a { kernel = softmax }", "auto", "softmax_attention"),
    "alibi_causal": ("attention a { position = alibi; mask = causal }", "auto", "softmax_attention"),
    "table": ("attention a { position = toeplitz(max_distance=8, init=normal) }", "auto", "softmax_attention"),
    "window": ("attention a { position = alibi; mask = causal_window(5) }", "auto", "softmax_attention"),
    "pairwise_table": ("attention a { kernel = relu; position = toeplitz(max_distance=6, init=normal) }",
                       "pairwise", "pairwise_attention"),
    "pairwise_causal": ("attention a { kernel = favor(features=8); position(r) = -0.3 * abs(r) + 2 * cos(r / 3); "
                        "mask = causal }", "pairwise", "pairwise_attention"),
}


def cross_module(name):
    text, plan, _ = CROSS[name]
    return shared(text, plan=plan, heads=H, head_dim=D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(1, 70), (37, 53), (53, 37), (70, 2)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(CROSS))
def test_the_o_n2_forms_compute_cross_attention_without_padding(name, shape, dtype, monkeypatch):
    nq, nk = shape
    attn = cross_module(name)
    if attn.spec.causal:        # one causal query sees one key: its dq is 0 but for rounding
        nq = max(nq, 2)
    seen = spy_on(monkeypatch, CROSS[name][2])
    monkeypatch.setattr(config, "num_threads", lambda: 1)   # grouped heads as rows, whatever the rows
    q = torch.randn(B, H, nq, D)
    k, v = (torch.randn(B, 1, nk, D) for _ in range(2))     # multi-query: one kv head, read as it is
    mask = padding_mask(nk) if nk > 12 else None
    assert_masked_matches_reference(attn, q, k, v, mask, dtype)
    as_rows = attn.spec.position.name == "none" and not attn.spec.causal     # the grouped heads as rows
    # else the kernels read the one kv head for every query head
    assert [(a[:2], b[:2]) for a, b, _ in seen] == [((B, H * nq), (B, nk)) if as_rows else ((B * H, nq), (B, nk))]
    # a float32 call of at most one vector of query rows runs the narrow kernels
    narrow = dtype == torch.float32 and (H * nq if as_rows else nq) <= cpu_schedule.lanes("float32")
    assert [kernels.endswith("_narrow") for *_, kernels in seen] == [narrow]


@pytest.mark.parametrize("shape", [(1, 70), (37, 53), (29, 29)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", ["plain", "pairwise_favor"])
def test_grouped_heads_run_as_rows_without_a_copy(name, shape, monkeypatch):
    """A spec whose rows do not know their position: the query heads of a kv head are the rows of
    one call against its keys, k and v as they are (no copy to H heads)."""
    text, plan, op = {"plain": CROSS["plain"],
                      "pairwise_favor": ("attention a { kernel = favor(features=8) }", "pairwise",
                                         "pairwise_attention")}[name]
    attn = shared(text, plan=plan, heads=H, head_dim=D)
    seen = spy_on(monkeypatch, op)
    monkeypatch.setattr(config, "num_threads", lambda: 1)
    nq, nk = shape
    q = torch.randn(B, H, nq, D)
    k, v = (torch.randn(B, 1, nk, D) for _ in range(2))
    mask = padding_mask(nk) if nk > 12 else None
    assert_masked_matches_reference(attn, q, k, v, mask, torch.float32)
    assert [(a[:2], b[:2]) for a, b, _ in seen] == [((B, H * nq), (B, nk))]


def test_grouped_heads_with_gradients_keep_a_call_per_thread(monkeypatch):
    """The O(N²) backward runs a batch·head per thread: with gradients, B·Hkv calls fewer than the
    threads take grouped heads as rows only where the rows fit a tile of queries."""
    attn = shared(CROSS["plain"][0], heads=H, head_dim=D)
    seen = spy_on(monkeypatch, "softmax_attention")
    monkeypatch.setattr(config, "num_threads", lambda: 8)
    q = torch.randn(B, H, 40, D, requires_grad=True)                   # B·Hkv = 4 calls, 80 rows
    k, v = (torch.randn(B, 1, 50, D, requires_grad=True) for _ in range(2))
    attn(q, k, v)
    with torch.no_grad():
        attn(q, k, v)
    attn(q[:, :, :20], k, v)                                           # 40 rows: one tile
    assert [a[:2] for a, *_ in seen] == [(B * H, 40), (B, H * 40), (B, H * 20)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(300, 20), (20, 300), (130, 61), (7, 300)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_pairwise_row_shift_follows_the_keys_each_row_sees(shape, causal):
    """b from −660 to 60, not monotone in r (float32, whose exp spans ±88): each row's shift is the
    largest b among the keys it sees, also where there are more queries than keys and in the
    narrow kernels of a few queries; forward and backward."""
    attn = shared("attention a { kernel = elu1; position(r) = 60 * cos(r / 5) - 2 * abs(r)"
                  + ("; mask = causal }" if causal else " }"), plan="pairwise", heads=H, head_dim=D)
    nq, nk = shape
    q = torch.randn(2, H, nq, D, requires_grad=True)
    k, v = (torch.randn(2, H, nk, D, requires_grad=True) for _ in range(2))
    out = attn(q, k, v)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attn.reference(*leaves)
    assert_close("out", ref, out, RTOL[torch.float32])
    g = torch.randn_like(out)
    for what, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad(ref, leaves, g.double()),
                          torch.autograd.grad(out, (q, k, v), g)):
        assert_close(what, a, b, 20 * RTOL[torch.float32])


def test_few_queries_take_the_pairwise_form_as_they_are():
    attn = shared("attention a { kernel = elu1; position(r) = -0.02 * abs(r) + 0.5 * cos(r / 16) }",
                  heads=H, head_dim=D)
    long = attn._plan_index(4096)
    assert attn.plans[long].forms == ("toeplitz_fft",)
    few = attn._cross_plan(16, 4096, torch.float32)
    assert few is not None and attn.plans[few].forms == ("pairwise",)
    assert attn._cross_plan(4096, 4000, torch.float32) is None      # many: the padded route, by FFT


def test_cross_attention_keeps_the_precision_rule():
    """Rows 8–39 lie up to 31 keys past the last kept key of batch 1: weights of e^(−155), below
    float32: that batch element runs in float64 (warned), the other in float32."""
    attn = shared("attention a { kernel = elu1; position(r) = -5 * abs(r) }", plan="pairwise", heads=H, head_dim=D)
    q = torch.randn(2, H, 40, D)
    k, v = (torch.randn(2, H, 30, D) for _ in range(2))
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[1, 8:] = True
    with pytest.warns(UserWarning, match="computes in float64: a row far from every key"):
        out = attn(q, k, v, key_padding_mask=mask)
    assert_close("out", attn.reference(q.double(), k.double(), v.double(), key_padding_mask=mask), out,
                 RTOL[torch.float32])


def test_gradcheck_of_the_o_n2_forms_in_cross_attention(monkeypatch):
    monkeypatch.setattr(config, "num_threads", lambda: 1)       # grouped heads as rows
    plain = cross_module("plain")
    q, k, v = (t.requires_grad_() for t in (torch.randn(2, H, 5, D, dtype=torch.float64),
                                             torch.randn(2, 1, 9, D, dtype=torch.float64),
                                             torch.randn(2, 1, 9, D, dtype=torch.float64)))
    assert torch.autograd.gradcheck(plain, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)
    for name in ("table", "pairwise_table"):
        q = torch.randn(2, H, 5, D, dtype=torch.float64)
        k, v = (torch.randn(2, H, 11, D, dtype=torch.float64) for _ in range(2))
        gradcheck_with_table(cross_module(name), q, k, v)
    causal = cross_module("alibi_causal")
    q, k, v = (t.requires_grad_() for t in (torch.randn(2, H, 11, D, dtype=torch.float64),
                                             torch.randn(2, H, 6, D, dtype=torch.float64),
                                             torch.randn(2, H, 6, D, dtype=torch.float64)))
    assert torch.autograd.gradcheck(causal, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("where", ["q", "k", "v", "padded k"])
@pytest.mark.parametrize("name", ["plain", "alibi_causal", "window", "pairwise_causal"])
def test_nan_in_cross_attention_reaches_the_rows_that_see_it(name, where):
    attn = cross_module(name)
    q = torch.randn(B, H, 29, D, requires_grad=True)
    k, v = (torch.randn(B, H, 41, D, requires_grad=True) for _ in range(2))
    mask = torch.zeros(B, 41, dtype=torch.bool)
    mask[:, 20] = True
    with torch.no_grad():
        t, row = {"q": (q, 13), "k": (k, 10), "v": (v, 10), "padded k": (k, 20)}[where]
        t[1, 0, row, 0] = float("nan")
    out = attn(q, k, v, key_padding_mask=mask)
    ref = attn.reference(*(t.double() for t in (q, k, v)), key_padding_mask=mask)
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().any() == (where != "padded k")
    fin = ~ref.isnan()
    assert_close("finite rows", ref[fin], out[fin], RTOL[torch.float32])
    dq, dk, dv = torch.autograd.grad(out.masked_fill(out.isnan(), 0).sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))


# --- nn.MultiheadAttention --------------------------------------------------------------------------

def torch_pair(text, **kw):
    torch.manual_seed(1)
    ours = attndsl.nn.MultiheadAttention(text, 16, 2, **kw)
    theirs = torch.nn.MultiheadAttention(16, 2, **kw)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_multihead_attention_matches_torch_with_a_key_padding_mask(causal):
    ours, theirs = torch_pair("attention a { kernel = softmax" + ("; mask = causal }" if causal else " }"),
                              batch_first=True)
    x = torch.randn(3, 21, 16)
    pad = torch.zeros(3, 21, dtype=torch.bool)
    pad[1, -6:] = True
    pad[2, [0, 5, 9]] = True
    causal_mask = torch.ones(21, 21, dtype=torch.bool).triu(1) if causal else None
    want = theirs(x, x, x, key_padding_mask=pad, need_weights=False, attn_mask=causal_mask,
                  is_causal=causal)[0]
    got = ours(x, x, x, key_padding_mask=pad, attn_mask=causal_mask, is_causal=causal)[0]
    rows = ~torch.isnan(want).any(-1)         # torch gives NaN where a row sees no key (b2, row 0 causal)
    torch.testing.assert_close(got[rows], want[rows], rtol=2e-5, atol=2e-5)
    assert (rows.sum() >= 3 * 21 - 1) and torch.isfinite(got).all()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_multihead_attention_matches_torch_in_cross_attention(causal):
    ours, theirs = torch_pair("attention a { kernel = softmax" + ("; mask = causal }" if causal else " }"),
                              kdim=12, vdim=10)
    x, mem_k, mem_v = torch.randn(37, 3, 16), torch.randn(53, 3, 12), torch.randn(53, 3, 10)
    pad = torch.zeros(3, 53, dtype=torch.bool)
    pad[1, -9:] = True
    kw = {"attn_mask": torch.ones(37, 53, dtype=torch.bool).triu(1), "is_causal": True} if causal else {}
    want = theirs(x, mem_k, mem_v, key_padding_mask=pad, need_weights=False, **kw)[0]
    got = ours(x, mem_k, mem_v, key_padding_mask=pad, **kw)[0]
    assert_close("out", want, got, 2e-5)
    g_want = torch.autograd.grad(want.square().sum(), theirs.q_proj_weight)
    g_got = torch.autograd.grad(got.square().sum(), ours.q_proj_weight)
    assert_close("d q_proj_weight", g_want[0], g_got[0], 1e-4)


def twin_layers(cls, train: bool, **attentions):
    """torch's layer `cls` (E = 16, 2 heads, feed-forward 32) and one with its attention modules
    named in `attentions` replaced by attndsl.nn.MultiheadAttention of the given spec texts, with
    the same weights, both in train (or eval) mode."""
    layer = cls(16, 2, 32, dropout=0.0, batch_first=True)
    mine = cls(16, 2, 32, dropout=0.0, batch_first=True)
    for name, text in attentions.items():
        setattr(mine, name, attndsl.nn.MultiheadAttention(text, 16, 2, batch_first=True))
    mine.load_state_dict(layer.state_dict())
    layer.train(train)
    mine.train(train)
    return layer, mine


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_decoder_layer_with_cross_attention(train):
    torch.manual_seed(3)
    layer, mine = twin_layers(torch.nn.TransformerDecoderLayer, train, self_attn="attention a { mask = causal }",
                              multihead_attn="attention a { }")
    x, memory = torch.randn(2, 11, 16), torch.randn(2, 17, 16)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(11)
    with torch.set_grad_enabled(train):
        want = layer(x, memory, tgt_mask=causal, tgt_is_causal=True)
        got = mine(x, memory, tgt_mask=causal, tgt_is_causal=True)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_encoder_layer_with_src_key_padding_mask(train):
    torch.manual_seed(2)
    layer, mine = twin_layers(torch.nn.TransformerEncoderLayer, train, self_attn="attention a { kernel = softmax }")
    x = torch.randn(2, 13, 16)
    pad = torch.zeros(2, 13, dtype=torch.bool)
    pad[1, 9:] = True
    with torch.set_grad_enabled(train):
        want, got = layer(x, src_key_padding_mask=pad), mine(x, src_key_padding_mask=pad)
    keep = ~pad                              # torch's eval fast path leaves padded rows as it likes
    torch.testing.assert_close(got[keep], want[keep], rtol=2e-5, atol=2e-5)

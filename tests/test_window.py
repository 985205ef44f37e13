"""Sliding windows (`mask = window(W)` and `causal_window(W)`): every form that computes one against
the reference, forward and backward, with key padding masks, the NaN rule, gradchecks, the portable
and mlir-cpu paths, spec errors and nn.MultiheadAttention against torch's module with the mask."""
from __future__ import annotations

import pytest
import torch
from conftest import RTOL, assert_close, assert_masked_matches_reference, gradcheck_with_table, shared_form

import attndsl
from attndsl.nn import MultiheadAttention

pytestmark = pytest.mark.xdist_group("window")

# name -> (spec, plan, the forms it runs)
SPECS = {
    "softmax": ("attention a { mask = window(20) }", "auto", ["quadratic"]),
    "softmax_alibi": ("attention a { mask = causal_window(40); position = alibi }", "auto", ["quadratic"]),
    "softmax_table": ("attention a { mask = window(7); position = toeplitz(max_distance=3, init=normal) }", "auto",
                      ["quadratic"]),
    "banded": ("attention a { kernel = elu1; mask = window(20) }", "banded", ["banded"]),
    "banded_table": ("attention a { kernel = favor(features=8); mask = causal_window(30); "
                     "position = toeplitz(max_distance=50, init=normal) }", "banded", ["banded"]),
    "banded_user": ("attention a { kernel = relu; mask = window(9); position(r) = -0.1 * abs(r) }", "banded",
                    ["banded"]),
    "pairwise_t5": ("attention a { kernel = elu1; mask = causal_window(12); "
                    "position = t5(buckets=8, max_distance=20, init=normal) }", "pairwise", ["pairwise"]),
}
B, H, N, D = 3, 2, 150, 8
PORTABLE = attndsl.Target("llvm", kernels="portable")


def module(name, target="llvm"):
    return shared_form(SPECS[name], heads=H, head_dim=D, target=target)


def qkv(n=N, dtype=torch.float64):
    return [torch.randn(B, H, n, D, dtype=dtype) for _ in range(3)]


def padding_mask(n=N) -> torch.Tensor:
    """(B, n): none; a few inner keys and the last 5; the first 60 (rows whose window holds no key)."""
    m = torch.zeros(B, n, dtype=torch.bool)
    m[1, [3, 50, 51, 90]] = True
    m[1, -5:] = True
    m[2, :60] = True
    return m


def window_mask(spec, n=N) -> torch.Tensor:
    """(n, n) True where row i sees key j."""
    i = torch.arange(n)
    r = i[:, None] - i[None, :]
    keep = r.abs() <= spec.window
    return keep & (r >= 0) if spec.causal else keep


# float32 for the kernels a window changes (the quadratic tiles, banded without far sums); the
# others' float32 kernels are those of any table (tests/test_pairwise.py, test_position.py)
CASES = [(name, dtype) for name in SPECS for dtype in (torch.float32, torch.float64)
         if dtype == torch.float64 or name in ("softmax", "softmax_alibi", "softmax_table", "banded", "banded_table")]


@pytest.mark.parametrize("padded", [False, True], ids=["whole", "padded"])
@pytest.mark.parametrize("name, dtype", CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in CASES])
def test_every_form_computes_the_window(name, dtype, padded):
    attn = module(name)
    mask = padding_mask() if padded else None
    out = assert_masked_matches_reference(attn, *qkv(), mask, dtype)
    if padded:              # the rows whose window holds only padded keys: 0
        empty = ~(window_mask(attn.spec) & ~mask[2][None, :]).any(1)
        assert empty[:20].all() and (out[2][:, empty] == 0).all()


def test_the_reference_is_sdpa_with_the_window_mask():
    from attndsl.reference import alibi_slopes, reference
    q, k, v = qkv(40)
    for text in ("attention a { mask = window(5) }", "attention a { mask = causal_window(7); position = alibi }"):
        spec = attndsl.parse(text).block()
        keep = window_mask(spec, 40)
        r = torch.arange(40)
        bias = torch.zeros(H, 40, 40, dtype=torch.float64)
        if spec.position.name == "alibi":
            bias = -alibi_slopes(H)[:, None, None] * (r[:, None] - r[None, :]).abs()
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(~keep, float("-inf")))
        torch.testing.assert_close(reference(spec, q, k, v), want)


@pytest.mark.xdist_group("window-portable")
@pytest.mark.parametrize("name", ["softmax_alibi", "softmax_table", "banded_table"])
def test_the_portable_kernels_compute_the_window(name):
    assert_masked_matches_reference(module(name, PORTABLE), *qkv(), padding_mask(), torch.float64)


@pytest.mark.parametrize("name", ["softmax_alibi", "banded"])
def test_a_nan_key_reaches_only_the_rows_whose_window_holds_it(name):
    attn = module(name)
    q, k, v = qkv(dtype=torch.float32)
    k[0, 0, 70, 1] = float("nan")
    q.requires_grad_()
    out = attn(q, k, v)
    rows = out.isnan().any(-1)[0, 0]
    w = attn.spec.window
    want = torch.zeros(N, dtype=torch.bool)
    want[70:71 + w] = True
    if not attn.spec.causal:
        want[70 - w:70] = True
    assert torch.equal(rows, want) and not out[1:].isnan().any() and not out[0, 1].isnan().any()
    # backward: NaN to the rows that saw it and to the keys those rows see, as the reference's
    g, = torch.autograd.grad(out.nan_to_num(0).sum() + out[0, 0, 70].sum(), q)
    assert g[0, 0].isnan().any(-1).tolist() == (torch.arange(N) == 70).tolist()


@pytest.mark.parametrize("name", ["softmax_table", "banded_table", "pairwise_t5"])
def test_gradcheck(name):
    gradcheck_with_table(module(name), *(torch.randn(1, H, 15, D, dtype=torch.float64) for _ in range(3)))


def test_the_plan_and_explain():
    attn = module("banded")
    assert "sliding window" in attn.explain()
    with pytest.raises(attndsl.SpecError, match="plan 'toeplitz_fft' does not apply") as e:
        attndsl.compile(SPECS["banded"][0], heads=H, head_dim=D, plan="toeplitz_fft", dtype=None)
    assert "banded" in str(e.value)


@pytest.mark.parametrize("text, message", [
    ("attention a { mask = window(8); sampling = uniform }", "sampling = uniform cannot be combined with mask = window"),
    ("attention a { kernel = relu; mask = window(8); position = alibi; apply = values }",
     "apply = values cannot be combined with mask = window"),
    ("attention a { mask = window }", "size"),
    ("attention a { mask = causal_window(-2) }", "size"),
])
def test_spec_errors(text, message):
    with pytest.raises(attndsl.SpecError, match=message):
        attndsl.parse(text)


def test_mlir_target_computes_the_window():      # softmax's: examples/windows_params.attn (test_mlir_backend)
    attn = attndsl.compile(SPECS["banded"][0], heads=H, head_dim=D, target="mlir-cpu")
    q, k, v = qkv(40)
    assert_close("out", attn.reference(q, k, v), attn(q, k, v), RTOL[torch.float64])


def test_multihead_attention_matches_torch_with_the_window_mask():
    E, L = 32, 45
    torch.manual_seed(1)
    theirs = torch.nn.MultiheadAttention(E, 4)
    ours = MultiheadAttention("attention s { mask = causal_window(6) }", E, 4)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(L, 2, E)
    r = torch.arange(L)[:, None] - torch.arange(L)[None, :]
    mask = (r < 0) | (r > 6)
    pad = torch.zeros(2, L, dtype=torch.bool)
    pad[1, -8:] = True
    want, _ = theirs(x, x, x, need_weights=False, attn_mask=mask, key_padding_mask=pad)
    got, _ = ours(x, x, x, attn_mask=mask, key_padding_mask=pad)
    assert_close("out", want, got, 2e-5)
    got, _ = ours(x, x, x, attn_mask=torch.zeros(L, L).masked_fill(mask, float("-inf")), key_padding_mask=pad)
    assert_close("out", want, got, 2e-5)
    with pytest.raises(ValueError, match="has a sliding window"):
        ours(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match="this attn_mask is another one"):
        ours(x, x, x, attn_mask=torch.ones(L, L, dtype=torch.bool).triu(1))

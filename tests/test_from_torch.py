"""attndsl.from_torch: PyTorch attention exported by torch-mlir's fx importer, read back as a spec
whose §2 meaning (and compiled module) reproduces the original; anything else is an error that
names what it could not place."""
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import attndsl
from attndsl.mlir.from_torch import FromTorchError

sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
from from_torch_demo import CausalLinearAttention, T5Attention  # noqa: E402


def example(n, heads=4, d=16, dv=None):
    g = torch.Generator().manual_seed(n)
    return [torch.randn(1, heads, n, x, generator=g) for x in (d, d, dv or d)]


def same_as_module(imported, fn, n, **kw):
    attn = imported.compile(**kw)
    q, k, v = example(n, attn.heads, attn.head_dim, attn.value_dim)
    with torch.no_grad():
        assert_close("compiled vs the PyTorch original", fn(q, k, v), attn(q, k, v), 2e-5)


def test_t5_block_becomes_a_clipped_table():
    t5 = T5Attention()
    imported = attndsl.from_torch(t5, example(160), name="t5")
    # 32 bidirectional buckets saturate at |j − i| ≥ 91 (8·16^(7/8)): the table's clip
    assert imported.text == ("attention t5 {\n    kernel = softmax\n    scale = 1\n"
                             "    position = toeplitz(max_distance=91)\n}\n")
    assert imported.position_table.shape == (4, 2 * 91 + 1)
    r = torch.arange(-91, 92)
    assert torch.equal(imported.position_table, t5.bias(t5.bucket(-r)).T)     # b_h(i − j) = E[bucket(j − i), h]
    same_as_module(imported, t5, 300)            # longer than the export: the clip holds


def test_causal_linear_module_becomes_elu1():
    imported = attndsl.from_torch(CausalLinearAttention(), example(32))
    assert "kernel = elu1" in imported.text and "mask = causal" in imported.text
    same_as_module(imported, CausalLinearAttention(), 100)


def test_causal_softmax_with_masked_fill():
    def attn(q, k, v):
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        m = torch.triu(torch.ones(q.shape[2], q.shape[2], dtype=torch.bool), 1)
        return torch.softmax(s.masked_fill(m, float("-inf")), -1) @ v
    imported = attndsl.from_torch(attn, example(16))
    assert "scale = 0.25" in imported.text and "mask = causal" in imported.text
    same_as_module(imported, attn, 40)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_scaled_dot_product_attention(causal):
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.3)  # noqa: E731
    imported = attndsl.from_torch(fn, example(12, d=8))
    assert "scale = 0.3" in imported.text and ("mask = causal" in imported.text) == causal


def alibi_bias(slopes, causal):
    """fn(q, k, v) = softmax(q·kᵀ/4 − s_h·|i − j|) v, the bias written with arange and abs."""
    def attn(q, k, v):
        n = q.shape[2]
        r = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).float()
        bias = -torch.tensor(slopes)[:, None, None] * r.abs()
        if causal:
            bias = bias + torch.triu(torch.full((n, n), -1e9), 1)          # an additive mask
        return torch.softmax(q @ k.transpose(-1, -2) * 0.25 + bias, -1) @ v
    return attn


@pytest.mark.parametrize("slopes, causal, position", [
    ([2 ** (-8 * h / 4) for h in range(1, 5)], True, "position = alibi\n"),     # the paper's 2^(−8h/H)
    ([0.1] * 4, False, "position = alibi(slope=0.1)\n"),                         # one slope for all heads
], ids=["paper-slopes-causal", "one-slope-full"])
def test_alibi_bias_becomes_alibi(slopes, causal, position):
    attn = alibi_bias(slopes, causal)
    imported = attndsl.from_torch(attn, example(20))
    assert position in imported.text and ("mask = causal" in imported.text) == causal
    assert imported.position_table is None
    same_as_module(imported, attn, 40)           # twice the export length: a table would be clipped at 19


def test_other_per_head_slopes_are_refused():
    with pytest.raises(FromTorchError, match=r"per-head slopes s = \[0\.5, 0\.25, 0\.125, 0\.0625\]"):
        attndsl.from_torch(alibi_bias([0.5, 0.25, 0.125, 0.0625], True), example(20))


def test_table_clipped_at_the_export_length_is_refused():
    def growing(q, k, v):                        # linear in r, not |r|: no field says it
        n = q.shape[2]
        r = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).float()
        return torch.softmax(q @ k.transpose(-1, -2) + 0.05 * r, -1) @ v
    with pytest.raises(FromTorchError, match=r"not at N=40 .*still changing at distance 19.*too short to see"):
        attndsl.from_torch(growing, example(20))
    # T5's buckets are constant from distance 46 to 63 but change again at 64 (last at 91)
    with pytest.raises(FromTorchError, match=r"constant from distance 46 to 63.*too short to see where the table "
                                             r"is clipped.*Export at a length past"):
        attndsl.from_torch(T5Attention(), example(64))


def test_epsilon_in_the_normalizer_becomes_eps():
    def linear(q, k, v):
        fq, fk = F.relu(q), F.relu(k)
        return (fq @ (fk.transpose(-1, -2) @ v)) / (fq @ fk.sum(-2, keepdim=True).transpose(-1, -2) + 1e-3)
    imported = attndsl.from_torch(linear, example(16, d=2))
    assert "kernel = relu" in imported.text and "eps = 0.001" in imported.text
    attn = imported.compile()
    q, k, v = example(40, attn.heads, attn.head_dim, attn.value_dim)
    q[:, :, ::4] = -q[:, :, ::4].abs()           # rows with no features: 0 in both, not 0/0
    with torch.no_grad():
        assert_close("compiled vs the PyTorch original", linear(q, k, v), attn(q, k, v), 2e-5)

    def subtracted(q, k, v):
        fq, fk = F.elu(q) + 1, F.elu(k) + 1
        return (fq @ (fk.transpose(-1, -2) @ v)) / (fq @ fk.sum(-2, keepdim=True).transpose(-1, -2) - 1e-6)
    with pytest.raises(FromTorchError, match=r"subtracts 1e-06 from the normalizer.*eps ≥ 0"):
        attndsl.from_torch(subtracted, example(16))

    def softmax(q, k, v):
        s = q @ k.transpose(-1, -2)
        e = torch.exp(s - s.amax(-1, keepdim=True))
        return e / (e.sum(-1, keepdim=True) + 1e-9) @ v
    with pytest.raises(FromTorchError, match=r"adds the constant 1e-09 to the softmax's normalizer"):
        attndsl.from_torch(softmax, example(16))


def test_nan_where_the_original_has_nan_is_a_match():
    def linear(q, k, v):                         # relu features: an all-negative row gives 0/0 in both
        fq, fk = F.relu(q), F.relu(k)
        return (fq @ (fk.transpose(-1, -2) @ v)) / (fq @ fk.sum(-2, keepdim=True).transpose(-1, -2))
    imported = attndsl.from_torch(linear, example(64, d=2))       # a quarter of the rows: NaN
    assert "kernel = relu" in imported.text and "eps = 0" in imported.text     # as fn: no floor


def test_user_feature_map_non_causal():
    def attn(q, k, v):
        fq, fk = torch.exp(-F.relu(q)) * 2 + q ** 2, torch.exp(-F.relu(k)) * 2 + k ** 2
        return (fq @ (fk.transpose(-1, -2) @ v)) / (fq @ fk.sum(-2, keepdim=True).transpose(-1, -2))
    imported = attndsl.from_torch(attn, example(24, d=8))
    assert "kernel(x) = " in imported.text and "exp" in imported.text and "causal" not in imported.text
    same_as_module(imported, attn, 24)


def test_unrecognised_op_is_named():
    with pytest.raises(FromTorchError, match=r"unrecognised op torch\.aten\.tanh"):
        attndsl.from_torch(lambda q, k, v: torch.tanh(q @ k.transpose(-1, -2)) @ v, example(8))
    with pytest.raises(FromTorchError, match=r"unrecognised op torch\.aten\.gt"):   # softplus' threshold
        attndsl.from_torch(lambda q, k, v: F.softplus(q) @ (F.softplus(k).transpose(-1, -2) @ v), example(8))


def test_absolute_bias_is_not_a_position_term():
    bias = torch.randn(8, 8)
    with pytest.raises(FromTorchError, match="Toeplitz"):
        attndsl.from_torch(lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) + bias, -1) @ v, example(8))


def test_non_causal_mask_is_refused():
    mask = torch.rand(8, 8) > 0.5
    mask.fill_diagonal_(False)
    with pytest.raises(FromTorchError, match="not causally"):
        attndsl.from_torch(lambda q, k, v: torch.softmax((q @ k.transpose(-1, -2)).masked_fill(
            mask, float("-inf")), -1) @ v, example(8))


def test_different_maps_for_q_and_k_are_refused():
    with pytest.raises(FromTorchError, match="different maps"):
        attndsl.from_torch(lambda q, k, v: (F.relu(q) @ (F.elu(k).transpose(-1, -2) @ v)), example(8))

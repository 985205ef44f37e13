"""attndsl.nn.MultiheadAttention against torch.nn.MultiheadAttention with the same weights."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from attndsl.nn import MultiheadAttention
from conftest import assert_close

SOFTMAX = "attention s { kernel = softmax }"
CAUSAL = "attention s { kernel = softmax; mask = causal }"
E, H = 32, 4


def pair(spec=SOFTMAX, **kw):
    """(torch's module, ours with its weights)."""
    torch.manual_seed(1)
    theirs = nn.MultiheadAttention(E, H, **kw)
    ours = MultiheadAttention(spec, E, H, **kw)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def grads(module, out):
    out.square().sum().backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("spec", [SOFTMAX, CAUSAL], ids=["full", "causal"])
def test_equals_torch_forward_and_backward(spec, batch_first):
    theirs, ours = pair(spec, batch_first=batch_first)
    L, B = 37, 3
    x = torch.randn(B, L, E) if batch_first else torch.randn(L, B, E)
    kw = {"is_causal": True, "attn_mask": torch.ones(L, L, dtype=torch.bool).triu(1)} if spec == CAUSAL else {}
    want, _ = theirs(x, x, x, need_weights=False, key_padding_mask=torch.zeros(B, L, dtype=torch.bool), **kw)
    got, weights = ours(x, x, x, key_padding_mask=torch.zeros(B, L, dtype=torch.bool), **kw)
    assert weights is None and got.shape == want.shape
    assert_close("out", want, got, 2e-5)
    g_want, g_got = grads(theirs, want), grads(ours, got)
    assert g_want.keys() == g_got.keys()
    for name in g_want:
        assert_close(name, g_want[name], g_got[name], 1e-4)


def test_unbatched_and_separate_kv_dims():
    theirs, ours = pair(kdim=24, vdim=20)
    assert ours.in_proj_weight is None and ours.k_proj_weight.shape == (E, 24)
    q, k, v = torch.randn(9, E), torch.randn(9, 24), torch.randn(9, 20)
    want, _ = theirs(q, k, v, need_weights=False)
    got, _ = ours(q, k, v)
    assert got.shape == (9, E)
    assert_close("out", want, got, 2e-5)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_self_attn_of_a_transformer_encoder_layer(train):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=64, dropout=0.0, batch_first=True)
    mine = copy.deepcopy(layer)
    mine.self_attn = MultiheadAttention(CAUSAL, E, H, batch_first=True)
    mine.self_attn.load_state_dict(layer.self_attn.state_dict())
    layer.train(train), mine.train(train)
    x = torch.randn(2, 21, E)
    mask = nn.Transformer.generate_square_subsequent_mask(21)
    with torch.set_grad_enabled(train):
        want = layer(x, src_mask=mask, is_causal=True)
        got = mine(x, src_mask=mask, is_causal=True)
    assert_close("out", want, got, 2e-5)
    if train:
        got.sum().backward()
        assert mine.self_attn.in_proj_weight.grad is not None


def test_self_attn_of_a_transformer_decoder_layer():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(E, H, dim_feedforward=64, dropout=0.0)
    mine = copy.deepcopy(layer)
    mine.self_attn = MultiheadAttention(CAUSAL, E, H)
    mine.self_attn.load_state_dict(layer.self_attn.state_dict())
    tgt, memory = torch.randn(11, 2, E), torch.randn(7, 2, E)
    mask = nn.Transformer.generate_square_subsequent_mask(11)
    assert_close("out", layer(tgt, memory, tgt_mask=mask, tgt_is_causal=True),
                 mine(tgt, memory, tgt_mask=mask, tgt_is_causal=True), 2e-5)


def test_a_feature_map_spec_trains_in_an_encoder():
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=64, dropout=0.0, batch_first=True)
    layer.self_attn = MultiheadAttention("attention f { kernel = favor(features=16); position = alibi; "
                                         "mask = causal }", E, H, batch_first=True)
    x = torch.randn(2, 50, E)
    layer(x, is_causal=True, src_mask=nn.Transformer.generate_square_subsequent_mask(50)).square().mean().backward()
    assert all(p.grad is not None for p in layer.self_attn.parameters() if p.requires_grad)


def test_what_the_spec_cannot_express_is_a_clear_error():
    _, ours = pair(CAUSAL)
    x = torch.randn(5, 2, E)
    with pytest.raises(ValueError, match="need_weights=True"):
        ours(x, x, x, need_weights=True, is_causal=True)
    with pytest.raises(ValueError, match="neither is_causal=True nor a causal attn_mask"):
        ours(x, x, x)
    with pytest.raises(ValueError, match=r"declares \(`mask = causal`\), and this attn_mask is another one"):
        ours(x, x, x, attn_mask=torch.zeros(5, 5))
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \(2, 4\), expected \(batch, keys\) = \(2, 5\)"):
        ours(x, x, x, is_causal=True, key_padding_mask=torch.tensor([[False] * 3 + [True]] * 2))
    with pytest.raises(ValueError, match="key and value must have the same length, got 6 and 7"):
        ours(x, torch.randn(6, 2, E), torch.randn(7, 2, E), is_causal=True)
    _, full = pair(SOFTMAX)
    with pytest.raises(ValueError, match="has no causal mask"):
        full(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match="dropout=0.1"):
        MultiheadAttention(SOFTMAX, E, H, dropout=0.1)

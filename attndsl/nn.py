"""`attndsl.nn.MultiheadAttention`: a spec in the place of `torch.nn.MultiheadAttention`.

The same parameters under the same names (in_proj_weight and in_proj_bias, or q/k/v_proj_weight
when kdim or vdim differ from embed_dim; out_proj), so `load_state_dict(torch_mha.state_dict())`
works, and the same forward, returning (out, None): assignable as `self_attn` of
`nn.TransformerEncoderLayer` and `nn.TransformerDecoderLayer`. The attention between the
projections is the spec's, compiled (an `attndsl.Attention` with heads = num_heads and
head_dim = embed_dim / num_heads); a softmax spec computes what torch's module does.

    query (L, B, E) (or (B, L, E) with batch_first, or unbatched (L, E)), key and value (S, B, ·)
    likewise (S ≠ L: cross-attention, as in a decoder layer's multihead_attn)
    ->  (out of the query's shape, None)
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _no_fast_path(module, args):
    """A forward pre-hook that does nothing: torch's Transformer layers take their fused fast path
    (which computes softmax attention from in_proj_weight itself) only when no hook is attached."""
    return None


class MultiheadAttention(nn.Module):
    """`spec`: a path to a .attn file or the spec's text (`name` picks a block); the other
    arguments are torch.nn.MultiheadAttention's, plus attndsl.compile's `target`, `plan` and
    `tuned`."""

    def __init__(self, spec, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None, *,
                 name: str | None = None, target="llvm", plan: str = "auto", tuned: bool = True):
        super().__init__()
        import attndsl
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if dropout:
            raise ValueError(f"dropout={dropout}: attention dropout drops entries of the N×N weights, which "
                             f"attndsl's forms never build; use dropout=0.0 (and dropout after the projection)")
        if add_bias_kv or add_zero_attn:
            raise ValueError("add_bias_kv and add_zero_attn append a key to every sequence, which the forms "
                             "do not take; build the module without them")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.batch_first = embed_dim, num_heads, batch_first
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.head_dim = embed_dim // num_heads
        self.dropout = 0.0
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.attention = attndsl.compile(spec, name, heads=num_heads, head_dim=self.head_dim, target=target,
                                         plan=plan, tuned=tuned, dtype=None)
        self.register_forward_pre_hook(_no_fast_path)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """torch.nn.MultiheadAttention's initialization."""
        for w in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if w is not None:
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)

    @property
    def spec(self):
        return self.attention.spec

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        if need_weights:
            raise ValueError("need_weights=True asks for the N×N attention weights, which attndsl's forms "
                             "never build; call with need_weights=False (the Transformer layers do)")
        batched, bdim = query.dim() == 3, 0 if self.batch_first else 1
        if not batched:
            query, key, value = (t.unsqueeze(bdim) for t in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        L, B, _ = query.shape
        S = key.shape[0]
        if value.shape[0] != S:
            raise ValueError(f"key and value must have the same length, got {S} and {value.shape[0]}")
        self._check_masks(L, S, attn_mask, is_causal)
        if self._qkv_same_embed_dim:
            wq, wk, wv = self.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        bq, bk, bv = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3

        def heads(x, w, b):                      # (L, B, ·) -> (B, H, L, head_dim)
            return F.linear(x, w, b).view(x.shape[0], B, self.num_heads, self.head_dim).permute(1, 2, 0, 3)
        out = self.attention(heads(query, wq, bq), heads(key, wk, bk), heads(value, wv, bv),
                             key_padding_mask=key_padding_mask)
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(L, B, self.embed_dim))
        if self.batch_first:
            out = out.transpose(0, 1)
        return (out if batched else out.squeeze(bdim)), None

    def _check_masks(self, L: int, S: int, attn_mask, is_causal: bool) -> None:
        """attn_mask and is_causal must say what the spec computes: its mask (causal, a sliding
        window) exactly, or, for `mask = causal`, is_causal=True (key_padding_mask is the
        Attention's to check). L queries, S keys."""
        spec, want = self.spec, _spec_mask(self.spec, L, S, None if attn_mask is None else attn_mask.device)
        named = f"`mask = {spec.mask.name}{'' if spec.window is None else f'({spec.window})'}`"
        if attn_mask is not None:
            if want is None:
                raise ValueError(f"attn_mask is given, but spec '{spec.name}' declares no mask: attndsl computes "
                                 f"the mask its spec declares; add it to the spec (`mask = causal`, "
                                 f"`window(W)`, `causal_window(W)`), or drop attn_mask")
            if not _same_mask(attn_mask, want):
                raise ValueError(f"attn_mask: attndsl computes the mask its spec declares ({named}), and this "
                                 f"attn_mask is another one; pass exactly that mask ((L, S), True or -inf where "
                                 f"a key is left out), or change the spec")
            return
        if is_causal and not spec.causal:
            raise ValueError(f"is_causal=True, but spec '{spec.name}' has no causal mask: add `mask = causal` to it")
        if spec.window is not None:
            raise ValueError(f"spec '{spec.name}' has a sliding window ({named}), but this call passes no "
                             f"attn_mask: torch's module would attend to every key here; pass the window's mask "
                             f"as attn_mask to say the call is windowed")
        if spec.causal and not is_causal:
            raise ValueError(f"spec '{spec.name}' is causal (`mask = causal`), but this call passes neither "
                             f"is_causal=True nor a causal attn_mask: torch's module would attend to later keys "
                             f"here; pass is_causal=True (or the causal mask) to say the call is causal")


def _spec_mask(spec, L: int, S: int, device) -> torch.Tensor | None:
    """The (L, S) bool mask (True = left out) that `spec` computes, r = i − j (causal: j ≤ i), or
    None when it has none."""
    if not spec.causal and spec.window is None:
        return None
    r = torch.arange(L, device=device)[:, None] - torch.arange(S, device=device)[None, :]
    out = r < 0 if spec.causal else torch.zeros(L, S, dtype=torch.bool, device=device)
    return out | (r.abs() > spec.window) if spec.window is not None else out


def _same_mask(mask: torch.Tensor, want: torch.Tensor) -> bool:
    """Whether `mask`, bool (True = masked) or float (−inf = masked, 0 kept), is `want`."""
    if tuple(mask.shape) != tuple(want.shape):
        return False
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, want))
    return bool(torch.isneginf(mask[want]).all() and (mask[~want] == 0).all())

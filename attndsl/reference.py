"""The meaning of a spec (docs/language.md) computed literally, O(N²), per batch and head.

This is the oracle every compiled form is tested against. It needs no TVM.
q (B, H, N, Dk), k (B, Hkv, Nk, Dk), v (B, Hkv, Nk, Dv) (Hkv dividing H: query head h reads kv
head h // (H / Hkv)), key_padding_mask (B, Nk) bool (True = padding) -> (B, H, N, Dv), in q's
dtype (bf16/fp16 computed in fp32); r = i − j, causal: j ≤ i.
"""
from __future__ import annotations

import math

import torch

from .ast import AttentionSpec, Choice, learned_table
from .expr import evaluate
from .featuremaps import lookup


def alibi_slopes(heads: int) -> torch.Tensor:
    """The ALiBi paper's per-head slopes 2^(−8h/H), h = 1..H."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)], dtype=torch.float64)


def relative_positions(n: int, dtype, device=None, nk: int | None = None) -> torch.Tensor:
    """r[i, j] = i − j, (N, N), or (N, Nk) with Nk keys."""
    i = torch.arange(n, device=device)
    j = i if nk is None else torch.arange(nk, device=device)
    return (i[:, None] - j[None, :]).to(dtype)


def position_bias(position: Choice, n: int, heads: int, dtype, table: torch.Tensor | None = None,
                  device=None, params: dict | None = None, nk: int | None = None) -> torch.Tensor | None:
    """b_h(i − j) as (H, N, N) ((H, N, Nk) with Nk keys), or None for `position = none`."""
    if position.name == "none":
        return None
    return bias_at(position, relative_positions(n, dtype, device, nk), heads, dtype, table, params=params)


def bias_at(position: Choice, r: torch.Tensor, heads: int, dtype, table: torch.Tensor | None = None,
            slopes: torch.Tensor | None = None, params: dict | None = None) -> torch.Tensor:
    """b_h(r) (H, *r.shape) at the integer distances r (any shape); `slopes` (H, 1): alibi's, else
    the spec's; `params`: position(r) = EXPR's, {name: a scalar or (H, 1)}. Differentiable in
    `table` and `params`."""
    r = r.to(dtype)
    if learned_table(position):                         # table[h, clip(r, −W, W) + W]
        w = int(position["max_distance"])
        return table.to(dtype)[:, r.long().clamp(-w, w) + w]
    if position.name == "alibi":                        # −slope·|r|
        if slopes is None:
            slope = position["slope"]
            slopes = alibi_slopes(heads) if slope is None else torch.full((heads,), float(slope))
        s = slopes.to(dtype=dtype, device=r.device).reshape(heads, *([1] * r.dim()))
        return -s * r.abs()
    if position.name == "user":                         # EXPR(r), params per head along dim 0
        env = {k: p.to(dtype=dtype, device=r.device).reshape(p.shape + (1,) * (r.dim() - 1))
               for k, p in (params or {}).items()}
        return evaluate(position.expr, r, env).expand(heads, *r.shape)
    raise NotImplementedError(position.name)


def kernel_logits_or_values(spec: AttentionSpec, q, k, scale, projection, params: dict | None = None):
    """softmax: the logits s·q·kᵀ (B, H, N, N); a feature map: κ = φ(√s q)·φ(√s k)ᵀ, kernel(x) =
    EXPR with the params' values `params` (a scalar, or (H, 1) per head)."""
    if spec.kernel.name == "softmax":
        return scale * q @ k.transpose(-1, -2)
    c = math.sqrt(scale)
    if spec.map_params:
        missing = [n for n in spec.map_params if n not in (params or {})]
        if missing:
            raise ValueError(f"kernel(x) = EXPR reads the params {', '.join(missing)}: pass their values, "
                             f"params={{name: a scalar or (H, 1) tensor}}")
        env = {n: params[n].to(q.dtype).reshape(params[n].shape + (1,)) for n in spec.map_params}
        return evaluate(spec.kernel.expr, c * q, env) @ evaluate(spec.kernel.expr, c * k, env).transpose(-1, -2)
    fmap = lookup(spec.kernel)
    w = None if projection is None else projection.to(q.dtype)
    return fmap.apply(spec.kernel, c * q, w, "q") @ fmap.apply(spec.kernel, c * k, w, "k").transpose(-1, -2)


def masked_matmul(w: torch.Tensor, mask: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Σ_j [M_ij] w_ij v_j, (…, N, N) @ (…, N, D), M (N, N) or broadcastable (…, N, N), where a
    masked pair is left out, not multiplied by 0: a non-finite v_jd reaches only the rows whose
    mask sees j (docs/numerics.md). w must be 0 (or anything finite) where masked."""
    bad = ~torch.isfinite(v)
    out = w @ v.masked_fill(bad, 0)
    cols = bad.any(-1).reshape(-1, bad.shape[-2]).any(0).nonzero().flatten()   # keys with any
    if cols.numel() == 0:
        return out
    step = max(1, (1 << 22) // max(1, w.numel() // w.shape[-1] * v.shape[-1]))  # ≤ 4M elements
    for lo in range(0, cols.numel(), step):
        j = cols[lo:lo + step]
        vj = v[..., j, :].masked_fill(~bad[..., j, :], 0)                     # (…, J, D)
        term = w[..., :, j, None] * vj[..., None, :, :]                         # (…, N, J, D)
        out = out + term.masked_fill(~mask[..., j, None], 0).sum(-2)
    return out


def effective_scale(spec: AttentionSpec, head_dim: int) -> float:
    """s: the spec's `scale`, else 1/√Dk."""
    return float(spec.scale) if spec.scale is not None else 1.0 / math.sqrt(head_dim)


def reference(spec: AttentionSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              projection: torch.Tensor | None = None,
              position_table: torch.Tensor | None = None,
              key_padding_mask: torch.Tensor | None = None,
              params: dict | None = None) -> torch.Tensor:
    """out as the spec means it (docs/language.md). `sampling` specs return the exact softmax
    result they estimate. Padded keys are left out of every sum; a row with no key left is 0.
    `params`: the values of the spec's `param`s (a scalar, or (H, 1) per head)."""
    in_dtype = q.dtype
    if in_dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    heads, n, nk = q.shape[1], q.shape[2], k.shape[2]
    if k.shape[1] != heads:                             # grouped heads: query head h reads h // (H / Hkv)
        k, v = (t.repeat_interleave(heads // k.shape[1], 1) for t in (k, v))
    scale = effective_scale(spec, q.shape[-1])
    bias = position_bias(spec.position, n, heads, q.dtype, position_table, q.device, params, nk)
    r = relative_positions(n, torch.long, q.device, nk)  # i − j, (N, Nk)
    mask = torch.ones(n, nk, dtype=torch.bool, device=q.device)
    if spec.causal:
        mask = r >= 0
    if spec.window is not None:                         # a sliding window: |i − j| ≤ W
        mask = mask & (r.abs() <= spec.window)
    if key_padding_mask is not None:                    # (B, 1, N, N): padded keys out of every row
        mask = mask & ~key_padding_mask.to(q.device)[:, None, None, :]
    empty = ~mask.any(-1, keepdim=True)                 # rows with no key: 0, gradients 0

    kv = kernel_logits_or_values(spec, q, k, scale, projection, params)
    scores_bias = bias if spec.apply.name == "scores" else None
    if spec.kernel.name == "softmax":                   # A = exp(s q·k + b) M, normalised
        logits = kv if scores_bias is None else kv + scores_bias
        a = torch.softmax(logits.masked_fill(~mask, float("-inf")).masked_fill(empty, 0), dim=-1)
    else:                                               # A = κ exp(b) M, normalised, floored
        a = kv if scores_bias is None else kv * torch.exp(scores_bias)
        a = a.masked_fill(~mask, 0)                     # select: a masked NaN stays out
        a = a / (a.sum(-1, keepdim=True) + spec.floor).masked_fill(empty, 1)
    a = a.masked_fill(empty, 0)
    out = masked_matmul(a, mask, v)
    if bias is not None and spec.apply.name == "values":  # + Σ_j M_ij b(i − j) v_j (FastRPB)
        out = out + masked_matmul(bias.masked_fill(~mask, 0), mask, v)
    return out.to(in_dtype)

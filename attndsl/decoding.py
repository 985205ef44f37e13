"""Token-by-token decoding: `Attention.initial_state(batch)` and `Attention.step(q, k, v, state)`.

A causal spec whose form carries a running state (prefix_sum: linear attention; decayed: ALiBi and
the other geometric position terms) decodes in O(1) per token: the state holds

    S_t = γ S_{t−1} + φ(k_t) ⊗ [v_t, 1]       (M, Dv + 1) per batch·head, γ = 1 without decay

and token t's output is φ(q_t)·S_t[:, :Dv] / (φ(q_t)·S_t[:, Dv] + eps): the full causal forward's
row t. The step is one TVM kernel (lowering/cpu/decode.py), built at the first step of each dtype.
It never writes the state it is given, so one state can be stepped several ways (beam search).
Inference only: gradients flow through the full forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ops, pipeline
from .diagnostics import SpecError
from .lowering import DECODE_KERNEL, FORMS, decodable
from .lowering.forms import decayed
from .lowering.forms.feature_map import site_map

DECODE_FORMS = tuple(name for name, form in FORMS.items() if form.decode is not None)


@dataclass(frozen=True)
class DecodeState:
    """The running sums after `length` tokens: s (B·H, M, Dv + 1) = Σ_j γ^(t−j) φk_j ⊗ [v_j, 1];
    shift (B·H,) the keys' running stabilizer (a stabilized map's; −∞ before the first key)."""
    s: torch.Tensor
    shift: torch.Tensor
    batch: int
    length: int = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.s.dtype


def decode_root(attn):
    """The planned IR the module decodes with: the first of its plans that is decodable, else the
    spec planned with a decodable form forced; SpecError when there is none."""
    root = next((p.root for p in attn.plans if decodable(p.root)), None)
    if root is None and attn.spec.causal:
        for name in DECODE_FORMS:
            try:
                planned = pipeline.run(attn.spec, attn.head_dim, attn.value_dim, plan_name=name)
            except SpecError:
                continue
            if decodable(planned.root):
                root = planned.root
                break
    if root is None:
        why = "" if attn.spec.causal else " (and it has no causal mask, so a token sees later keys)"
        raise SpecError(f"spec '{attn.spec.name}' cannot be decoded token by token: step() needs a causal "
                        f"linear attention with a running state, the forms {', '.join(DECODE_FORMS)}{why}",
                        attn.spec.span,
                        help="a feature-map kernel with `mask = causal`, and no position term or a geometric "
                             "one (alibi, position(r) = -a * abs(r)); call the module on the whole prefix otherwise")
    return root


def initial_state(attn, batch: int, dtype: torch.dtype = torch.float32, device="cpu") -> DecodeState:
    """The state before the first token, for `batch` sequences; float16/bfloat16 steps keep a
    float32 state."""
    from .module import KERNEL_DTYPES, UPCAST
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    dtype = UPCAST.get(dtype, dtype)
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"a decoding state is float32 or float64 (float16 and bfloat16 steps keep float32), "
                        f"got {dtype}")
    width = site_map(attn._decode_root()).width
    rows = batch * attn.heads
    return DecodeState(torch.zeros(rows, width, attn.value_dim + 1, dtype=dtype, device=device),
                       torch.full((rows,), torch.finfo(dtype).min, dtype=dtype, device=device), batch)


def step(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
         state: DecodeState) -> tuple[torch.Tensor, DecodeState]:
    """(out (B, H, 1, Dv), the state after this token) for one token q (B, H, 1, Dk), k (B, Hkv, 1, Dk),
    v (B, Hkv, 1, Dv); Hkv < H: grouped heads, query head h reading kv head h // (H / Hkv)."""
    from .module import KERNEL_DTYPES, UPCAST
    if not isinstance(state, DecodeState):
        raise TypeError(f"state must be the DecodeState of initial_state() or a previous step(), got "
                        f"{type(state).__name__}")
    attn._validate(q, k, v)
    B, H, N, _ = q.shape
    if N != 1 or k.shape[2] != 1:
        raise ValueError(f"step() takes one token, (batch, heads, 1, dim); got q {tuple(q.shape)}, k "
                         f"{tuple(k.shape)}: call the module on the whole sequence, or step token by token")
    if k.shape[1] != H:                          # grouped heads: the state is per query head
        k, v = (t.repeat_interleave(H // k.shape[1], 1) for t in (k, v))
    if B != state.batch:
        raise ValueError(f"the state holds {state.batch} sequences, these inputs {B}")
    dtype = UPCAST.get(q.dtype, q.dtype)
    if dtype != state.dtype:
        raise TypeError(f"the state is {state.dtype}, these inputs compute in {dtype}: make the state with "
                        f"initial_state(batch, dtype={dtype})")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError("step() is for inference and does not propagate gradients: call it under "
                           "torch.no_grad(), or train with the full forward")
    root = attn._decode_root()
    kernel = ops._kernel(attn._decode_library(KERNEL_DTYPES[dtype]), DECODE_KERNEL)
    rows = [t.to(dtype).reshape(B * H, 1, -1).contiguous() for t in (q, k, v)]
    _, wt = attn._projection(dtype, rows[0].device)
    # a decayed term's rates do not depend on the length (params': b(0) − b(1), from n = 2)
    tab = (decayed.rates(root, attn._position_params(dtype, 2)) if root.form == "decayed"
           else rows[0].new_zeros(1, 2))
    if bool((tab < 0).any()):
        raise ValueError(f"{attn.spec.name}: the params make b(r) grow with distance (rate "
                         f"{float(tab.min()):.3g} < 0 in some head), which a decaying running state cannot "
                         f"carry; call the module on the whole prefix instead")
    out = rows[2].new_empty(rows[2].shape)
    s, shift = torch.empty_like(state.s), torch.empty_like(state.shift)
    kernel(*rows, wt, tab.to(rows[0].device).contiguous(), state.s, state.shift, out, s, shift)
    return out.reshape(B, H, 1, attn.value_dim).to(q.dtype), DecodeState(s, shift, B, state.length + 1)

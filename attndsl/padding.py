"""Key padding masks: the keys a call leaves out of every sum (docs/language.md#key-padding-masks).

`attn(q, k, v, key_padding_mask=pad)` takes pad (B, N) bool, True = padding (the convention of
torch.nn.MultiheadAttention). A padded key j takes part in no numerator and no normalizer:

    out_i = Σ_{j ∈ M(i), j not padded} A_ij v_j / (Σ_{j ∈ M(i), j not padded} A_ij + eps)

and a row left with no key (every key padded, or, causal, every j ≤ i) outputs 0 with zero
gradients, in every form and whatever `eps` (as eps makes an empty row of a map that can vanish).

How the forms leave a key out, with a copy of k or of its features (of both for a stabilized map)
and no pass over the pairs:
  feature maps    φk_j is set to 0 (the fused elementwise maps read k_j set to a point where φ
                  vanishes, `vanishing_point`); v_j then adds 0 (values_fft: v_j is set to 0);
                  a stabilized map's k_j is set to 0 first, so that its stabilizer ignores it
  softmax         k_j is set to 0 and the key's score gets KEY_OUT added (the kernels' `kb`
                  input): e^(s − m) is 0 in every row that sees a kept key
  empty rows      the normalizing kernels' out and den are set to 0 and 1 there (ops.py), so the
                  backward pass reads finite values; the softmax forms' out is set to 0
A padded key's k or v that is not finite reaches no output: nonfinite.py's rule leaves it out. A
row far from every kept key of a decaying position term has a tiny normalizer: precision.py
judges the Toeplitz-FFT form over the kept keys, the decayed form computes the rows past the last
kept key (before the first) from the state there (lowering/forms/decayed.py), and the module's
normalizer watch takes any other underflowing call to float64 (module.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .nonfinite import seen_by_rows

# added to a padded key's score: far below any score (e^(s − 1e30) underflows to 0 in float32 and
# float64), and finite, so that a row with no key left computes a mean of zeros instead of 0/0
KEY_OUT = -1e30


@dataclass(frozen=True)
class Padding:
    """One call's mask, per batch·head row: `keys` (BH, Nk) True where key j is padding; `rows`
    their flat indices into BH·Nk (None under torch.compile, whose graphs take no data-dependent
    shapes); `empty` (BH, N) True where query row i sees no kept key, or a (0, 0) tensor when no row
    is empty; `scratch`: buffers `drop` may reuse from call to call (a call without autograd),
    by (tag, shape, dtype, device), else None."""
    keys: torch.Tensor
    rows: torch.Tensor | None
    empty: torch.Tensor
    scratch: dict | None = None

    @staticmethod
    def of(mask: torch.Tensor, heads: int, causal: bool, scratch: dict | None = None,
           window: int | None = None, queries: int | None = None) -> "Padding":
        """From the user's (B, Nk) bool mask; `window`: the spec's sliding window W (a row sees
        the keys within ±W, or W before it when causal); `queries`: the number of query rows
        (default Nk; cross-attention: `empty` is (BH, queries))."""
        B, N = mask.shape
        keys = mask[:, None, :].expand(B, heads, N).reshape(B * heads, N).contiguous()
        empty = ~seen_by_rows(~keys[..., None], N if queries is None else queries, causal, window)[..., 0]
        if torch.compiler.is_compiling():
            return Padding(keys, None, empty.contiguous())
        if not bool(empty.any()):
            empty = no_rows(keys.device)
        return Padding(keys, keys.reshape(-1).nonzero().flatten(), empty.contiguous(), scratch)

    def keys_of(self, rows: int) -> torch.Tensor:
        """`keys` for k-like tensors of `rows` rows: BH, or a row per kv head of grouped heads
        (BH / G), whose keys are those of its query rows (one mask per batch element)."""
        return self.keys if rows == self.keys.shape[0] else self.keys[::self.keys.shape[0] // rows]

    def drop(self, x: torch.Tensor, fill: float = 0.0, tag: str = "") -> torch.Tensor:
        """x (BH, N, width) with the padded rows set to `fill`: a copy (differentiable: those rows
        get no gradient) and a fill of the padded rows only; without autograd, into this call's
        scratch buffer `tag` (a fresh tensor of tens of MB costs more in page faults than the
        copy: docs/performance.md). x may have a row per kv head of grouped heads (keys_of)."""
        if self.rows is None or x.shape[0] != self.keys.shape[0]:
            return x.masked_fill(self.keys_of(x.shape[0])[..., None], fill)
        if self.rows.numel() == 0:
            return x
        if self.scratch is None:
            y = x.clone(memory_format=torch.contiguous_format)
        else:
            # an inference-mode tensor cannot be written outside inference mode: one of each
            key = (tag, tuple(x.shape), x.dtype, x.device, torch.is_inference_mode_enabled())
            y = self.scratch.get(key)
            if y is None:
                if len(self.scratch) > 8:
                    self.scratch.clear()
                y = self.scratch[key] = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            y.copy_(x)
        return y.view(-1, x.shape[-1]).index_fill_(0, self.rows, fill).view(x.shape)

    def zero_empty(self, out: torch.Tensor) -> torch.Tensor:
        """out (BH, N, width) with the rows that see no kept key set to 0."""
        return out.masked_fill(self.empty[..., None], 0) if self.empty.numel() else out

    def key_bias(self, dtype, rows: int | None = None) -> torch.Tensor:
        """(rows, N), rows BH by default (keys_of): KEY_OUT at padded keys, 0 elsewhere."""
        keys = self.keys_of(self.keys.shape[0] if rows is None else rows)
        return torch.zeros(keys.shape, dtype=dtype, device=keys.device).masked_fill_(keys, KEY_OUT)


_NO_ROWS: dict = {}


def no_rows(device) -> torch.Tensor:
    """The (0, 0) bool tensor that says "no empty rows" to the normalizing ops (made once per device)."""
    if torch.compiler.is_compiling():
        return torch.zeros(0, 0, dtype=torch.bool, device=device)
    t = _NO_ROWS.get(device)
    if t is None:
        t = _NO_ROWS[device] = torch.zeros(0, 0, dtype=torch.bool, device=device)
    return t


def vanishing_point(values) -> float | None:
    """A finite or infinite x where a fused elementwise map is exactly 0 with a finite derivative,
    from `values(x)` -> (φ(x), φ′(x)) as floats; None when none of −inf, 0, +inf, −1, 1 is one."""
    for x in (-math.inf, 0.0, math.inf, -1.0, 1.0):
        f, df = values(x)
        if f == 0.0 and math.isfinite(df):
            return x
    return None


def check_mask(mask, B: int, N: int, device) -> torch.Tensor:
    """The user's key_padding_mask as (B, N) bool on `device`, or a ValueError/TypeError that says
    what is expected. Float masks are additive (nn.MultiheadAttention's): 0 keeps a key, −inf pads it."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a torch.Tensor (batch, keys) of bool, True = padding; got "
                        f"{type(mask).__name__}")
    if tuple(mask.shape) != (B, N):
        raise ValueError(f"key_padding_mask has shape {tuple(mask.shape)}, expected (batch, keys) = {(B, N)} "
                         f"(True = padding, as nn.MultiheadAttention's)")
    if mask.dtype != torch.bool:
        if not mask.is_floating_point():
            raise TypeError(f"key_padding_mask has dtype {mask.dtype}: use bool (True = padding), or a float "
                            f"mask of 0 and -inf")
        keep, out = mask == 0, torch.isneginf(mask)
        if not bool((keep | out).all()):
            raise ValueError("key_padding_mask: a float mask may hold only 0 (keep) and -inf (padding); "
                             "attndsl's forms take no other per-key bias")
        mask = out
    if mask.device != device:
        raise ValueError(f"key_padding_mask is on {mask.device}, the inputs on {device}")
    return mask

"""NaN and Inf: a non-finite input reaches exactly the outputs its mask lets it reach (docs/numerics.md).

The kernels mix rows: an FFT spreads one NaN over every row, a chunked prefix sum multiplies the
masked pairs of a chunk by 0 (0·NaN = NaN), and some feature maps drop NaN. `guarded` keeps the
kernels' fast path for finite inputs (one sum over the output; over q, k and v for the sampled
forms, which may never read a given key) and otherwise runs them on the inputs with their non-finite entries set to
0, then writes NaN where the reference has a non-finite value (always so under torch.compile, whose graph
has no data-dependent branch):

    out[i, d] is NaN  ⇔  row i sees a key, and q_i is not finite or row i sees a key j with k_j
                          not finite or v_jd not finite

(the keys a row sees: its mask's, a sliding window's included, less those a key padding mask
pads, attndsl/padding.py).

Gradients follow the reference too: NaN from the outputs that are NaN, to the inputs they depend on.
q (BH, N, Dk), k (BH, Nk, Dk), v (BH, Nk, Dv), out (BH, N, Dv); Nk ≠ N in cross-attention.
"""
from __future__ import annotations

from typing import Callable

import torch


def _finite(*tensors: torch.Tensor) -> bool:
    """Whether every element is finite: a sum is not finite if any element is not (or if the sum
    overflows, which only sends the caller down the exact slow path). On the CPU the sum is a
    compiled kernel's (lowering/cpu/finite.py), which opens no OpenMP team of torch's."""
    global _all_finite
    if _all_finite is None:                          # imported here: the lowering imports TVM
        from .lowering.cpu.finite import all_finite as _all_finite
    return all(_all_finite(t) for t in tensors)


_all_finite = None


class _Poisoned(torch.autograd.Function):
    """out with NaN at `hit`; backward: the finite outputs' gradient flows on into `out`, and a
    reached output with a nonzero gradient sends NaN to its row of q and to every key its row
    sees, as the reference's own backward does."""

    @staticmethod
    def forward(ctx, out, hit, q, k, v, causal, window, padded):
        ctx.save_for_backward(hit, padded)
        ctx.causal, ctx.window, ctx.shapes = causal, window, (q.shape, k.shape, v.shape)
        return out.masked_fill(hit, float("nan"))

    @staticmethod
    def backward(ctx, g):
        hit, padded = ctx.saved_tensors
        rows = (hit & (g != 0)).any(-1)                                  # (BH, N), NaN != 0
        keys = rows_of_keys(rows[..., None], ctx.shapes[1][1], ctx.causal, ctx.window)[..., 0] & ~padded
        nan = [g.new_zeros(shape).masked_fill(m[..., None], float("nan"))
               for shape, m in zip(ctx.shapes, (rows, keys, keys))]
        return (g.masked_fill(hit, 0), None, *nan, None, None, None)


def within(x: torch.Tensor, lo: int, hi: int, rows: int | None = None) -> torch.Tensor:
    """y[:, i] = x[:, i + lo … i + hi].any(1) for i < `rows` (default N), the range clipped to the
    sequence; x (BH, N, C) bool -> (BH, rows, C)."""
    n = x.shape[1]
    c = torch.cat([x.new_zeros((x.shape[0], 1, x.shape[2]), dtype=torch.long), x.long().cumsum(1)], 1)
    i = torch.arange(n if rows is None else rows, device=x.device)
    return (c[:, (i + hi + 1).clamp(0, n)] - c[:, (i + lo).clamp(0, n)]) > 0


def seen_by_rows(x: torch.Tensor, rows: int, causal: bool, window: int | None) -> torch.Tensor:
    """y[:, i] = x[:, j].any(1) over the keys j that row i sees, for i < `rows`: j ≤ i when causal,
    |i − j| ≤ window (i − j ∈ [0, window] when causal) with a sliding window, every j otherwise;
    x (BH, Nk, C) bool -> (BH, rows, C)."""
    if window is not None:
        return within(x, -window, 0 if causal else window, rows)
    if causal:                                                       # any key j ≤ i; past the keys, all
        c = x.cumsum(1) > 0
        if rows <= c.shape[1]:
            return c[:, :rows]
        return torch.cat([c, c[:, -1:].expand(-1, rows - c.shape[1], -1)], 1)
    return x.any(1, keepdim=True).expand(-1, rows, -1)


def rows_of_keys(x: torch.Tensor, keys: int, causal: bool, window: int | None) -> torch.Tensor:
    """The transpose of seen_by_rows: y[:, j] = x[:, i].any(1) over the rows i that see key j, for
    j < `keys`; x (BH, Nq, C) bool -> (BH, keys, C)."""
    if window is not None:
        return within(x, 0 if causal else -window, window, keys)
    if causal:                                                       # any row i ≥ j; past the rows, none
        c = x.flip(1).cumsum(1).flip(1) > 0
        if keys <= c.shape[1]:
            return c[:, :keys]
        return torch.cat([c, c.new_zeros(c.shape[0], keys - c.shape[1], c.shape[2])], 1)
    return x.any(1, keepdim=True).expand(-1, keys, -1)


def reached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
            pad=None, window: int | None = None) -> torch.Tensor:
    """(BH, N, Dv) bool: the outputs a non-finite q (BH, N, Dk), k or v (BH, Nk, ·) reaches (row i
    sees j ≤ i if causal, every j otherwise, only |i − j| ≤ window with a sliding window; with a
    key padding mask `pad` (padding.Padding) not the padded keys, and nothing from a row that sees
    no key)."""
    bad_q = ~torch.isfinite(q).all(-1, keepdim=True)                 # (BH, N, 1)
    bad_k = ~torch.isfinite(k).all(-1, keepdim=True)                 # (BH, Nk, 1)
    bad_v = ~torch.isfinite(v)                                       # (BH, Nk, Dv)
    seen = bad_k | bad_v
    if pad is not None:
        seen = seen & ~pad.keys[..., None]
    seen = seen_by_rows(seen, q.shape[1], causal, window) | bad_q     # (BH, N, Dv)
    return seen if pad is None or not pad.empty.numel() else seen & ~pad.empty[..., None]


def guarded(run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
            q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
            reads_every_key: bool = True, pad=None, window: int | None = None) -> torch.Tensor:
    """run(q, k, v) with the NaN rule. `reads_every_key`: False for the sampled forms, whose
    output may not see a non-finite key at all, so their inputs are checked instead; `pad`: the
    call's key padding mask (padding.Padding), whose padded keys no row sees; `window`: the
    spec's sliding window W, beyond which no row sees a key."""
    if torch.compiler.is_compiling():             # no data-dependent branch in a graph: always exact
        return _exact(run, q, k, v, causal, pad, window)
    if not reads_every_key and not _finite(q, k, v):
        out = None
    else:
        out = run(q, k, v)
        if _finite(out) or _finite(q, k, v):      # nothing reached, or the kernels' own overflow
            return out
    return _exact(run, q, k, v, causal, pad, window)


def _exact(run, q, k, v, causal, pad=None, window=None):
    """run on the inputs with their non-finite entries zeroed, NaN where the reference has it.
    Grouped heads (k, v of BH / G rows, Form.grouped) are expanded to a key row per query row."""
    if k.shape[0] != q.shape[0]:
        k, v = (t.repeat_interleave(q.shape[0] // k.shape[0], 0) for t in (k, v))
    clean = [t.masked_fill(~torch.isfinite(t), 0) for t in (q, k, v)]
    padded = torch.zeros(k.shape[:2], dtype=torch.bool, device=k.device) if pad is None else pad.keys
    return _Poisoned.apply(run(*clean), reached(q, k, v, causal, pad, window), q, k, v, causal, window, padded)

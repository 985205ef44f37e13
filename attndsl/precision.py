"""What the Toeplitz-FFT scores form can resolve, per dtype and length (docs/numerics.md).

The FFT computes y_i = Σ_j c(i−j) x_j, c = exp(b), with an absolute error of about
ε·‖c‖₂·‖x‖₂ over the whole sequence, while row i's own value is of the order of its weights
Σ_{j∈M(i)} c(i−j) times the data. A row whose weights are small beside the largest ones anywhere
(b growing with distance, a learned table grown far from 0) loses its digits. The condition

    κ = ‖c‖₂·√N / min_i Σ_{j∈M(i)} c(i−j)        (c over the offsets the mask uses)

bounds the worst row's relative error by about ε·κ (measured: 0.3–1 ε·κ over tables growing and
decaying with |r| and r, causal and not, N = 512). A call is run in its dtype while 2·ε·κ ≤ TOL,
else in float64 where that suffices (float32 in, float32 out), else refused with an error that
says why and what to use instead. TOL is the caller's dtype's: a float32 call computed in
float64 need only be right to float32's tolerance. Where the module has an exact plan (no FFT
site) that its cost model puts below FLOAT64_COST times the FFT plan's, a call the FFT would run
in float64 runs that plan in its own dtype instead.
"""
from __future__ import annotations

import math

import torch

from .ast import Choice, learned_table
from .expr import evaluate

# the worst row's relative error a call may have, per dtype of the computation
TOL = {torch.float32: 1e-3, torch.float64: 1e-9}
EPS = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}
SAFETY = 2.0                       # the predicted error is SAFETY·ε·κ
# a float64 run's time over the same run's in float32 (half the vector lanes; the Toeplitz-FFT
# form measured 2.1x at N = 4096, benchmarks/bench_padding.py)
FLOAT64_COST = 2.0


class PrecisionError(ValueError):
    """The position term spans more than the FFT form can resolve at this length, in any dtype."""


def position_values(position: Choice, n: int, heads: int, table: torch.Tensor | None,
                    slopes: torch.Tensor | None) -> torch.Tensor:
    """b_h(r) at r = −(n−1) … n−1, (H, 2n−1) float64."""
    r = torch.arange(-(n - 1), n, dtype=torch.float64)
    if learned_table(position):                  # (H, 2W + 1), clipped at W (tabulated: W = n − 1)
        w = (table.shape[-1] - 1) // 2
        return table.detach().double()[:, r.long().clamp(-w, w) + w]
    if position.name == "alibi":
        return -slopes.detach().double().reshape(-1, 1) * r.abs()
    return evaluate(position.expr, r).expand(heads, -1)


def condition(b: torch.Tensor, causal: bool) -> float:
    """κ (above) of b (H, 2n−1) over r = −(n−1) … n−1, the largest over heads."""
    n = (b.shape[-1] + 1) // 2
    if causal:
        b = b[:, n - 1:]                                    # r = 0 … n−1 (j ≤ i)
    if not torch.isfinite(b).all():
        return math.inf
    c = torch.exp(b - b.amax(-1, keepdim=True))             # the scale cancels in κ
    csum = torch.cat([c.new_zeros(c.shape[0], 1), c.cumsum(-1)], -1)
    if causal:
        rows = csum[:, 1:]                                  # row i: r = 0 … i
    else:
        rows = csum[:, n:] - csum[:, :n]                    # row i: r = i−(n−1) … i
    kappa = c.norm(dim=-1) * math.sqrt(n) / rows.amin(-1)
    return float(kappa.max())


def padded_condition(b: torch.Tensor, causal: bool, kept: torch.Tensor, empty: torch.Tensor) -> float:
    """κ of b (H, 2n−1) when a key padding mask keeps only `kept` (B, n) bool keys: the row sums
    Σ_{j∈M(i), j kept} c(i−j) by one FFT per batch and head in float64 (a row far from every kept
    key of a decaying b has a small one); `empty` (B·H, n) or (0, 0): rows seeing no key, left out."""
    n = kept.shape[1]
    if causal:
        b = b.clone()
        b[:, :n - 1] = -math.inf                                    # r < 0: not seen
    if not torch.isfinite(b[:, n - 1:] if causal else b).all():
        return math.inf
    c = torch.exp(b - b.amax(-1, keepdim=True))                     # (H, 2n − 1), c[r + n − 1]
    L = 4 * n
    rows = torch.fft.irfft(torch.fft.rfft(c, L)[None] * torch.fft.rfft(kept.double(), L)[:, None], L)
    rows = rows[..., n - 1:2 * n - 1].reshape(-1, n)                 # (B·H, n): Σ_j c(i−j) kept_j
    if empty.numel():
        rows = rows.masked_fill(empty.to(rows.device), math.inf)
    kappa = c.norm(dim=-1).amax() * math.sqrt(n) / rows.amin().clamp_min(0)
    return float(kappa)


def limit(dtype: torch.dtype, within: torch.dtype | None = None) -> float:
    """The largest κ a computation in `dtype` resolves to the tolerance of `within` (its own)."""
    return TOL[within or dtype] / (SAFETY * EPS[dtype])


def dtype_for(kappa: float, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype to compute a call in dtype `dtype` of condition κ in, to that dtype's tolerance:
    its own, float64, or None (neither)."""
    for d in (dtype, torch.float64):
        if kappa <= limit(d, dtype):
            return d
    return None


def refusal(kappa: float, n: int, dtype: torch.dtype, what: str) -> PrecisionError:
    return PrecisionError(
        f"the Toeplitz-FFT form cannot compute {what} at N={n} within tolerance: exp(b) spans so much "
        f"that rows whose weights are small beside the largest ones lose their digits (condition "
        f"κ = {kappa:.3g}; float32 resolves κ ≤ {limit(torch.float32):.3g}, float64 κ ≤ "
        f"{limit(torch.float64):.3g}). Use plan='auto' or plan='pairwise' (exact pair by pair, O(N²)), "
        f"for a learned table plan='banded' (exact for any table, O(N·W)), or a bias that decays (or "
        f"stays flat) with distance")


LENGTHS = tuple(2 ** p for p in range(4, 17))     # 16 … 65536
MIN_LENGTH = 128                                   # a fixed term resolved only below this is refused


def longest(position: Choice, causal: bool, heads: int, slopes: torch.Tensor | None,
            dtype: torch.dtype) -> int:
    """The longest N of LENGTHS at which a fixed position term (a function or alibi) resolves to
    `dtype`'s tolerance (computed in dtype or float64); 0 if none. κ grows with N."""
    best = 0
    for n in LENGTHS:
        b = position_values(position, n, heads, None, slopes)
        if dtype_for(condition(b, causal), dtype) is None:
            break
        best = n
    return best


# --- the stabilized feature maps (favor, hyperbolic, exp_shift) --------------------------------------
#
# Their key stabilizer divides every φ(k) by exp(max over the keys), so a key whose scores are far
# above the others' (or a query row that sees only keys far below them, as a causal row may) sends
# the other terms of a row's normalizer below the dtype's smallest normal number, where they vanish:
# a row can lose digits or become 0/0. A lost term is below that number, and a row has at most N·M
# of them, so a normalizer (in the kernels' units) above UNDERFLOW[dtype] has lost less than 1e-8 of
# itself for any N·M ≤ 2^40 (2^40·1.2e-38 = 1.3e-26 against 1e-18 in float32).
UNDERFLOW = {torch.float32: 1e-18, torch.float64: 1e-290}


def padding_refusal(spec_name: str, n: int) -> PrecisionError:
    return PrecisionError(
        f"{spec_name} at N={n}: with this key padding mask some row's kept keys all lie where exp(b) "
        f"is below ~1e-290 of the row's largest weight (a row far from every kept key of a decaying "
        f"position term, such as a row inside a long run of padded keys), so its normalizer "
        f"underflows even in float64. Pad the sequences at their ends only (the decayed form "
        f"computes the rows past a sequence's end exactly), or use a position term that decays less "
        f"with distance")


def stabilizer_refusal(spec_name: str, n: int) -> PrecisionError:
    return PrecisionError(
        f"{spec_name} at N={n}: the feature map's stabilizer cannot hold these keys even in float64: "
        f"some keys' random-feature scores lie more than ~700 nats above the scores a row sees, so "
        f"that row's normalizer underflows. Normalize q and k (e.g. LayerNorm) or lower their scale, "
        f"or use kernel = softmax (exact, online max per row)")

"""The discrete half of sampled softmax attention, in torch: LSH buckets, the sort, the samples.
The kernels (lowering/sampled.py) do the arithmetic; everything here is O(N·(Dk·r + log N)).

KDEformer (Zandieh et al. 2023), `sampling = kde(buckets, block, samples, seed)`:
  1. angular LSH: r = log2(buckets) random hyperplanes; a row's bucket is its sign pattern, ranked
     in Gray-code order so that neighbouring buckets differ in one bit;
  2. queries and keys are sorted by bucket (stably) and cut into blocks of `block` rows; block g of
     the queries sees block g of the keys exactly (the diagonal blocks);
  3. `samples` keys are drawn i.i.d. from p_j = ½·|v_j|²/Σ_l |v_l|² + ½/N (value norms mixed with
     uniform) and weighted 1/(p_j·samples); the kernels drop those a query's block already holds.
`uniform(samples, seed)`: no sort, blocks of one row (a query's own key is exact), p_j = 1/N.

Seeded and reproducible: the hyperplanes come from `seed` (a module buffer), the samples from a
generator seeded with `seed` on every call, so the same inputs give the same output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def hyperplanes(buckets: int, head_dim: int, seed: int) -> Tensor:
    """(Dk, r) Gaussian hyperplanes, r = log2(buckets)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(head_dim, int(math.log2(buckets)), generator=g, dtype=torch.float64)


def gray_rank(code: Tensor, bits: int) -> Tensor:
    """The position of Gray code word `code` in the Gray sequence (g(p) = p ^ (p >> 1) inverted)."""
    rank, shift = code.clone(), 1
    while shift < bits:
        rank ^= rank >> shift
        shift *= 2
    return rank


def bucket_order(x: Tensor, planes: Tensor) -> Tensor:
    """(BH, N) permutation sorting the rows of x (BH, N, Dk) by Gray-ranked LSH bucket, stably."""
    bits = planes.shape[1]
    signs = (x.detach() @ planes.to(x.dtype)) > 0                       # (BH, N, r)
    code = (signs.long() << torch.arange(bits)).sum(-1)
    return torch.sort(gray_rank(code, bits), dim=-1, stable=True).indices


def _rows(x: Tensor, idx: Tensor) -> Tensor:
    """x[b, idx[b, t]] for x (BH, N, D), idx (BH, T) -> (BH, T, D) (differentiable)."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


@dataclass
class Samples:
    """What the kernels read: sorted rows, the sampled keys, their log-weights and blocks."""
    q: Tensor          # (BH, N, Dk), sorted
    k: Tensor
    v: Tensor          # (BH, N, Dv), sorted like k
    ks: Tensor         # (BH, S, Dk)
    vs: Tensor         # (BH, S, Dv)
    lw: Tensor         # (BH, S): log 1/(p·S)
    sb: Tensor         # (BH, S) int32: the block holding each sampled key
    block: int
    unsort: Tensor | None      # (BH, N): output row of each query, None if unsorted


def draw(q: Tensor, k: Tensor, v: Tensor, sampling, planes: Tensor | None, seed: int) -> Samples:
    """Sort and sample for one call; q, k (BH, N, Dk), v (BH, N, Dv) contiguous."""
    BH, N, _ = k.shape
    S = int(sampling["samples"])
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(BH, S, generator=gen, dtype=torch.float64)
    if sampling.name == "kde":
        block, pq, pk = int(sampling["block"]), bucket_order(q, planes), bucket_order(k, planes)
        q, k, v = _rows(q, pq), _rows(k, pk), _rows(v, pk)
        unsort = torch.argsort(pq, dim=-1)
        norms = v.square().sum(-1)
        total = norms.sum(-1, keepdim=True)
        p = 0.5 / N + torch.where(total > 0, 0.5 * norms / total.clamp_min(torch.finfo(v.dtype).tiny),
                                  0.5 / N)
        cdf = p.detach().double().cumsum(-1)
        idx = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_max(N - 1)
        lw = -torch.log(p.gather(1, idx) * S)
    else:                          # uniform: identity order, a query's own key is its block
        block, unsort = 1, None
        idx = (u * N).long().clamp_max(N - 1)
        lw = torch.full((BH, S), -math.log(S / N), dtype=v.dtype)
    if S == 0:       # TVM refuses torch's strides of an empty tensor: one sample of weight e^−1e30 = 0
        idx, lw = idx.new_zeros(BH, 1), torch.full((BH, 1), -1e30, dtype=v.dtype)
    return Samples(q, k, v, _rows(k, idx), _rows(v, idx), lw.to(v.dtype),
                   (idx // block).to(torch.int32), block, unsort)


def restore(out: Tensor, s: Samples) -> Tensor:
    """The kernel output (BH, N, Dv) in sorted query order, back in the caller's order."""
    return out if s.unsort is None else _rows(out, s.unsort)

"""The discrete half of sampled softmax attention, in torch: LSH buckets, the sort, the samples.
The kernels (lowering/cpu/sampled.py) do the arithmetic; everything here is O(N·(Dk·r + log N)).

KDEformer (Zandieh et al. 2023), `sampling = kde(buckets, block, samples, seed)`:
  1. angular LSH: r = log2(buckets) random hyperplanes; a row's bucket is its sign pattern, ranked
     in Gray-code order so that neighbouring buckets differ in one bit;
  2. queries and keys are sorted by bucket (stably) and cut into blocks of `block` rows; block g of
     the queries sees block g of the keys exactly (the diagonal blocks);
  3. `samples` keys are drawn i.i.d. from p_j = ½·w_j + ½/N and weighted 1/(p_j·samples); the
     kernels drop those a query's block already holds. w_j = |v_j|²/Σ_l |v_l|² (residual=values,
     the default), or (residual=columns) the column sums of D⁻¹A estimated on R random queries,
     w_j = (1/R) Σ_{i∈R} softmax_j(s·q_i·k_j): KDEformer's density estimate of where the attention
     mass goes (it finds the keys every query attends, e.g. a model's [CLS]/[SEP] sinks).
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
    BH, N, D = x.shape
    bits = planes.shape[1]
    signs = (x.detach().reshape(BH * N, D) @ planes.to(x)) > 0     # (BH·N, r)
    bit = 1 << torch.arange(bits, dtype=torch.int32, device=x.device)
    code = (signs.to(torch.int32) * bit).sum(-1, dtype=torch.int32)
    return torch.sort(gray_rank(code.reshape(BH, N), bits), dim=-1, stable=True).indices


@dataclass
class Samples:
    """What the kernels read besides q, k, v: the visiting orders, the samples and their weights."""
    pq: Tensor         # (BH, N) int32: the rows of q in bucket order
    pk: Tensor         # (BH, N) int32: the rows of k and v in bucket order
    si: Tensor         # (BH, S) int32: the sampled rows of k and v
    lw: Tensor         # (BH, S): log 1/(p·S), differentiable in v (or q, k) for kde
    sb: Tensor         # (BH, S) int32: the block (of sorted keys) holding each sample
    block: int

    def args(self) -> tuple:
        return self.pq, self.pk, self.si, self.lw, self.sb


def residual_weights(q: Tensor, k: Tensor, v: Tensor, sampling, gen: torch.Generator, scale: float) -> Tensor:
    """w (BH, N), rows summing to 1 (or 0 where all of v is 0): what the residual samples follow."""
    if sampling["residual"] == "columns":          # (1/R) Σ_{i∈R} softmax_j(s q_i·k_j)
        BH, N, D = q.shape
        rows = torch.randint(N, (BH, min(N, max(8, int(sampling["samples"])))), generator=gen).to(q.device)
        qr = q.gather(1, rows[..., None].expand(-1, -1, D))
        return torch.softmax(scale * qr @ k.transpose(1, 2), dim=-1).mean(1)
    norms = torch.linalg.vector_norm(v, dim=-1).square()
    return norms / norms.sum(-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)


def block_rows(sampling) -> int:
    """Rows per block of the sorted order: kde's `block`; 1 for uniform (a query's own key)."""
    return int(sampling["block"]) if sampling.name == "kde" else 1


# the samples of one call, B·H·samples, take about 48 bytes each: at most 2^25 (1.5 GiB)
MAX_DRAWN = 1 << 25


def check_size(sampling, BH: int, N: int) -> None:
    """A ValueError, before any allocation, when a call would draw more than MAX_DRAWN samples."""
    S = int(sampling["samples"])
    if BH * S > MAX_DRAWN:
        raise ValueError(
            f"sampling = {sampling.name}(samples={S}) draws {S} keys for each of the B·H = {BH} "
            f"rows: {BH * S:,} samples, {BH * S * 48 / 2**30:.1f} GiB, more than {MAX_DRAWN:,} per "
            f"call; use fewer samples (a query reads {N} keys in exact attention) or a smaller batch")


def draw(q: Tensor, k: Tensor, v: Tensor, sampling, planes: Tensor | None, seed: int,
         scale: float | None = None) -> Samples:
    """Sort and sample for one call; q, k (BH, N, Dk), v (BH, N, Dv); scale s (default 1/√Dk).
    The random numbers come from a CPU generator whatever the tensors' device, so a seed draws the
    same samples on a GPU as on the CPU."""
    BH, N, _ = k.shape
    check_size(sampling, BH, N)
    S = int(sampling["samples"])
    dev = k.device
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(BH, S, generator=gen, dtype=torch.float64).to(dev)
    if sampling.name == "kde":
        pq, pk = bucket_order(q, planes), bucket_order(k, planes)
        w = residual_weights(q, k, v, sampling, gen, scale if scale is not None else q.shape[-1] ** -0.5)
        total = w.sum(-1, keepdim=True)
        p = 0.5 / N + torch.where(total > 0, 0.5 * w, 0.5 / N)
        cdf = p.detach().double().gather(1, pk).cumsum(-1)          # over keys in sorted order
        pos = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_max(N - 1)
        si = pk.gather(1, pos)
        lw = -torch.log(p.gather(1, si) * S)
    else:                          # uniform: identity order, a query's own key is its block
        pq = pk = torch.arange(N, device=dev).expand(BH, N)
        pos = si = (u * N).long().clamp_max(N - 1)
        lw = torch.full((BH, S), -math.log(S / N), dtype=v.dtype, device=dev)
    if S == 0:       # TVM refuses torch's strides of an empty tensor: one sample of weight e^−1e30 = 0
        pos = si = pos.new_zeros(BH, 1)
        lw = torch.full((BH, 1), -1e30, dtype=v.dtype, device=dev)
    i32 = lambda t: t.to(torch.int32).contiguous()
    block = block_rows(sampling)
    return Samples(i32(pq), i32(pk), i32(si), lw.to(v.dtype).contiguous(), i32(pos // block), block)

"""The discrete half of sampled softmax attention, in torch: LSH buckets, the sort, the samples.
The kernels (lowering/cpu/sampled.py) do the arithmetic; everything here is O(N·(Dk·r + log N)).

KDEformer (Zandieh et al. 2023), `sampling = kde(buckets, block, samples, heavy, tail, residual,
seed)`, with query i's exact keys E_i (its block and the heavy keys) and its tail R_i (the rest):
  1. angular LSH: r = log2(buckets) random hyperplanes; a row's bucket is its sign pattern, ranked
     in Gray-code order so that neighbouring buckets differ in one bit; within a bucket rows are
     ordered by the Gray rank of FINE further hyperplanes (a finer hash: similar rows adjacent);
  2. queries and keys are sorted by that order (stably) and cut into blocks of `block` rows; block
     g of the queries sees block g of the keys exactly (the diagonal blocks);
  3. the `heavy` keys of largest residual weight w are exact for every query (weight 1);
  4. samples − heavy keys are drawn i.i.d. from the other keys with p_j = ½·w_j/Σw + ½/|R|,
     weighted 1/(p_j·S'); the kernels drop those a query's block already holds, so
     D̂_i = Σ_t e^{s·q_i·k_t}/(p_t·S') estimates the tail's mass D_i = Σ_{j∈R_i} e^{s·q_i·k_j}
     without bias. The tail's values:
       tail=mean (default): v̄ = the mean of the non-heavy values, for every sample:
           out_i = (Σ_{j∈E_i} e^{s·q_i·k_j} v_j + D̂_i v̄) / (Σ_{j∈E_i} e^{s·q_i·k_j} + D̂_i),
         a convex combination of the exact keys' values and v̄, so no further from the exact
         output than the farthest of them; biased, by about D_i/(Σ_{j∈E_i} e^{s·q_i·k_j} + D_i)
         ·(v̄ − the tail's attention-weighted mean value);
       tail=sampled: each sample's own value v_t (importance sampling: numerator and normalizer
         unbiased, the ratio consistent, but one heavy key outside the block swings it far).
     w_j = the column sums of D⁻¹A estimated on R = samples/4 random queries (residual=columns,
     the default), w_j = (1/R) Σ_{i∈R} softmax_j(s·q_i·k_j): KDEformer's density estimate of where the
     attention mass goes (a model's [CLS]/[SEP] sinks become heavy keys); or (residual=values)
     w_j = |v_j|²/Σ_l |v_l|².
`uniform(samples, seed)`: no sort, blocks of one row (a query's own key is exact), p_j = 1/N,
each sample with its own value (importance sampling).

With a key padding mask (attndsl/padding.py) no padded key is drawn or counted: the column
weights, the tail and v̄ cover the kept keys only, a padded heavy key (fewer kept keys than `heavy`)
and the tail samples of a row with no kept tail key get the log-weight KEY_OUT (weight 0), and the
kernels add KEY_OUT to a padded key's score in the blocks.

Seeded and reproducible: the hyperplanes come from `seed` (a module buffer), the samples from a
generator seeded with `seed` on every call, so the same inputs give the same output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .padding import KEY_OUT


# hyperplanes that order the rows within a bucket
FINE = 8


def hyperplanes(buckets: int, head_dim: int, seed: int) -> Tensor:
    """(Dk, r + FINE) Gaussian hyperplanes, r = log2(buckets): the bucket's, then the order's within."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(head_dim, int(math.log2(buckets)) + FINE, generator=g, dtype=torch.float64)


def gray_rank(code: Tensor, bits: int) -> Tensor:
    """The position of Gray code word `code` in the Gray sequence (g(p) = p ^ (p >> 1) inverted)."""
    rank, shift = code.clone(), 1
    while shift < bits:
        rank ^= rank >> shift
        shift *= 2
    return rank


def bucket_order(x: Tensor, planes: Tensor, bits: int) -> Tensor:
    """(BH, N) permutation sorting the rows of x (BH, N, Dk) by Gray-ranked LSH bucket (the first
    `bits` planes), then by the Gray rank of the other planes' signs, stably."""
    BH, N, D = x.shape
    fine = planes.shape[1] - bits
    signs = (x.detach().reshape(BH * N, D) @ planes.to(x)) > 0                    # (BH·N, planes)
    powers = torch.zeros(planes.shape[1], 2, dtype=torch.float32, device=x.device)  # bit weights
    powers[:bits, 0] = 2.0 ** torch.arange(bits, device=x.device)
    powers[bits:, 1] = 2.0 ** torch.arange(fine, device=x.device)
    codes = (signs.to(torch.float32) @ powers).to(torch.int64)                   # exact below 2^24
    key = (gray_rank(codes[:, 0], bits) << fine) | gray_rank(codes[:, 1], fine)
    return torch.sort(key.reshape(BH, N), dim=-1, stable=True).indices


@dataclass
class Samples:
    """What the kernels read besides q, k, v: the visiting orders, the samples and their weights."""
    pq: Tensor         # (BH, N) int32: the rows of q in bucket order
    pk: Tensor         # (BH, N) int32: the rows of k and v in bucket order
    si: Tensor         # (BH, S) int32: the sampled rows of k (heavy keys first)
    lw: Tensor         # (BH, S): log-weights, 0 for heavy keys, log 1/(p·S') for the others;
                       # differentiable in v (or q, k) for kde
    sb: Tensor         # (BH, S) int32: the block (of sorted keys) holding each sample
    vs: Tensor         # (BH, S, Dv): each sample's value, differentiable in v (tail=mean: v̄)
    block: int

    def args(self) -> tuple:
        return self.pq, self.pk, self.si, self.lw, self.sb, self.vs


def column_rows(sampling, N: int) -> int:
    """R, the random queries residual=columns averages over: samples / 4, at least 8, at most N (the
    heavy keys it picks barely change from R = samples; it costs R·N·Dk)."""
    return min(N, max(8, int(sampling["samples"]) // 4))


def residual_weights(q: Tensor, k: Tensor, v: Tensor, sampling, gen: torch.Generator, scale: float,
                     kept: Tensor | None = None) -> Tensor:
    """w (BH, N), rows summing to 1 (or 0 where all of v is 0): what the residual samples follow;
    0 at the keys not `kept` (BH, N) bool."""
    if sampling["residual"] == "columns":          # (1/R) Σ_{i∈R} softmax_j(s q_i·k_j)
        BH, N, _ = q.shape
        rows = torch.randint(N, (BH, column_rows(sampling, N)), generator=gen).to(q.device)
        logits = scale * rows_of(q, rows) @ k.transpose(1, 2)
        if kept is None:
            return torch.softmax(logits, dim=-1).mean(1)
        return torch.softmax(logits.masked_fill(~kept[:, None, :], KEY_OUT), dim=-1).mean(1) * kept
    norms = torch.linalg.vector_norm(v, dim=-1).square()
    if kept is not None:                       # a padded value, however large, weighs 0
        norms = torch.where(kept, norms, 0)
    return norms / norms.sum(-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)


def block_rows(sampling) -> int:
    """Rows per block of the sorted order: kde's `block`; 1 for uniform (a query's own key)."""
    return int(sampling["block"]) if sampling.name == "kde" else 1


# the samples of one call, B·H·samples, take 48 + 8·(Dk + Dv) bytes each (indices, weights, the
# value rows, and in the backward their gradients): at most 1.5 GiB
MAX_DRAWN_BYTES = 3 << 29


def check_size(sampling, BH: int, N: int, width: int) -> None:
    """A ValueError, before any allocation, when a call's samples would take more than
    MAX_DRAWN_BYTES; width = Dk + Dv."""
    S = int(sampling["samples"])
    size = BH * S * (48 + 8 * width)
    if size > MAX_DRAWN_BYTES:
        raise ValueError(
            f"sampling = {sampling.name}(samples={S}) draws {S} keys for each of the B·H = {BH} "
            f"rows: {BH * S:,} samples, {size / 2**30:.1f} GiB, more than {MAX_DRAWN_BYTES / 2**30:.1f} "
            f"GiB per call; use fewer samples (a query reads {N} keys in exact attention) or a "
            f"smaller batch")


def heavy_count(sampling, N: int) -> int:
    """How many of the samples are exact heavy keys: kde's `heavy` (default samples // 2), at most N."""
    if sampling.name != "kde":
        return 0
    h = sampling.get("heavy")
    return min(N, int(sampling["samples"]) // 2 if h is None else int(h))


def draw(q: Tensor, k: Tensor, v: Tensor, sampling, planes: Tensor | None, seed: int,
         scale: float | None = None, padded: Tensor | None = None) -> Samples:
    """Sort and sample for one call; q, k (BH, N, Dk), v (BH, N, Dv); scale s (default 1/√Dk);
    padded (BH, N) bool: the keys a key padding mask leaves out.
    The random numbers come from a CPU generator whatever the tensors' device, so a seed draws the
    same samples on a GPU as on the CPU."""
    BH, N, _ = k.shape
    check_size(sampling, BH, N, k.shape[-1] + v.shape[-1])
    S = int(sampling["samples"])
    dev = k.device
    gen = torch.Generator().manual_seed(seed)
    block = block_rows(sampling)
    if sampling.name == "kde":
        bits = int(math.log2(sampling["buckets"]))
        pq, pk = bucket_order(q, planes, bits), bucket_order(k, planes, bits)
        where = torch.empty_like(pk).scatter_(1, pk, torch.arange(N, device=dev).expand(BH, N))  # pk⁻¹
        kept = None if padded is None else ~padded
        w = residual_weights(q, k, v, sampling, gen, scale if scale is not None else q.shape[-1] ** -0.5, kept)
        H = heavy_count(sampling, N)
        rest = torch.ones(BH, N, dtype=torch.bool, device=dev)
        heavy = w.detach().topk(H, dim=-1).indices
        rest.scatter_(1, heavy, False)
        if kept is not None:
            rest &= kept
        St = S - H if N > H else 0                                 # the tail's samples
        u = torch.rand(BH, St, generator=gen, dtype=torch.float64).to(dev)
        wr = w * rest
        total = wr.sum(-1, keepdim=True)
        count = rest.sum(-1, keepdim=True)                         # the tail's keys, per row
        flat = 0.5 / count.clamp_min(1).to(w.dtype)
        share = 0.5 * wr / total.clamp_min(torch.finfo(w.dtype).tiny)
        p = (torch.where(total > 0, share, flat) + flat) * rest
        cdf = p.detach().double().gather(1, pk).cumsum(-1)          # over keys in sorted order
        pos = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max(N - 1)
        tail = pk.gather(1, pos)
        si = torch.cat([heavy, tail], 1)
        pos = torch.cat([where.gather(1, heavy), pos], 1)
        lw_heavy, pt = p.new_zeros(BH, H), p.gather(1, tail)
        if kept is not None:               # a padded heavy key, a row with no tail: weight 0
            lw_heavy = lw_heavy.masked_fill(padded.gather(1, heavy), KEY_OUT)
            lw_tail = (-torch.log(pt.masked_fill(count == 0, 1) * St)).masked_fill(count == 0, KEY_OUT)
        else:
            lw_tail = -torch.log(pt * St)
        lw = torch.cat([lw_heavy, lw_tail], 1)
        if sampling.get("tail", "mean") == "mean" and St:
            vh = rows_of(v, heavy)                 # sums in float64: N values near float32's max
            if kept is None:
                vbar = (v.sum(1, keepdim=True, dtype=torch.float64)
                        - vh.sum(1, keepdim=True, dtype=torch.float64)) / (N - H)
            else:                              # over the kept tail keys (a padded value may be NaN)
                vbar = (torch.where(rest[..., None], v, 0).sum(1, keepdim=True, dtype=torch.float64)
                        / count[..., None].clamp_min(1))
            vs = torch.cat([vh, vbar.to(v.dtype).expand(BH, St, v.shape[-1])], 1)
        else:
            vs = rows_of(v, si)
    else:                          # uniform: identity order, a query's own key is its block
        u = torch.rand(BH, S, generator=gen, dtype=torch.float64).to(dev)
        pq = pk = torch.arange(N, device=dev).expand(BH, N)
        if padded is None:
            pos = si = (u * N).long().clamp_max(N - 1)
            lw = torch.full((BH, S), -math.log(S / N), dtype=v.dtype, device=dev)
        else:                      # uniform over the kept keys: the t-th kept key, t ~ U{0 … count − 1}
            count = (~padded).sum(-1, keepdim=True)
            order = torch.sort(padded.to(torch.int8), dim=-1, stable=True).indices   # kept keys first
            t = (u * count).long().clamp_max((count - 1).clamp_min(0))
            pos = si = order.gather(1, t)
            lw = (torch.log(count.to(torch.float64) / S)).expand(BH, S).masked_fill(count == 0, KEY_OUT)
            lw = lw.to(v.dtype)
        vs = rows_of(v, si)
    if si.shape[1] == 0:   # TVM refuses torch's strides of an empty tensor: one sample of weight e^−1e30 = 0
        pos = si = pos.new_zeros(BH, 1)
        lw = torch.full((BH, 1), -1e30, dtype=v.dtype, device=dev)
        vs = v.new_zeros(BH, 1, v.shape[-1])
    i32 = lambda t: t.to(torch.int32).contiguous()
    return Samples(i32(pq), i32(pk), i32(si), lw.to(v.dtype).contiguous(), i32(pos // block),
                   vs.contiguous(), block)


def rows_of(x: Tensor, idx: Tensor) -> Tensor:
    """x[b, idx[b, t], :]: (BH, T, width) rows of x (BH, N, width)."""
    return x.gather(1, idx.long()[..., None].expand(-1, -1, x.shape[-1]))

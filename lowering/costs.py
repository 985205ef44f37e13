"""Flop counts the forms' costs are built from (per batch·head, sequence length N)."""
from __future__ import annotations

import math

from attndsl.ir import Node, SampledAttention, SoftmaxAttention, ToeplitzValues

EXP_FLOPS = 20.0      # a vectorized exp (range reduction + polynomial), in flops


def linear_cost(n, N: int) -> float:
    """S = Σ φk⊗[v,1] and φq·S: two M×(D+1) products a row."""
    m, d = n.qf.shape[-1], n.v.shape[-1]
    return 4.0 * N * m * (d + 1)


def fft_length(n: int) -> int:
    """The FFT length of a linear Toeplitz product over n positions: a power of two ≥ 2n − 1."""
    length = 16
    while length < 2 * n - 1:
        length *= 2
    return length


def fft_cost(channels: int, N: int) -> float:
    """One real FFT, spectral product and inverse per channel: 2 × 2.5·L·log2 L + 3·L."""
    L = fft_length(N)
    return channels * (5.0 * L * math.log2(L) + 3.0 * L)


def softmax_cost(n, N: int) -> float:
    """Scores and weighted values, 2·N²·(Dk + Dv), plus an exp per score; half when causal."""
    pairs = N * N / 2 if n.causal else N * N
    return pairs * (2.0 * (n.q.shape[-1] + n.v.shape[-1]) + EXP_FLOPS)


def quadratic_cost(n: Node, N: int) -> float:
    """What the O(N²) reference costs: N² kernel values, each a dot product, and N² weighted value rows."""
    if isinstance(n, ToeplitzValues):
        return 2.0 * N * N * n.v.shape[-1]
    if isinstance(n, (SoftmaxAttention, SampledAttention)):
        return softmax_cost(n, N)
    m, d = n.qf.shape[-1], n.v.shape[-1]
    return 2.0 * N * N * (m + d + 1)

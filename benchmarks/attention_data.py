"""Queries, keys and values for the sampled-attention benchmarks.

clustered: the regime sampled softmax is meant for — rows drawn around C random centers, so each
query's softmax mass sits on the keys of its own cluster (far from the flat attention of i.i.d.
Gaussian rows, whose exact output is ~0 and whose relative errors say little).
"""
from __future__ import annotations

import torch


def clustered(heads: int, n: int, dim: int, *, clusters: int = 32, spread: float = 0.5,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (1, heads, n, dim): q and k = center + spread·noise (shared centers per head, |center|
    ≈ √dim, so s·q·k ≈ √dim·(1 ± ...) within a cluster with s = 1/√dim), v i.i.d. N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(heads, clusters, dim, generator=g)
    out = []
    for _ in range(2):
        z = torch.randint(clusters, (heads, n), generator=g)
        rows = centers.gather(1, z[..., None].expand(-1, -1, dim))
        out.append((rows + spread * torch.randn(heads, n, dim, generator=g))[None])
    return out[0], out[1], torch.randn(1, heads, n, dim, generator=g)

"""attndsl.from_torch: existing PyTorch attention read back as a spec, then compiled.

Two modules a user might already have: a T5-style block (softmax with a learned bias over
log-spaced relative-position buckets) and causal linear attention (Katharopoulos et al. 2020,
written with einsum and cumsum). from_torch exports each with torch-mlir, recognises the maths,
and returns a spec (plus the T5 table, read off the bucket embedding) that attndsl compiles.

    .venv/bin/python examples/from_torch_demo.py
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import attndsl


class T5Attention(torch.nn.Module):
    """softmax(q kᵀ + b_h(bucket(j − i))) v with T5's bucketing (Raffel et al. 2020); no 1/√d."""

    def __init__(self, heads: int = 4, buckets: int = 32, max_distance: int = 128):
        super().__init__()
        self.bias = torch.nn.Embedding(buckets, heads)
        self.buckets, self.max_distance = buckets, max_distance

    def bucket(self, rel: torch.Tensor) -> torch.Tensor:
        half = self.buckets // 2
        out = (rel > 0).long() * half
        rel = rel.abs()
        exact = half // 2
        log = exact + (torch.log(rel.float() / exact) / math.log(self.max_distance / exact)
                       * (half - exact)).long()
        return out + torch.where(rel < exact, rel, torch.clamp(log, max=half - 1))

    def forward(self, q, k, v):
        n = q.shape[2]
        pos = torch.arange(n)
        bias = self.bias(self.bucket(pos[None, :] - pos[:, None])).permute(2, 0, 1)[None]
        return torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1) @ v


class CausalLinearAttention(torch.nn.Module):
    """φ(q_i)·Σ_{j≤i} φ(k_j) v_jᵀ / φ(q_i)·Σ_{j≤i} φ(k_j), φ = elu + 1."""

    def forward(self, q, k, v):
        q, k = F.elu(q) + 1, F.elu(k) + 1
        kv = torch.einsum("bhnd,bhne->bhnde", k, v).cumsum(2)
        num = torch.einsum("bhnd,bhnde->bhne", q, kv)
        return num / torch.einsum("bhnd,bhnd->bhn", q, k.cumsum(2))[..., None]


def main() -> None:
    torch.manual_seed(0)
    for module, n in ((T5Attention(), 160), (CausalLinearAttention(), 64)):
        # T5's buckets saturate at distance ~91: export past it so the table's clip is seen
        example = [torch.randn(1, 4, n, 16) for _ in range(3)]
        imported = attndsl.from_torch(module, example, name=type(module).__name__.lower())
        attn = imported.compile()
        q, k, v = (torch.randn(2, 4, 2 * n, 16) for _ in range(3))     # longer than the export
        with torch.no_grad():
            err = ((attn(q, k, v) - module(q, k, v)).norm() / module(q, k, v).norm()).item()
        table = "" if imported.position_table is None else f" + table {tuple(imported.position_table.shape)}"
        print(f"{type(module).__name__}: read as{table}\n{imported.text}"
              f"  compiled ({', '.join(d.form for d in attn.planned.decisions)}) vs the module at N={2 * n}: "
              f"relative error {err:.1e}\n")


if __name__ == "__main__":
    main()

"""DistributedDataParallel: two spawn-started processes (gloo, CPU) train a model with an attndsl
attention, pickled to them, and get the gradients one process gets on the whole batch."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

import attndsl
from conftest import assert_close

SPEC = "attention t { kernel = favor(features=16); position = toeplitz(max_distance=8, init=normal); mask = causal }"


class Tiny(nn.Module):
    """x (B, N, 16) -> (B, N, 16): projections around an attndsl attention with a learned table."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(16, 48), nn.Linear(16, 16)
        self.attn = attndsl.compile(SPEC, heads=2, head_dim=8, dtype=None)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return self.out(self.attn(q, k, v).transpose(1, 2).reshape(B, N, 16))


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _rank(rank: int, world: int, port: int, model: Tiny, x, y, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        ddp = nn.parallel.DistributedDataParallel(model)
        F.mse_loss(ddp(x[rank::world]), y[rank::world]).backward()
        torch.save(_grads(model), os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_get_the_gradients_of_one(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    x, y = torch.randn(4, 24, 16), torch.randn(4, 24, 16)
    mp.spawn(_rank, args=(2, _free_port(), model, x, y, str(tmp_path)), nprocs=2, join=True)
    # one process, the whole batch (the mean over both halves of equal size)
    F.mse_loss(model(x), y).backward()
    want = _grads(model)
    assert "attn.position_table" in want
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name in want:
            assert_close(f"rank {rank} {name}", want[name], got[name], 1e-5)

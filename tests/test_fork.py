"""Forked children (DataLoader workers) run the kernels: no hang, the same numbers.

Each case runs in a subprocess with a timeout, so a hang fails the test instead of the suite.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import torch, attndsl
    from torch.utils.data import DataLoader, Dataset
    attn = attndsl.compile("attention t { kernel = elu1; mask = causal }", heads=2, head_dim=16)
    x = torch.randn(2, 2, 300, 16)
    attn(x, x, x)                                  # the parent starts its thread pool first

    class Rows(Dataset):
        def __len__(self):
            return 4
        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            q, k, v = (torch.randn(1, 2, 300, 16, generator=g, requires_grad=True) for _ in range(3))
            out = attn(q, k, v)
            out.sum().backward()                   # the backward's parallel loops too
            ref = attn.reference(*(t.detach().double() for t in (q, k, v)))
            return ((out.double() - ref).norm() / ref.norm()).detach()

    errs = torch.cat([b for b in DataLoader(Rows(), batch_size=2, num_workers=2)])
    assert errs.max() < 2e-5, errs
    print("ok", len(errs))
""")


@pytest.mark.parametrize("openmp", ["1", "0"], ids=["openmp", "tvm-pool"])
def test_forked_dataloader_workers_run_the_kernels(openmp):
    env = {**os.environ, "ATTNDSL_OPENMP": openmp, "ATTNDSL_NUM_THREADS": "2"}
    try:
        out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                             env=env, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("a forked DataLoader worker hung in a kernel")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ok", "4"]

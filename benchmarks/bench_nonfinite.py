"""What the NaN rule costs (attndsl/nonfinite.py): forward with the check against the same call
with the check bypassed, finite inputs, B·H = 8, D = 64, medians of interleaved rounds.

    python benchmarks/bench_nonfinite.py [--rounds 30]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import attndsl
from attndsl import nonfinite

CASES = [("kernel = elu1; mask = causal", 512), ("kernel = elu1; mask = causal", 2048),
         ("mask = causal", 1024)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=30)
    rounds = p.parse_args().rounds
    checked = nonfinite.guarded
    bypassed = lambda run, q, k, v, causal, reads_every_key=True: run(q, k, v)   # noqa: E731
    print(f"{'spec':32s} {'N':>5s} {'checked':>10s} {'bypassed':>10s} {'cost':>7s}")
    for body, n in CASES:
        attn = attndsl.compile(f"attention b {{ {body} }}", heads=8, head_dim=64)
        q, k, v = (torch.randn(1, 8, n, 64) for _ in range(3))
        times = {checked: [], bypassed: []}
        with torch.no_grad():
            for _ in range(5):
                attn(q, k, v)
            for _ in range(rounds):
                for guard in times:
                    nonfinite.guarded = guard
                    t = time.perf_counter()
                    attn(q, k, v)
                    times[guard].append(time.perf_counter() - t)
        nonfinite.guarded = checked
        a, b = (statistics.median(times[g]) * 1e3 for g in (checked, bypassed))
        print(f"{body:32s} {n:5d} {a:8.3f}ms {b:8.3f}ms {100 * (a / b - 1):+6.1f}%")


if __name__ == "__main__":
    main()

"""What the numerical checks cost: forward with them against the same call with them bypassed,
finite inputs, B·H = 8, D = 64, medians of interleaved rounds. The checks are the NaN rule
(attndsl/nonfinite.py: one sum over the output) and, for a stabilized map such as favor, the
normalizer's underflow check (attndsl/precision.py: one min over B·H·N values).

    python benchmarks/bench_nonfinite.py [--rounds 30]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import attndsl
from attndsl import nonfinite
from attndsl.ast import AttentionSpec

CASES = [("kernel = elu1; mask = causal", 512), ("kernel = elu1; mask = causal", 2048),
         ("mask = causal", 1024), ("kernel = favor(features=64); mask = causal", 2048)]
STABILIZED = AttentionSpec.stabilized
UNWATCHED = property(lambda spec: False)       # the module then skips the underflow check


def checks(on: bool) -> None:
    """Both checks on, or both bypassed."""
    nonfinite.guarded = CHECKED if on else (lambda run, q, k, v, causal, reads_every_key=True: run(q, k, v))
    AttentionSpec.stabilized = STABILIZED if on else UNWATCHED


CHECKED = nonfinite.guarded


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=30)
    rounds = p.parse_args().rounds
    print(f"{'spec':44s} {'N':>5s} {'checked':>10s} {'bypassed':>10s} {'cost':>7s}")
    for body, n in CASES:
        attn = attndsl.compile(f"attention b {{ {body} }}", heads=8, head_dim=64)
        q, k, v = (torch.randn(1, 8, n, 64) for _ in range(3))
        times = {True: [], False: []}
        with torch.no_grad():
            for _ in range(5):
                attn(q, k, v)
            for _ in range(rounds):
                for on in times:
                    checks(on)
                    t = time.perf_counter()
                    attn(q, k, v)
                    times[on].append(time.perf_counter() - t)
        checks(True)
        a, b = (statistics.median(times[on]) * 1e3 for on in (True, False))
        print(f"{body:44s} {n:5d} {a:8.3f}ms {b:8.3f}ms {100 * (a / b - 1):+6.1f}%")


if __name__ == "__main__":
    main()

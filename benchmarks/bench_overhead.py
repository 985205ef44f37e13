"""Per-call overhead: a tiny input, where the kernels take a few µs and the rest is the call itself.

    python benchmarks/bench_overhead.py [--rounds 7] [--calls 2000]

(B, H, N, D) = (1, 2, 16, 8), 2 threads: exact SDPA (causal) beside three compiled specs, forward
without gradients and forward+backward, in interleaved rounds (median of the rounds' means).
Writes benchmarks/results/bench_overhead.md.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import attndsl

RESULTS = Path(__file__).resolve().parent / "results"
SPECS = {"elu1 causal (prefix_sum)": "attention t { kernel = elu1; mask = causal }",
         "softmax + alibi, causal (quadratic)": "attention t { kernel = softmax; position = alibi; mask = causal }",
         "favor causal (2 feature maps + prefix_sum)": "attention t { kernel = favor(features=16); mask = causal }"}


def mean_us(f, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        f()
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(2)
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    fns = {"SDPA": lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True)}
    fns.update({name: attndsl.compile(text, heads=2, head_dim=8) for name, text in SPECS.items()})

    def forward(f):
        def run():
            with torch.no_grad():
                f(q, k, v)
        return run

    def train(f):
        return lambda: f(qg, kg, vg).sum().backward()
    cases = {(name, mode): make(f) for name, f in fns.items() for mode, make in (("forward", forward), ("train", train))}
    for fn in cases.values():                      # warm up: builds, caches, first-call paths
        for _ in range(100):
            fn()
    times: dict = {key: [] for key in cases}
    for r in range(args.rounds):                   # interleaved rounds
        for key, fn in cases.items():
            times[key].append(mean_us(fn, args.calls if key[1] == "forward" else args.calls // 4))
        print(f"round {r + 1}/{args.rounds}", flush=True)
    med = {key: statistics.median(t) for key, t in times.items()}
    lines = ["| | forward, no grad (µs) | vs SDPA | forward + backward (µs) | vs SDPA |", "|---|---|---|---|---|"]
    for name in fns:
        f, t = med[name, "forward"], med[name, "train"]
        lines.append(f"| {name} | {f:.1f} | {f / med['SDPA', 'forward']:.1f}x | {t:.1f} | "
                     f"{t / med['SDPA', 'train']:.1f}x |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_overhead.md").write_text(
        f"# Per-call overhead, (B, H, N, D) = (1, 2, 16, 8), 2 threads, median of {args.rounds} interleaved "
        f"rounds\n\n`python benchmarks/bench_overhead.py`\n\n{table}\n")


if __name__ == "__main__":
    main()

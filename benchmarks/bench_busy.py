"""Speed on a busy machine: every form's forward with the cores to itself and with one core kept
busy by another process (as a DataLoader worker or a second job does), beside SDPA's.

One spinning process per --busy core (a plain Python loop, started for the busy rounds and
stopped after); B·H = 8, D = 64, float32, N = 2048. Quiet and busy rounds are interleaved and
medians quoted. A form degrades like SDPA when its slowdown (busy / quiet) is within 1.5x of
SDPA's.

    python benchmarks/bench_busy.py [--n 2048] [--rounds 7] [--busy 1]
Writes benchmarks/results/bench_busy.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tvm.target.codegen import llvm_get_system_cpu

import attndsl
from bench_lengths import bias

RESULTS = Path(__file__).resolve().parent / "results"
H, DIM = 8, 64
FORMS = {   # form -> the spec it runs (plan= forces it)
    "prefix_sum": "kernel = elu1; mask = causal",
    "linear": "kernel = elu1",
    "decayed": "kernel = elu1; position = alibi; mask = causal",
    "banded": "kernel = elu1; position = toeplitz(max_distance=128, init=normal); mask = causal",
    "toeplitz_fft": "kernel = elu1; position(r) = -0.02 * abs(r) + 0.5 * cos(r / 16)",
    "pairwise": "kernel = elu1; position(r) = -0.02 * abs(r) + 0.5 * cos(r / 16)",
    "quadratic": "position = alibi; mask = causal",
    "kde": "sampling = kde(buckets=16, block=128, samples=128); mask = causal",
}


def methods(n: int) -> dict:
    out = {}
    for form, body in FORMS.items():
        attn = attndsl.compile(f"attention busy {{ {body} }}", heads=H, head_dim=DIM, plan=form)
        out[form] = attn
    ref = attndsl.compile("attention busy { position = alibi; mask = causal }", heads=H, head_dim=DIM)
    b = bias(ref, n)
    out["sdpa+bias"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=b)
    out["sdpa causal"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out


def spinners(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--busy", type=int, default=1, help="cores kept busy in the busy rounds")
    ap.add_argument("--out", default=str(RESULTS / "bench_busy"))
    args = ap.parse_args(argv)
    ms = methods(args.n)
    q, k, v = (torch.randn(1, H, args.n, DIM) for _ in range(3))
    times = {(m, s): [] for m in ms for s in ("quiet", "busy")}
    with torch.no_grad():
        for fn in ms.values():
            fn(q, k, v)
        for r in range(args.rounds):
            for state in ("quiet", "busy"):
                procs = spinners(args.busy) if state == "busy" else []
                time.sleep(0.3 if procs else 0.0)
                try:
                    for m, fn in ms.items():
                        t0 = time.perf_counter()
                        fn(q, k, v)
                        times[m, state].append(time.perf_counter() - t0)
                finally:
                    for p in procs:
                        p.kill()
                        p.wait()
            print(f"  round {r + 1}/{args.rounds}", flush=True)
    med = {key: 1e3 * statistics.median(t) for key, t in times.items()}
    sdpa = med["sdpa+bias", "busy"] / med["sdpa+bias", "quiet"]
    lines = [f"# bench_busy ({llvm_get_system_cpu()}, {torch.get_num_threads()} threads, N={args.n}, "
             f"B·H={H}, D={DIM}, {args.busy} core(s) busy)", "",
             f"`python benchmarks/bench_busy.py {' '.join(argv or sys.argv[1:])}`", "",
             "| method | quiet ms | busy ms | slowdown | vs SDPA+bias's slowdown |", "|---|---|---|---|---|"]
    rows = []
    for m in ms:
        quiet, busy = med[m, "quiet"], med[m, "busy"]
        rows.append({"method": m, "quiet_ms": quiet, "busy_ms": busy, "slowdown": busy / quiet})
        lines.append(f"| {m} | {quiet:.2f} | {busy:.2f} | {busy / quiet:.2f}x | {busy / quiet / sdpa:.2f} |")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""Speed on a busy machine: every form's forward with the cores to itself and with one core kept
busy by another process (as a DataLoader worker or a second job does), beside SDPA's.

One spinning process per --busy core (a plain Python loop, started for the busy rounds and
stopped after); B·H = 8, D = 64, float32, N = 2048. Quiet and busy rounds are interleaved and
medians quoted; the methods' order rotates from round to round, as the first call after the load
changes pays for the change (threads moving between cores). A form degrades like SDPA when its
slowdown (busy / quiet) is within 1.5x of SDPA's. Each OpenMP wait policy runs in its own process (libgomp reads OMP_WAIT_POLICY when torch
loads it): unset, libgomp's default (idle threads spin for a while, then sleep), and PASSIVE (idle
threads sleep at once).

    python benchmarks/bench_busy.py [--n 2048] [--rounds 7] [--busy 1] [--policies ACTIVE,PASSIVE]
Writes benchmarks/results/bench_busy.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
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
QUIET_AFTER_S = 1.2     # the kernels' launcher runs alone for up to 1 s after a late worker (runtime/omp.py)
FORMS = {   # form -> the spec it runs (plan= forces it)
    "prefix_sum": "kernel = elu1; mask = causal",
    "linear": "kernel = elu1",
    "decayed": "kernel = elu1; position = alibi; mask = causal",
    "banded": "kernel = elu1; position = toeplitz(max_distance=128, init=normal); mask = causal",
    "toeplitz_fft": "kernel = elu1; position(r) = -0.02 * abs(r) + 0.5 * cos(r / 16)",
    "pairwise": "kernel = elu1; position(r) = -0.02 * abs(r) + 0.5 * cos(r / 16)",
    "quadratic": "position = alibi; mask = causal",
    "kde": "sampling = kde(buckets=16, block=128, samples=128)",
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


def _policy_env(policy: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    return env if policy == "default" else {**env, "OMP_WAIT_POLICY": policy}


def measure(n: int, rounds: int, busy: int) -> dict:
    """{method: (quiet ms, busy ms)}, medians of interleaved quiet and busy rounds."""
    ms = methods(n)
    q, k, v = (torch.randn(1, H, n, DIM) for _ in range(3))
    times = {(m, s): [] for m in ms for s in ("quiet", "busy")}
    order = list(ms)                             # rotated a step each round: none always comes first
    with torch.no_grad():
        for fn in ms.values():
            fn(q, k, v)
        for r in range(rounds):
            for state in ("quiet", "busy"):
                procs = spinners(busy) if state == "busy" else []
                time.sleep(0.3 if procs else QUIET_AFTER_S)
                try:
                    for m in order[r % len(order):] + order[:r % len(order)]:
                        fn = ms[m]
                        t0 = time.perf_counter()
                        fn(q, k, v)
                        times[m, state].append(time.perf_counter() - t0)
                finally:
                    for p in procs:
                        p.kill()
                        p.wait()
            print(f"  round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    return {m: (1e3 * statistics.median(times[m, "quiet"]), 1e3 * statistics.median(times[m, "busy"]))
            for m in ms}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--busy", type=int, default=1, help="cores kept busy in the busy rounds")
    ap.add_argument("--policies", default="default,PASSIVE",
                    help="OMP_WAIT_POLICY values to run under (default: unset), each in a fresh process "
                         "(libgomp reads it at start)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS / "bench_busy"))
    args = ap.parse_args(argv)
    if args.child:                               # one policy, in this process: JSON on stdout
        print(json.dumps(measure(args.n, args.rounds, args.busy)))
        return
    results = {}
    for policy in args.policies.split(","):
        print(f"OMP_WAIT_POLICY={policy}", flush=True)
        out = subprocess.run([sys.executable, __file__, "--child", "--n", str(args.n), "--rounds", str(args.rounds),
                              "--busy", str(args.busy)], env=_policy_env(policy),
                             stdout=subprocess.PIPE, text=True, check=True)
        results[policy] = json.loads(out.stdout)
    lines = [f"# bench_busy ({llvm_get_system_cpu()}, {torch.get_num_threads()} threads, N={args.n}, "
             f"B·H={H}, D={DIM}, {args.busy} core(s) busy)", "",
             f"`python benchmarks/bench_busy.py {' '.join(argv or sys.argv[1:])}`", "",
             "slowdown = busy / quiet; vs SDPA = slowdown / SDPA+bias's slowdown (the target: ≤ 1.5)", "",
             "| method | " + " | ".join(f"{p}: quiet ms | busy ms | slowdown | vs SDPA" for p in results) + " |",
             "|---|" + "---|---|---|---|" * len(results)]
    for m in next(iter(results.values())):
        cells = []
        for res in results.values():
            quiet, busy = res[m]
            sdpa = res["sdpa+bias"][1] / res["sdpa+bias"][0]
            cells += [f"{quiet:.2f}", f"{busy:.2f}", f"{busy / quiet:.2f}x", f"{busy / quiet / sdpa:.2f}"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

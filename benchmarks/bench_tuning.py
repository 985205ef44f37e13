"""Tuned vs untuned kernels (issue 5), side by side in one run, with SDPA for scale.

For each tunable form, M = Dk = Dv = 64, B·H = 8, N in {4096} (or --lengths):
  causal linear   elu1, mask causal (prefix_sum kernels)
  alibi           elu1, alibi, mask causal (decayed kernels)
  rpe table       elu1, a learned table over the whole range, no mask (toeplitz_fft kernels)
  rpe clipped     elu1, a learned table clipped at 128, no mask (banded kernels)
  untuned         attndsl.compile(..., tuned=False): the default knobs
  tuned           attndsl.compile(...): the knobs the tuning databases pick (your
                  `attndsl tune` database, else the one shipped in schedules/tuned/)
  sdpa            F.scaled_dot_product_attention (causal; with the bias as a float mask for
                  alibi and the table)
Ratios are untuned / tuned (>1: tuning helped), each time the best of 3 interleaved rounds. Also:
compile() of the tuned spec in a fresh process with a warm cache (a tuned build reused from the
database), and apart from it the once-per-process load of TVM's runtime library.

    python benchmarks/bench_tuning.py [--lengths 4096] [--quick]
Writes benchmarks/results/bench_tuning.{md,png}.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tvm.target.codegen import llvm_get_system_cpu

import attndsl
from bench_linear import fwd_and_bwd
from bench_rpe import bias_matrix

RESULTS = Path(__file__).resolve().parent / "results"
B, H, DIM = 1, 8, 64
ROUNDS = 3
SCENARIOS = {
    "causal linear": "attention bench {{ kernel = elu1 \n mask = causal }}",
    "alibi": "attention bench {{ kernel = elu1 \n position = alibi \n mask = causal }}",
    "rpe table": "attention bench {{ kernel = elu1 \n position = toeplitz(max_distance={n}, init=normal) }}",
    "rpe clipped": "attention bench {{ kernel = elu1 \n position = toeplitz(max_distance=128, init=normal) }}",
}


def sdpa_for(attn: attndsl.Attention, scenario: str, n: int):
    if scenario == "causal linear":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    bias = bias_matrix(attn, n)
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def short(choice: list[str]) -> str:
    """The knobs of each tuned kernel, without the record's provenance."""
    return "; ".join(c.split("  (")[0] for c in choice) if choice else "defaults"


def tuning_of(attn: attndsl.Attention) -> list[str]:
    """explain()'s tuning lines, one per tuned kernel (or the reason for the defaults)."""
    return [ln.split(": ", 1)[1] for ln in attn.explain().splitlines() if ln.strip().startswith("tuning")]


def fresh_process_compile(text: str) -> tuple[float, float]:
    """(seconds loading TVM's runtime, seconds of attndsl.compile(text)) in a new Python process
    that has imported torch and attndsl (the cache is warm by now)."""
    code = ("import time, torch, attndsl\nt0 = time.perf_counter()\nimport tvm_ffi\n"
            "t1 = time.perf_counter()\n"
            f"attndsl.compile({text!r}, heads={H}, head_dim={DIM})\n"
            "print(t1 - t0, time.perf_counter() - t1)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    runtime, compile_s = map(float, out.stdout.strip().splitlines()[-1].split())
    return runtime, compile_s


def run(lengths: list[int], with_backward: bool = True) -> list[dict]:
    rows = []
    for scenario, template in SCENARIOS.items():
        for n in lengths:
            text = template.format(n=n)
            print(f"  {scenario} N={n}: compiling (untuned, tuned) ...", flush=True)
            untuned = attndsl.compile(text, heads=H, head_dim=DIM, tuned=False)
            tuned = attndsl.compile(text, heads=H, head_dim=DIM)
            if tuned.position_table is not None:
                with torch.no_grad():
                    tuned.position_table.copy_(untuned.position_table)
            methods = {"untuned": untuned, "tuned": tuned, "sdpa": sdpa_for(tuned, scenario, n)}
            q, k, v = (torch.randn(B, H, n, DIM) for _ in range(3))
            runtime_s, reuse_s = fresh_process_compile(text)
            row = dict(scenario=scenario, n=n, choice=tuning_of(tuned), runtime_s=runtime_s, reuse_s=reuse_s)
            for r in range(ROUNDS):          # interleaved rounds, the best of each: drift hits all alike
                for name, fn in methods.items():
                    fwd, bwd = fwd_and_bwd(fn, q, k, v, with_backward)
                    row[f"{name}_fwd"] = min(fwd, row.get(f"{name}_fwd", fwd))
                    row[f"{name}_bwd"] = min(bwd, row.get(f"{name}_bwd", bwd))
            for name in methods:
                print(f"    {name:8s} fwd {row[f'{name}_fwd'] * 1e3:9.2f} ms   "
                      f"fwd+bwd {row[f'{name}_bwd'] * 1e3:9.2f} ms", flush=True)
            print(f"    tuned choice: {'; '.join(row['choice'])}\n    reused in a fresh process: compile() "
                  f"{row['reuse_s']:.3f} s after {row['runtime_s']:.2f} s loading TVM's runtime", flush=True)
            rows.append(row)
    return rows


def table(rows) -> str:
    out = [f"### tuned vs untuned kernels, B·H={B * H}, M=D=64, {torch.get_num_threads()} threads, "
           f"{llvm_get_system_cpu()}", "",
           "| form | N | untuned fwd ms | tuned fwd ms | fwd speed-up | untuned fwd+bwd ms | tuned fwd+bwd ms "
           "| fwd+bwd speed-up | sdpa fwd / fwd+bwd ms | tuned build reused in (+ TVM runtime load) | tuned choice |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['scenario']} | {r['n']} | {r['untuned_fwd'] * 1e3:.2f} | {r['tuned_fwd'] * 1e3:.2f} | "
                   f"{r['untuned_fwd'] / r['tuned_fwd']:.2f}x | {r['untuned_bwd'] * 1e3:.2f} | "
                   f"{r['tuned_bwd'] * 1e3:.2f} | {r['untuned_bwd'] / r['tuned_bwd']:.2f}x | "
                   f"{r['sdpa_fwd'] * 1e3:.2f} / {r['sdpa_bwd'] * 1e3:.2f} | {r['reuse_s']:.3f} s "
                   f"(+ {r['runtime_s']:.2f} s) | {short(r['choice'])} |")
    return "\n".join(out)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"{r['scenario']}\nN={r['n']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([i - 0.2 for i in x], [r["untuned_fwd"] / r["tuned_fwd"] for r in rows], 0.4, label="forward")
    ax.bar([i + 0.2 for i in x], [r["untuned_bwd"] / r["tuned_bwd"] for r in rows], 0.4, label="forward+backward")
    ax.axhline(1.0, color="k", linewidth=0.8)
    ax.axhline(1.3, color="r", linewidth=0.8, linestyle="--", label="goal 1.3x")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("untuned time / tuned time (higher is better)")
    ax.set_title(f"attndsl: speed-up from the tuning database ({llvm_get_system_cpu()})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4096")
    p.add_argument("--quick", action="store_true", help="N=1024 only, forward only")
    a = p.parse_args(argv)
    lengths = [1024] if a.quick else [int(x) for x in a.lengths.split(",")]
    print(f"bench_tuning: lengths {lengths}, {torch.get_num_threads()} threads", flush=True)
    t0 = time.perf_counter()
    rows = run(lengths, with_backward=not a.quick)
    md = table(rows)
    print("\n" + md + f"\n\n({time.perf_counter() - t0:.0f} s)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_tuning.md").write_text(md + "\n")
    plot(rows, RESULTS / "bench_tuning.png")
    print(f"\nwrote {RESULTS / 'bench_tuning.md'} and .png")


if __name__ == "__main__":
    main()

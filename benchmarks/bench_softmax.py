"""Softmax attention, the quadratic form: attndsl's flash-style TVM kernels vs PyTorch, one table.

B·H = 8 (1 × 8 heads), Dk = Dv = 64, float32, no mask. Scenarios:
  plain   softmax(s·q·kᵀ) v, no position term
  table   + a learned table b_h(i − j) over the whole range (W = N)
  alibi   + alibi, −slope_h·|i − j|
Methods:
  attndsl        the compiled spec (b(i − j) computed inside the kernel, memory linear in N)
  sdpa           F.scaled_dot_product_attention; with a position term, the bias materialized as a
                 float (1, H, N, N) attn_mask (built outside the timed region)
  eager          the same maths in plain PyTorch: softmax(s·q·kᵀ + b) v
  torch.compile  that function under torch.compile
Each (scenario, N, pass) times its methods interleaved, `reps` rounds, and reports medians;
ratios are baseline time / attndsl time (> 1: attndsl wins). Pass fwd is under no_grad;
fwd+bwd is forward plus backward of out·g into q, k, v (and the table for attndsl).

Sampled part (--part sampled): the estimators of exact softmax, on clustered data
(benchmarks/attention_data.py), N in --sampled-lengths (4096, 16384, 65536):
  kde            sampling = kde(buckets=32, block=128, samples=128)   (256 keys a query: the
                 default estimator, 64 heavy keys exact and the tail by its mean value)
  kde-is         the same with heavy=0, tail=sampled, residual=values (importance sampling)
  uniform        sampling = uniform(samples=256)
  attndsl exact  the quadratic form above
  sdpa           exact F.scaled_dot_product_attention (flash kernel, no N×N in memory)
with the relative Frobenius error of each estimate against sdpa's output. fwd+bwd only up to
N = 16384 (exact attention's backward at 65536 would take minutes a round).

    python benchmarks/bench_softmax.py [--part quadratic|sampled|all] [--lengths 512,1024,2048,4096]
                                       [--sampled-lengths 4096,16384,65536] [--reps 3] [--quick]
Writes benchmarks/results/bench_softmax.{md,json,png} and bench_softmax_sampled.{md,json,png}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import attndsl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_data import clustered  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
H, DIM = 8, 64
BASELINES = ("sdpa", "eager", "torch.compile")


def spec(scenario: str, n: int) -> str:
    pos = {"plain": "none", "table": f"toeplitz(max_distance={n}, init=normal)", "alibi": "alibi"}[scenario]
    return f"attention bench {{ kernel = softmax\n position = {pos} }}"


def bias_matrix(attn: attndsl.Attention, n: int) -> torch.Tensor | None:
    """b_h(i − j) as (1, H, N, N), what SDPA gets as a float attn_mask."""
    i = torch.arange(n)
    r = i[:, None] - i[None, :]
    if attn.position_table is not None:
        w = (attn.position_table.shape[1] - 1) // 2
        return attn.position_table.detach()[:, r.clamp(-w, w) + w].unsqueeze(0).contiguous()
    if attn.position_slopes is not None:
        return (-attn.position_slopes[:, :, None] * r.abs().float()).unsqueeze(0).contiguous()
    return None


def eager(q, k, v, bias, scale: float):
    """softmax(s·q·kᵀ + b) v in plain PyTorch (the (B, H, N, N) scores in memory)."""
    logits = scale * q @ k.transpose(-1, -2)
    if bias is not None:
        logits = logits + bias
    return torch.softmax(logits, -1) @ v


compiled_eager = torch.compile(eager, dynamic=True)     # one compile serves every N


def methods(scenario: str, n: int):
    attn = attndsl.compile(spec(scenario, n), heads=H, head_dim=DIM)
    bias = bias_matrix(attn, n)
    s = attn.scale
    return attn, {
        "attndsl": lambda q, k, v: attn(q, k, v),
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
        "eager": lambda q, k, v: eager(q, k, v, bias, s),
        "torch.compile": lambda q, k, v: compiled_eager(q, k, v, bias, s),
    }


def timed(fn, q, k, v, g, backward: bool) -> float:
    t0 = time.perf_counter()
    if backward:
        out = fn(q, k, v)
        out.backward(g)
    else:
        with torch.no_grad():
            fn(q, k, v)
    return time.perf_counter() - t0


def run(lengths, scenarios, reps):
    rows = []
    for scenario in scenarios:
        for n in lengths:
            attn, ms = methods(scenario, n)
            q, k, v = (torch.randn(1, H, n, DIM, requires_grad=True) for _ in range(3))
            g = torch.randn(1, H, n, DIM)
            for backward in (False, True):
                times = {m: [] for m in ms}
                for name, fn in ms.items():            # warm up (torch.compile compiles here)
                    timed(fn, q, k, v, g, backward)
                for _ in range(reps):                 # interleaved rounds: noise hits every method
                    for name, fn in ms.items():
                        times[name].append(timed(fn, q, k, v, g, backward))
                for name in ms:
                    t = statistics.median(times[name])
                    rows.append(dict(scenario=scenario, n=n, method=name, backward=backward, t=t))
                    print(f"  {scenario:6s} N={n:5d} {'fwd+bwd' if backward else 'fwd':7s} {name:14s} "
                          f"{t * 1e3:9.1f} ms", flush=True)
                q.grad = k.grad = v.grad = None
                attn.zero_grad()
    return rows


def table(rows) -> str:
    by = {(r["scenario"], r["n"], r["method"], r["backward"]): r["t"] for r in rows}
    head = (f"### softmax attention (quadratic form), B·H={H}, Dk=Dv={DIM}, float32, no mask, "
            f"{torch.get_num_threads()} threads")
    out = [head, "", "| scenario | N | pass | attndsl ms | sdpa ms | eager ms | torch.compile ms | "
           "sdpa / attndsl | eager / attndsl | compile / attndsl |", "|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["scenario"], r["n"], r["backward"]) for r in rows},
                  key=lambda x: (["plain", "table", "alibi"].index(x[0]), x[2], x[1]))
    for scenario, n, backward in keys:
        a = by[(scenario, n, "attndsl", backward)]
        cells = [f"{by[(scenario, n, m, backward)] * 1e3:.1f}" for m in BASELINES]
        ratios = [f"{by[(scenario, n, m, backward)] / a:.2f}x" for m in BASELINES]
        name = scenario if scenario == "plain" else f"{scenario} (sdpa+bias)"
        out.append(f"| {name} | {n} | {'fwd+bwd' if backward else 'fwd'} | {a * 1e3:.1f} | "
                   f"{' | '.join(cells)} | {' | '.join(ratios)} |")
    return "\n".join(out)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scenarios = [s for s in ("plain", "table", "alibi") if any(r["scenario"] == s for r in rows)]
    fig, axes = plt.subplots(2, len(scenarios), figsize=(5 * len(scenarios), 8), squeeze=False)
    for col, sc in enumerate(scenarios):
        for row, backward in enumerate((False, True)):
            ax = axes[row][col]
            for method in ("attndsl", *BASELINES):
                pts = sorted((r["n"], r["t"] * 1e3) for r in rows
                             if r["scenario"] == sc and r["method"] == method and r["backward"] == backward)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=method, linewidth=2.5 if method == "attndsl" else 1.2)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{sc}, {'forward + backward' if backward else 'forward'}")
            ax.set_xlabel("sequence length N")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        axes[0][col].set_ylabel("time (ms), lower is better")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


SAMPLED = {"kde": "sampling = kde(buckets=32, block=128, samples=128)",
           "kde-is": "sampling = kde(buckets=32, block=128, samples=128, heavy=0, tail=sampled, residual=values)",
           "uniform": "sampling = uniform(samples=256)", "attndsl exact": "kernel = softmax"}


def run_sampled(lengths, reps):
    rows = []
    for n in lengths:
        mods = {name: attndsl.compile(f"attention s {{ {f} }}", heads=H, head_dim=DIM)
                for name, f in SAMPLED.items()}
        ms = {name: (lambda a: lambda q, k, v: a(q, k, v))(a) for name, a in mods.items()}
        ms["sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
        q, k, v = (x.requires_grad_(True) for x in clustered(H, n, DIM, clusters=256, spread=1.0))
        g = torch.randn(1, H, n, DIM)
        with torch.no_grad():
            exact = F.scaled_dot_product_attention(q, k, v)
            err = {m: ((fn(q, k, v) - exact).norm() / exact.norm()).item() for m, fn in ms.items()}
        slow = n > 16384                    # exact attention takes a minute or more a round here
        for backward in ((False,) if slow else (False, True)):
            times = {m: [] for m in ms}
            for _ in range(1 if slow else reps):
                for name, fn in ms.items():
                    times[name].append(timed(fn, q, k, v, g, backward))
            for name in ms:
                t = statistics.median(times[name])
                rows.append(dict(n=n, method=name, backward=backward, t=t, error=err[name]))
                print(f"  sampled N={n:6d} {'fwd+bwd' if backward else 'fwd':7s} {name:14s} "
                      f"{t * 1e3:10.1f} ms   error {err[name]:.3f}", flush=True)
            q.grad = k.grad = v.grad = None
    return rows


def table_sampled(rows) -> str:
    by = {(r["n"], r["method"], r["backward"]): r for r in rows}
    names = ("kde", "kde-is", "uniform", "attndsl exact", "sdpa")
    est = ("kde", "kde-is", "uniform")
    out = [f"### sampled softmax (estimates of exact attention), B·H={H}, Dk=Dv={DIM}, float32, "
           f"clustered data, {torch.get_num_threads()} threads", "",
           "| N | pass | " + " | ".join(f"{m} ms" for m in names) + " | "
           + " | ".join(f"sdpa / {m}" for m in est) + " | " + " | ".join(f"{m} error" for m in est) + " |",
           "|---|---|" + "---|" * (len(names) + 2 * len(est))]
    for n, backward in sorted({(r["n"], r["backward"]) for r in rows}):
        t = {m: by[(n, m, backward)]["t"] for m in names}
        out.append(f"| {n} | {'fwd+bwd' if backward else 'fwd'} | "
                   + " | ".join(f"{t[m] * 1e3:.1f}" for m in names) + " | "
                   + " | ".join(f"{t['sdpa'] / t[m]:.1f}x" for m in est) + " | "
                   + " | ".join(f"{by[(n, m, backward)]['error']:.3f}" for m in est) + " |")
    return "\n".join(out)


def plot_sampled(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, backward in zip(axes, (False, True)):
        for method in ("kde", "kde-is", "uniform", "attndsl exact", "sdpa"):
            pts = sorted((r["n"], r["t"] * 1e3) for r in rows if r["method"] == method and r["backward"] == backward)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method, linewidth=2.5 if method == "kde" else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"sampled softmax, {'forward + backward' if backward else 'forward'}")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("time (ms), lower is better")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(stem, md, rows, plotter):
    print("\n" + md)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.md").write_text(md + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    plotter(rows, RESULTS / f"{stem}.png")
    print(f"\nwrote {RESULTS / stem}.md and .png")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("quadratic", "sampled", "all"), default="all")
    p.add_argument("--lengths", default="512,1024,2048,4096")
    p.add_argument("--sampled-lengths", default="4096,16384,65536")
    p.add_argument("--scenarios", default="plain,table,alibi")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="N=512 (sampled: 1024) only, one round")
    a = p.parse_args(argv)
    lengths = [512] if a.quick else [int(x) for x in a.lengths.split(",")]
    sampled_lengths = [1024] if a.quick else [int(x) for x in a.sampled_lengths.split(",")]
    reps = 1 if a.quick else a.reps
    print(f"bench_softmax: {torch.get_num_threads()} threads", flush=True)
    if a.part in ("quadratic", "all"):
        print(f"quadratic form, lengths {lengths}", flush=True)
        rows = run(lengths, a.scenarios.split(","), reps)
        write("bench_softmax", table(rows), rows, plot)
    if a.part in ("sampled", "all"):
        print(f"sampled forms, lengths {sampled_lengths}", flush=True)
        rows = run_sampled(sampled_lengths, reps)
        write("bench_softmax_sampled", table_sampled(rows), rows, plot_sampled)


if __name__ == "__main__":
    main()

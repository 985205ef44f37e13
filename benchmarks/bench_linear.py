"""Linear attention: attndsl (TVM) vs what a user would otherwise write, side by side.

For causal and full masks, B·H = 16, M = Dk = Dv = 64, N in {1024, 4096, 16384}:
  attndsl           the compiled spec (feature map + linear/prefix-sum kernels, TVM)
  torch chunked     the best plain-PyTorch formulation (chunked for causal, two GEMMs for full)
  torch.compile     the same function under torch.compile
  sdpa              exact softmax attention (F.scaled_dot_product_attention)
forward and forward+backward; ratios are (baseline time) / (attndsl time): >1 means attndsl wins.
--kernel learned is elu(a·x) + 1 with a learnable slope per head (`param a[heads]`): its map runs
its own kernels (the params' gradient included), and the table adds the fixed elu1 map, which the
linear kernels apply as they load q and k, beside it.

    python benchmarks/bench_linear.py [--kernel elu1|favor|learned] [--lengths 1024,4096,16384] [--quick]
Writes benchmarks/results/bench_linear_<kernel>.{md,png}.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import attndsl

RESULTS = Path(__file__).resolve().parent / "results"
SPECS = {
    "elu1": "attention bench {{ kernel = elu1 \n mask = {mask} }}",
    "favor": "attention bench {{ kernel = favor(features=64) \n mask = {mask} }}",
    "learned": "attention bench {{ param a[heads] = 1.0 \n kernel(x) = elu(a * x) + 1 \n mask = {mask} }}",
}
FIXED = "attndsl, elu1"         # the learned map's run: the fixed map, fused, beside it


def torch_feature_map(attn: attndsl.Attention):
    """φ(√s·x) in plain torch, the same maps the spec compiles (the user's own code)."""
    c = math.sqrt(attn.scale)
    if attn.spec.map_params:                   # elu(a·x) + 1, a per head, learned as attndsl learns it
        a = attn.spec_params["a"]
        return lambda x: F.elu(a.view(1, -1, 1, 1) * (c * x)) + 1
    if attn.projection is None:
        return lambda x: F.elu(c * x) + 1
    w = attn.projection

    def favor(x):
        x = c * x
        raw = x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)
        return torch.exp(raw - raw.detach().amax(dim=(-1, -2), keepdim=True)) / math.sqrt(w.shape[0])
    return favor


def linear_full(qf, kf, v):
    s = kf.transpose(-1, -2) @ v                           # (M, D)
    z = kf.sum(-2)                                         # (M,)
    return (qf @ s) / (qf @ z.unsqueeze(-1))


def linear_chunked(qf, kf, v, chunk=64):
    """Causal linear attention by chunks: exact intra-chunk products + running inter-chunk state."""
    B, H, N, M = qf.shape
    D = v.shape[-1]
    pad = (-N) % chunk
    if pad:
        qf, kf, v = (F.pad(t, (0, 0, 0, pad)) for t in (qf, kf, v))
    n = qf.shape[2] // chunk
    qc, kc, vc = (t.reshape(B, H, n, chunk, -1) for t in (qf, kf, v))
    kv = kc.transpose(-1, -2) @ vc                         # (B, H, n, M, D)
    kv = torch.cumsum(kv, 2) - kv                          # state before each chunk
    ks = kc.sum(-2)
    ks = torch.cumsum(ks, 2) - ks
    mask = torch.tril(torch.ones(chunk, chunk, dtype=torch.bool, device=qf.device))
    a = (qc @ kc.transpose(-1, -2)).masked_fill(~mask, 0)
    num = a @ vc + qc @ kv
    den = a.sum(-1) + (qc * ks.unsqueeze(-2)).sum(-1)
    return (num / den.unsqueeze(-1)).reshape(B, H, n * chunk, D)[:, :, :N]


def timeit(fn, budget=2.0, max_reps=20, sync=lambda: None) -> float:
    """Best wall time of fn() after a warm-up (which also compiles); `sync` waits for the device
    (torch.cuda.synchronize for GPU work) before each clock reading."""
    fn()                                                    # warm up (and compile)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    reps = max(1, min(max_reps, int(budget / max(first, 1e-6))))
    best = first
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def fwd_and_bwd(fn, q, k, v, with_backward=True, timer=timeit) -> tuple[float, float]:
    """(forward, forward+backward) times of fn(q, k, v); the second NaN without backward."""
    fwd = timer(lambda: fn(q, k, v))
    bwd = float("nan")
    if with_backward:
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        bwd = timer(lambda: fn(qg, kg, vg).sum().backward())
    return fwd, bwd


def methods(attn, causal):
    phi = torch_feature_map(attn)
    core = linear_chunked if causal else linear_full

    def plain(q, k, v):
        return core(phi(q), phi(k), v)
    compiled = torch.compile(plain, dynamic=False)
    out = {
        "attndsl": attn,
        "torch": plain,
        "torch.compile": compiled,
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
    }
    if attn.spec.map_params:
        out[FIXED] = attndsl.compile(SPECS["elu1"].format(mask="causal" if causal else "none"),
                                     heads=attn.heads, head_dim=attn.head_dim)
    return out


def run(kernel: str, lengths: list[int], bh=(2, 8), dim=64, with_backward=True):
    torch.set_num_threads(torch.get_num_threads())
    rows = []
    for mask in ("causal", "none"):
        causal = mask == "causal"
        attn = attndsl.compile(SPECS[kernel].format(mask=mask), heads=bh[1], head_dim=dim)
        for n in lengths:
            torch._dynamo.reset()          # a fresh torch.compile per shape: no recompile limit
            ms = methods(attn, causal)
            q, k, v = (torch.randn(*bh, n, dim) for _ in range(3))
            for name, fn in ms.items():
                fwd, bwd = fwd_and_bwd(fn, q, k, v, with_backward)
                rows.append(dict(mask=mask, n=n, method=name, fwd=fwd, fwd_bwd=bwd))
                print(f"  {mask:6s} N={n:6d} {name:14s} fwd {fwd * 1e3:9.2f} ms   "
                      f"fwd+bwd {bwd * 1e3:9.2f} ms", flush=True)
    return rows


def table(rows, kernel) -> str:
    by = {(r["mask"], r["n"], r["method"]): r for r in rows}
    out = [f"### linear attention, kernel {kernel}, B·H=16, M=D=64, {torch.get_num_threads()} threads",
           "", "| mask | N | attndsl fwd ms | torch | torch.compile | sdpa | fwd speed-up vs torch / "
           "compile / sdpa | attndsl fwd+bwd ms | fwd+bwd speed-up vs torch / compile / sdpa |",
           "|---|---|---|---|---|---|---|---|---|"]
    fixed = any(r["method"] == FIXED for r in rows)
    if fixed:
        out[2] += " elu1 fused / learned, fwd, fwd+bwd |"
        out[3] += "---|"
    for mask, n in sorted({(r["mask"], r["n"]) for r in rows}):
        a = by[(mask, n, "attndsl")]
        base = [by[(mask, n, m)] for m in ("torch", "torch.compile", "sdpa")]
        out.append(f"| {mask} | {n} | {a['fwd'] * 1e3:.2f} | "
                   + " | ".join(f"{b['fwd'] * 1e3:.2f}" for b in base)
                   + " | " + " / ".join(f"{b['fwd'] / a['fwd']:.1f}x" for b in base)
                   + f" | {a['fwd_bwd'] * 1e3:.2f} | "
                   + " / ".join(f"{b['fwd_bwd'] / a['fwd_bwd']:.1f}x" for b in base) + " |")
        if fixed:
            f = by[(mask, n, FIXED)]
            out[-1] += f" {f['fwd'] / a['fwd']:.2f}, {f['fwd_bwd'] / a['fwd_bwd']:.2f} |"
    return "\n".join(out)


def plot(rows, kernel, path, methods=("attndsl", "torch", "torch.compile", "sdpa")):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, mask in zip(axes, ("causal", "none")):
        for method in methods:
            pts = sorted((r["n"], r["fwd"] * 1e3) for r in rows if r["mask"] == mask and r["method"] == method)
            ax.plot(*zip(*pts), marker="o", label=method, linewidth=2.5 if method == "attndsl" else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{'causal' if mask == 'causal' else 'full'} — forward, kernel {kernel}")
        ax.set_xlabel("sequence length N")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("time (ms), lower is better")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", choices=sorted(SPECS), default="elu1")
    p.add_argument("--lengths", default="1024,4096,16384")
    p.add_argument("--quick", action="store_true", help="N=1024 only, forward only")
    a = p.parse_args(argv)
    lengths = [1024] if a.quick else [int(x) for x in a.lengths.split(",")]
    print(f"bench_linear: kernel {a.kernel}, lengths {lengths}, {torch.get_num_threads()} threads", flush=True)
    rows = run(a.kernel, lengths, with_backward=not a.quick)
    md = table(rows, a.kernel)
    print("\n" + md)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"bench_linear_{a.kernel}.md").write_text(md + "\n")
    plot(rows, a.kernel, RESULTS / f"bench_linear_{a.kernel}.png")
    print(f"\nwrote {RESULTS / f'bench_linear_{a.kernel}.md'} and .png")


if __name__ == "__main__":
    main()

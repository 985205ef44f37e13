"""Every sequence length: attndsl's per-call choice of form against what a user would otherwise run.

B·H = 8 (1 × 8 heads), Dk = Dv = 64, float32, 2 threads. For each spec and N:
  attndsl         the module as compiled (plan='auto': the form is chosen per call by N)
  <form>          the same spec forced onto each form its plans use (plan=<form>): the chosen
                  form's time should be within 15% of the fastest of them ("chosen form / fastest
                  form"; "attndsl / fastest form" also carries the noise between two modules)
  sdpa+bias       exact F.scaled_dot_product_attention (softmax) with b(i − j) as a float mask:
                  the exact attention a user would reach for
  torch           the spec's own maths, dense O(N²) in eager PyTorch: (φq φkᵀ ∘ exp(b) ∘ mask) v,
                  normalized, exp(b − row max) precomputed like SDPA's mask
  torch.compile   the same function under torch.compile
Times are medians of interleaved rounds (each round runs every method once, each round starting
at another method), forward
under no_grad, and forward + backward (out.sum().backward(), q, k, v requiring grad).
Ratios: sdpa+bias time / attndsl time (> 1: attndsl is faster).

    python benchmarks/bench_lengths.py [--lengths 256,512,...] [--specs table,smooth] [--rounds 5] [--quick]
Writes benchmarks/results/bench_lengths.{md,json,png}.
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
from tvm.target.codegen import llvm_get_system_cpu

import attndsl
from attndsl.precision import position_values
from bench_linear import torch_feature_map

RESULTS = Path(__file__).resolve().parent / "results"
H, DIM = 8, 64
MEM_LIMIT = 6e9             # skip the dense baselines whose (H, N, N) tensors would need more

SPECS = {   # name -> spec text ({n}: the sequence length, for a table over the whole range)
    "table": "kernel = elu1; position = toeplitz(max_distance={n}, init=normal)",
    "smooth": "kernel = elu1; position(r) = -0.02 * abs(r) + 0.5 * cos(r / 16)",
    "clipped": "kernel = elu1; position = toeplitz(max_distance=128, init=normal)",
    "favor_clipped_causal": "kernel = favor(features=64); position = toeplitz(max_distance=128, init=normal); "
                            "mask = causal",
    "alibi_causal": "kernel = elu1; position = alibi; mask = causal",
    "learned_slopes_causal": "param s[heads] = 0.1; kernel = elu1; position(r) = -s * abs(r); mask = causal",
}


def compile_spec(name: str, n: int, plan: str = "auto") -> attndsl.Attention:
    text = "attention bench { " + SPECS[name].format(n=n) + " }"
    return attndsl.compile(text, heads=H, head_dim=DIM, plan=plan)


def bias(attn: attndsl.Attention, n: int) -> torch.Tensor:
    """b_h(i − j) as (1, H, N, N) float32, masked entries −inf."""
    if attn.spec.learned_position:                       # params: b(r) at their values
        vals = attn._tabulated(n, torch.float32).detach()
    else:
        vals = position_values(attn.spec.position, n, H, attn.position_table, attn.position_slopes).float()
    r = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    b = vals[:, r + n - 1]
    if attn.spec.causal:
        b = b.masked_fill(r < 0, float("-inf"))
    return b[None]


def dense(phi):
    """The spec's maths in torch: weights (φq φkᵀ)·c with c = exp(b − row max) (masked 0)."""
    def run(q, k, v, c):
        a = (phi(q) @ phi(k).transpose(-1, -2)) * c
        return (a @ v) / a.sum(-1, keepdim=True)
    return run


def methods(name: str, n: int) -> tuple[attndsl.Attention, dict]:
    attn = compile_spec(name, n)
    out = {"attndsl": attn}
    for form in dict.fromkeys(f for p in attn.plans for f in p.forms):
        forced = compile_spec(name, n, plan=form)
        forced.load_state_dict(attn.state_dict())
        out[form] = forced
    if 4.0 * H * n * n * 3 <= MEM_LIMIT:
        b = bias(attn, n)
        c = (b - b.amax(-1, keepdim=True)).exp()
        out["sdpa+bias"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=b)
        eager = dense(torch_feature_map(attn))
        out["torch"] = lambda q, k, v: eager(q, k, v, c)
        compiled = torch.compile(eager)
        out["torch.compile"] = lambda q, k, v: compiled(q, k, v, c)
    return attn, out


def once(fn, q, k, v, backward: bool) -> float:
    t0 = time.perf_counter()
    if backward:
        fn(q, k, v).sum().backward()
    else:
        with torch.no_grad():
            fn(q, k, v)
    return time.perf_counter() - t0


def interleaved(methods: dict, q, k, v, backward: bool, rounds: int) -> dict[str, float]:
    """{method: median ms} of fn(q, k, v) (forward under no_grad, or forward + backward) over
    `rounds` rounds after a warm-up (which also compiles); each round runs every method once,
    starting at another one each round."""
    times: dict[str, list[float]] = {m: [] for m in methods}
    for fn in methods.values():
        once(fn, q, k, v, backward)
    names = list(methods)
    for r in range(rounds):
        for m in names[r % len(names):] + names[:r % len(names)]:
            times[m].append(once(methods[m], q, k, v, backward))
    return {m: 1e3 * statistics.median(t) for m, t in times.items()}


def panels(rows: list[dict]):
    """A figure of two panels, forward and forward + backward: (fig, [(axis, pass, its rows)])."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    return fig, [(ax, which, [r for r in rows if r["pass"] == which]) for ax, which in zip(axes, ("fwd", "fwd+bwd"))]


def finish(fig, title: str, path: Path) -> None:
    """The figure titled `title` and this machine's threads and CPU, saved at `path`."""
    fig.suptitle(f"{title}, {torch.get_num_threads()} threads ({llvm_get_system_cpu()})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def measure(name: str, n: int, rounds: int) -> list[dict]:
    attn, ms = methods(name, n)
    chosen = ", ".join(attn.plans[attn._plan_index(n)].forms)
    rows = []
    for backward in (False, True):
        q, k, v = (torch.randn(1, H, n, DIM, requires_grad=backward) for _ in range(3))
        med = interleaved(ms, q, k, v, backward, rounds)
        rows.append({"spec": name, "n": n, "pass": "fwd+bwd" if backward else "fwd", "chosen": chosen, "ms": med})
        print(f"  {name:22s} N={n:6d} {rows[-1]['pass']:8s} chosen {chosen:13s} "
              + "  ".join(f"{m}={t:.2f}" for m, t in med.items()), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    forms = sorted({m for r in rows for m in r["ms"]} - {"attndsl", "sdpa+bias", "torch", "torch.compile"})
    head = ["spec", "N", "pass", "chosen", "attndsl ms", *[f"{f} ms" for f in forms], "sdpa+bias ms",
            "torch ms", "torch.compile ms", "vs sdpa+bias", "vs torch.compile", "chosen form / fastest form",
            "attndsl / fastest form"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ms = r["ms"]
        fmt = lambda m: f"{ms[m]:.2f}" if m in ms else "–"                  # noqa: E731
        ratio = lambda m: f"{ms[m] / ms['attndsl']:.2f}x" if m in ms else "–"  # noqa: E731
        fastest = min(ms[f] for f in forms if f in ms)
        lines.append("| " + " | ".join([r["spec"], str(r["n"]), r["pass"], r["chosen"], fmt("attndsl"),
                                         *[fmt(f) for f in forms], fmt("sdpa+bias"), fmt("torch"),
                                         fmt("torch.compile"), ratio("sdpa+bias"), ratio("torch.compile"),
                                         f"{ms[r['chosen']] / fastest:.2f}" if r["chosen"] in ms else "–",
                                         f"{ms['attndsl'] / fastest:.2f}"]) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(dict.fromkeys(r["spec"] for r in rows))
    fig, axes = plt.subplots(2, len(names), figsize=(4 * len(names), 7), squeeze=False)
    for col, name in enumerate(names):
        for row, which in enumerate(("fwd", "fwd+bwd")):
            ax = axes[row][col]
            sel = [r for r in rows if r["spec"] == name and r["pass"] == which]
            for m in dict.fromkeys(m for r in sel for m in r["ms"]):
                pts = [(r["n"], r["ms"][m]) for r in sel if m in r["ms"]]
                style = "-o" if m == "attndsl" else "--."
                ax.loglog(*zip(*pts), style, label=m, linewidth=2.5 if m == "attndsl" else 1)
            ns = sorted({r["n"] for r in sel})
            ax.set_xticks(ns, [str(n) for n in ns], fontsize=7)
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_title(f"{name} ({which})", fontsize=9)
            ax.set_xlabel("N")
            ax.set_ylabel("ms")
            ax.legend(fontsize=6)
    finish(fig, f"attndsl per-call form choice vs SDPA+bias and torch, B·H={H}, D={DIM}, float32", path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="256,512,1024,2048,4096,8192")
    ap.add_argument("--specs", default=",".join(SPECS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="N = 512, 2048; 3 rounds")
    ap.add_argument("--out", default=str(RESULTS / "bench_lengths"))
    args = ap.parse_args(argv)
    lengths = [512, 2048] if args.quick else [int(x) for x in args.lengths.split(",")]
    rounds = 3 if args.quick else args.rounds
    rows = []
    for name in args.specs.split(","):
        for n in lengths:
            rows += measure(name, n, rounds)
    save(Path(args.out), "bench_lengths", argv, table(rows), rows, plot)


def save(out: Path, script: str, argv, text: str, rows: list[dict], plot) -> None:
    """Print the table and write out.md (the table under the CPU, threads and the command that made
    it), out.json (the rows) and out.png (plot(rows, path))."""
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(f"# {script} ({llvm_get_system_cpu()}, {torch.get_num_threads()} "
                                      f"threads)\n\n`python benchmarks/{script}.py "
                                      f"{' '.join(sys.argv[1:] if argv is None else argv)}`\n\n{text}\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()

"""Sliding windows: each windowed spec against what a user would otherwise run.

B = 2, H = 4 (B·H = 8), Dk = Dv = 64, float32, 2 threads. For each spec and N:
  attndsl         the compiled module with the window
  attndsl full    the same spec without the window (mask = causal or none): what the window saves
  sdpa+mask       softmax specs: F.scaled_dot_product_attention with the window (and alibi's bias)
                  as a float mask (N, N); feature maps: the same maths in eager PyTorch, dense
  flex            softmax specs: FlexAttention (torch.compile) with a sliding-window block mask and
                  alibi as a score_mod, forward only (torch 2.13 has no FlexAttention backward on
                  the CPU)
Times are medians of interleaved rounds (each round runs every method once, starting at another
one each round); forward under no_grad, and forward + backward.

    python benchmarks/bench_window.py [--lengths 1024,4096] [--specs ...] [--rounds 5] [--no-flex]
Writes benchmarks/results/bench_window.{md,json,png}.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import attndsl
from attndsl.reference import alibi_slopes
from bench_lengths import finish, interleaved, panels, once, save

RESULTS = Path(__file__).resolve().parent / "results"
B, H, DIM = 2, 4, 64

SPECS = {       # name -> (spec body, the same without the window)
    "softmax_window128": ("mask = window(128)", "mask = none"),
    "softmax_alibi_causal_window256": ("mask = causal_window(256); position = alibi",
                                       "mask = causal; position = alibi"),
    "elu1_causal_window128": ("kernel = elu1; mask = causal_window(128)", "kernel = elu1; mask = causal"),
}


FORWARD_ONLY = {"flex"}


def window_keep(spec, n: int) -> torch.Tensor:
    """(N, N) True where row i sees key j."""
    i = torch.arange(n)
    r = i[:, None] - i[None, :]
    keep = r.abs() <= spec.window
    return keep & (r >= 0) if spec.causal else keep


def dense_bias(spec, n: int) -> torch.Tensor:
    """(H, N, N) float mask: the position term inside the window, −inf outside."""
    r = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).float()
    bias = torch.zeros(H, n, n)
    if spec.position.name == "alibi":
        bias = -alibi_slopes(H).float()[:, None, None] * r.abs()
    return bias.masked_fill(~window_keep(spec, n), float("-inf"))


def flex(spec, n: int):
    """FlexAttention with the window as a block mask (None when this torch cannot build it here)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    w, causal = spec.window, spec.causal
    slopes = alibi_slopes(H).float() if spec.position.name == "alibi" else None

    def inside(b, h, qi, kj):
        return ((qi - kj <= w) & (qi - kj >= 0)) if causal else ((qi - kj <= w) & (kj - qi <= w))

    def score(s, b, h, qi, kj):
        return s if slopes is None else s - slopes[h] * (qi - kj).abs()
    block = create_block_mask(inside, None, None, n, n, device="cpu")
    run = torch.compile(flex_attention)
    fn = lambda q, k, v: run(q, k, v, score_mod=score, block_mask=block)   # noqa: E731
    try:
        once(fn, *(torch.randn(B, H, n, DIM) for _ in range(3)), False)
    except Exception as e:                                # noqa: BLE001 - a peer that does not build here
        print(f"  flex: not measured ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
        return None
    return fn


def methods(name: str, n: int, with_flex: bool) -> dict:
    body, full = SPECS[name]
    attn = attndsl.compile("attention bench { " + body + " }", heads=H, head_dim=DIM)
    out = {"attndsl": attn,
           "attndsl full": attndsl.compile("attention bench { " + full + " }", heads=H, head_dim=DIM)}
    spec = attn.spec
    if spec.kernel.name == "softmax":
        bias = dense_bias(spec, n)
        out["sdpa+mask"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        fx = flex(spec, n) if with_flex else None
        if fx is not None:
            out["flex"] = fx
    else:
        keep = window_keep(spec, n)
        c = DIM ** -0.25

        def eager(q, k, v):
            a = (F.elu(c * q) + 1) @ (F.elu(c * k) + 1).transpose(-1, -2)
            a = a.masked_fill(~keep, 0)
            return (a @ v) / a.sum(-1, keepdim=True)
        out["eager dense"] = eager
    return out


def measure(name: str, n: int, rounds: int, with_flex: bool) -> list[dict]:
    every = methods(name, n, with_flex)
    rows = []
    for backward in (False, True):
        ms = {m: f for m, f in every.items() if not (backward and m in FORWARD_ONLY)}
        q, k, v = (torch.randn(B, H, n, DIM, requires_grad=backward) for _ in range(3))
        med = interleaved(ms, q, k, v, backward, rounds)
        rows.append({"spec": name, "form": ms["attndsl"].planned.decisions[0].form, "n": n,
                     "pass": "fwd+bwd" if backward else "fwd", "ms": med})
        print(f"  {name:32s} N={n:6d} {rows[-1]['pass']:8s} " + "  ".join(f"{m}={t:.2f}" for m, t in med.items()),
              flush=True)
    return rows


def table(rows: list[dict]) -> str:
    peers = ["sdpa+mask", "eager dense", "flex"]
    lines = ["| spec | form | N | pass | attndsl ms | full / window | peer | peer ms | **peer / attndsl** |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["ms"]
        for p in (p for p in peers if p in t):
            lines.append(f"| {r['spec']} | {r['form']} | {r['n']} | {r['pass']} | {t['attndsl']:.2f} | "
                         f"{t['attndsl full'] / t['attndsl']:.2f} | {p} | {t[p]:.2f} | **{t[p] / t['attndsl']:.2f}** |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    fig, parts = panels(rows)
    for ax, which, sel in parts:
        labels = [f"{r['spec']}\nN={r['n']}" for r in sel]
        methods_ = sorted({m for r in sel for m in r["ms"]} - {"attndsl"})
        width = 0.8 / len(methods_)
        for i, m in enumerate(methods_):
            ax.bar([x - 0.4 + width * (i + 0.5) for x in range(len(sel))],
                   [r["ms"][m] / r["ms"]["attndsl"] if m in r["ms"] else 0 for r in sel], width, label=m)
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(list(range(len(sel))), labels, fontsize=6, rotation=60)
        ax.set_title(which)
        ax.set_ylabel("time / attndsl's (> 1: attndsl faster)")
        ax.legend(fontsize=7)
    finish(fig, f"sliding windows, B={B} H={H} D={DIM}, float32", path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--specs", default=",".join(SPECS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-flex", action="store_true", help="leave FlexAttention out (its builds take minutes)")
    ap.add_argument("--out", default=str(RESULTS / "bench_window"))
    args = ap.parse_args(argv)
    rows = []
    for name in args.specs.split(","):
        for n in (int(x) for x in args.lengths.split(",")):
            rows += measure(name, n, args.rounds, not args.no_flex)
    save(Path(args.out), "bench_window", argv, table(rows), rows, plot)

if __name__ == "__main__":
    main()

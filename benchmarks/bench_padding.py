"""What a key padding mask and grouped heads cost: each form with and without, beside SDPA.

B = 2, H = 4 (B·H = 8), Dk = Dv = 64, float32, 2 threads. The mask pads the last quarter of the
second sequence's keys (right padding, as a batch of unequal lengths has). For each spec and N:
  attndsl        the compiled module, no mask
  attndsl+pad    the same call with key_padding_mask
  sdpa, sdpa+pad F.scaled_dot_product_attention (softmax, the spec's causal flag), the padding
                 as a bool attn_mask (B, 1, 1, N)
  attndsl+gqa    the call with k and v of one head shared by the 4 query heads (multi-query)
  sdpa+gqa       SDPA with the same k and v, enable_gqa=True
Times are medians of interleaved rounds (each round runs every method once, starting at another
one each round); forward under no_grad, and forward + backward. "pad / none" is attndsl+pad's time
over attndsl's (1.00: the mask costs nothing), "gqa / none" attndsl+gqa's.

    python benchmarks/bench_padding.py [--lengths 1024,4096] [--specs ...] [--rounds 7]
Writes benchmarks/results/bench_padding.{md,json,png}.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import attndsl
from bench_lengths import finish, interleaved, panels, save

RESULTS = Path(__file__).resolve().parent / "results"
B, H, DIM = 2, 4, 64

SPECS = {       # name -> (spec body, the form it runs at these lengths)
    "softmax_alibi_causal": ("position = alibi; mask = causal", "quadratic"),
    "elu1_causal": ("kernel = elu1; mask = causal", "prefix_sum, fused map"),
    "favor_causal": ("kernel = favor(features=64); mask = causal", "prefix_sum"),
    "alibi_causal": ("kernel = elu1; position = alibi; mask = causal", "decayed"),
    "clipped": ("kernel = elu1; position = toeplitz(max_distance=128, init=normal)", "banded"),
    "smooth": ("kernel = elu1; position(r) = -0.02 * abs(r) + 0.5 * cos(r / 16)", "toeplitz_fft or pairwise"),
    "kde": ("sampling = kde(buckets=32, block=128, samples=128, seed=0)", "kde"),
}


def methods(name: str, n: int) -> dict:
    attn = attndsl.compile("attention bench { " + SPECS[name][0] + " }", heads=H, head_dim=DIM)
    pad = torch.zeros(B, n, dtype=torch.bool)
    pad[1, n - n // 4:] = True
    keep = ~pad[:, None, None, :]
    causal = attn.spec.causal
    return {"attndsl": attn,
            "attndsl+pad": lambda q, k, v: attn(q, k, v, key_padding_mask=pad),
            "attndsl+gqa": lambda q, k, v: attn(q, k[:, :1], v[:, :1]),
            "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
            "sdpa+pad": lambda q, k, v: F.scaled_dot_product_attention(
                q, k, v, attn_mask=keep & torch.ones(n, n, dtype=torch.bool).tril() if causal else keep),
            "sdpa+gqa": lambda q, k, v: F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], is_causal=causal,
                                                                       enable_gqa=True)}


def measure(name: str, n: int, rounds: int) -> list[dict]:
    ms = methods(name, n)
    rows = []
    for backward in (False, True):
        q, k, v = (torch.randn(B, H, n, DIM, requires_grad=backward) for _ in range(3))
        med = interleaved(ms, q, k, v, backward, rounds)
        rows.append({"spec": name, "form": SPECS[name][1], "n": n, "pass": "fwd+bwd" if backward else "fwd",
                     "ms": med})
        print(f"  {name:22s} N={n:6d} {rows[-1]['pass']:8s} " + "  ".join(f"{m}={t:.2f}" for m, t in med.items())
              + f"  pad/none={med['attndsl+pad'] / med['attndsl']:.2f}"
              + f"  gqa/none={med['attndsl+gqa'] / med['attndsl']:.2f}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| spec | form | N | pass | attndsl ms | attndsl+pad ms | **pad / none** | **gqa / none** "
             "| sdpa ms | sdpa pad / none | sdpa gqa / none |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["ms"]
        lines.append(f"| {r['spec']} | {r['form']} | {r['n']} | {r['pass']} | {t['attndsl']:.2f} | "
                     f"{t['attndsl+pad']:.2f} | **{t['attndsl+pad'] / t['attndsl']:.2f}** | "
                     f"**{t['attndsl+gqa'] / t['attndsl']:.2f}** | {t['sdpa']:.2f} | "
                     f"{t['sdpa+pad'] / t['sdpa']:.2f} | {t['sdpa+gqa'] / t['sdpa']:.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    fig, parts = panels(rows)
    for ax, which, sel in parts:
        labels = [f"{r['spec']}\nN={r['n']}" for r in sel]
        x = range(len(sel))
        for j, (who, what) in enumerate((("attndsl", "pad"), ("sdpa", "pad"), ("attndsl", "gqa"), ("sdpa", "gqa"))):
            ax.bar([i - 0.3 + 0.2 * j for i in x], [r["ms"][f"{who}+{what}"] / r["ms"][who] for r in sel], 0.2,
                   label=f"{'SDPA' if who == 'sdpa' else who}: {what} / none")
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.axhline(1.1, color="r", linewidth=0.8, linestyle="--", label="+10%")
        ax.set_xticks(list(x), labels, fontsize=6, rotation=60)
        ax.set_title(which)
        ax.set_ylabel("time with the mask (or shared kv heads) / without")
        ax.legend(fontsize=7)
    finish(fig, f"key padding mask and grouped-head cost, B={B} H={H} D={DIM}, float32", path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--specs", default=",".join(SPECS))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=str(RESULTS / "bench_padding"))
    args = ap.parse_args(argv)
    rows = []
    for name in args.specs.split(","):
        for n in (int(x) for x in args.lengths.split(",")):
            rows += measure(name, n, args.rounds)
    save(Path(args.out), "bench_padding", argv, table(rows), rows, plot)

if __name__ == "__main__":
    main()

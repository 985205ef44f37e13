"""Cross-attention (Nq ≠ Nk) on the O(N²) forms, beside what a user would otherwise run.

B = 1, H = 8, Dk = Dv = 64, float32, 2 threads; a few queries against a long memory (Nk = 4096) and
many queries against a short one. For each spec (softmax without a position term and with ALiBi's
bias: the quadratic form; elu1 with a smooth position term: the pairwise form where it costs
less than the padded route) and shape:
  attndsl          the compiled module: the kernels read Nq query rows and Nk keys
  attndsl padded   the same module called as a self-attention of max(Nq, Nk): the shorter side
                   padded (the keys with a key padding mask), the rows past Nq dropped; the route
                   of the forms whose kernels take one length
With --kv-heads G < H, k and v have G heads (grouped-query attention; SDPA and FlexAttention with
enable_gqa=True, the PyTorch maths on k and v expanded to H heads), and in place of the padded
route:
  attndsl expanded the module called on k and v expanded to H heads (repeat_interleave), as a
                   module without grouped heads as rows takes them
  sdpa             F.scaled_dot_product_attention, the position term as a float mask (H, Nq, Nk)
                   (for elu1: softmax attention with the same bias, the exact alternative)
  eager, compile   the spec's maths in PyTorch (softmax(s·q·kᵀ + b) v, or the feature maps'
                   (φq·φkᵀ)·exp(b) normalized), eager and under torch.compile
  flex             softmax specs: FlexAttention (torch.compile), ALiBi as a score_mod; forward
                   only (torch 2.13 has no FlexAttention backward on the CPU)
Times are medians of interleaved rounds (each round runs every method once, starting at another
one each round); forward under no_grad, and forward + backward.

    python benchmarks/bench_cross.py [--shapes 1x4096,16x4096,...] [--kv-heads G] [--rounds 7] [--no-compile]
Writes benchmarks/results/bench_cross.{md,json,png} (--out to change).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import attndsl
from attndsl.reference import alibi_slopes
from bench_lengths import finish, interleaved, panels, save
from bench_linear import torch_feature_map

RESULTS = Path(__file__).resolve().parent / "results"
B, H, DIM = 1, 8, 64
SPECS = {"softmax": "kernel = softmax", "softmax_alibi": "position = alibi",
         "elu1_smooth": "kernel = elu1; position(r) = -0.02 * abs(r) + 0.5 * cos(r / 16)"}
SHAPES = "1x4096,16x4096,128x4096,1024x4096,4096x256"
FORWARD_ONLY = {"flex"}


def position_bias(name: str, nq: int, nk: int) -> torch.Tensor | None:
    """(H or 1, Nq, Nk) b(i − j) of spec `name`, None without a position term."""
    r = (torch.arange(nq)[:, None] - torch.arange(nk)[None, :]).float()
    if name == "softmax_alibi":
        return -alibi_slopes(H).float()[:, None, None] * r.abs()
    if name == "elu1_smooth":
        return (-0.02 * r.abs() + 0.5 * torch.cos(r / 16))[None]
    return None


def padded(attn, q, k, v):
    """attn as a self-attention call of max(Nq, Nk): the shorter side padded (keys masked)."""
    nq, nk = q.shape[2], k.shape[2]
    n = max(nq, nk)
    mask = torch.zeros(B, n, dtype=torch.bool)
    mask[:, nk:] = True
    q, k, v = (F.pad(t, (0, 0, 0, n - t.shape[2])) for t in (q, k, v))
    return attn(q, k, v, key_padding_mask=mask if nk < n else None)[:, :, :nq]


def methods(name: str, nq: int, nk: int, compiled: bool, kv_heads: int = H) -> dict:
    attn = attndsl.compile(f"attention bench {{ {SPECS[name]} }}", heads=H, head_dim=DIM)
    bias = position_bias(name, nq, nk)
    scale = DIM ** -0.5
    softmax = attn.spec.kernel.name == "softmax"
    phi = None if softmax else torch_feature_map(attn)
    g = H // kv_heads

    def eager(q, k, v):
        k, v = (k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)) if g > 1 else (k, v)
        if not softmax:
            a = (phi(q) @ phi(k).transpose(-1, -2)) * torch.exp(bias - bias.amax(-1, keepdim=True))
            return (a @ v) / a.sum(-1, keepdim=True)
        s = scale * q @ k.transpose(-1, -2)
        return torch.softmax(s if bias is None else s + bias, -1) @ v
    out = {"attndsl": attn}
    if g > 1:
        out["attndsl expanded"] = lambda q, k, v: attn(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1))
    else:
        out["attndsl padded"] = lambda q, k, v: padded(attn, q, k, v)
    out["sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=g > 1)
    out["eager"] = eager
    if compiled:
        torch._dynamo.reset()
        out["compile"] = torch.compile(eager, dynamic=False)
    if compiled and softmax:
        slopes = alibi_slopes(H).float()
        from torch.nn.attention.flex_attention import flex_attention
        run = torch.compile(flex_attention, dynamic=False)

        def score(s, b, h, qi, kj):
            return s if bias is None else s - slopes[h] * (qi - kj).abs()
        out["flex"] = lambda q, k, v: run(q, k, v, score_mod=score, enable_gqa=g > 1)
    return out


def measure(name: str, nq: int, nk: int, rounds: int, compiled: bool, kv_heads: int = H) -> list[dict]:
    ms = methods(name, nq, nk, compiled, kv_heads)
    rows = []
    for backward in (False, True):
        run = {m: f for m, f in ms.items() if not (backward and m in FORWARD_ONLY)}
        q = torch.randn(B, H, nq, DIM, requires_grad=backward)
        k, v = (torch.randn(B, kv_heads, nk, DIM, requires_grad=backward) for _ in range(2))
        med = interleaved(run, q, k, v, backward, rounds)
        rows.append({"spec": name, "nq": nq, "nk": nk, "kv_heads": kv_heads, "pass": "fwd+bwd" if backward else "fwd",
                     "ms": med})
        print(f"  {name:14s} {nq:5d}x{nk:<5d} {rows[-1]['pass']:8s} "
              + "  ".join(f"{m}={t:.2f}" for m, t in med.items()), flush=True)
    return rows


def route(t: dict) -> str:
    """The other attndsl route of a row's times: the padded one, or (grouped heads) k and v expanded."""
    return "attndsl padded" if "attndsl padded" in t else "attndsl expanded"


def table(rows: list[dict]) -> str:
    others = [m for m in ("sdpa", "eager", "compile", "flex") if any(m in r["ms"] for r in rows)]
    lines = [f"| spec | Nq × Nk | kv heads | pass | attndsl ms | {route(rows[0]['ms'])[8:]} route / attndsl | "
             + " | ".join(f"{m} ms" for m in others) + " | " + " | ".join(f"{m} / attndsl" for m in others) + " |",
             "|---|---|---|---|---|---|" + "---|" * (2 * len(others))]
    for r in rows:
        t = r["ms"]
        cell = lambda m, f: f(t[m]) if m in t else "–"   # noqa: E731
        lines.append(f"| {r['spec']} | {r['nq']} × {r['nk']} | {r['kv_heads']} | {r['pass']} | {t['attndsl']:.2f} | "
                     f"**{t[route(t)] / t['attndsl']:.1f}x** | "
                     + " | ".join(cell(m, lambda x: f"{x:.2f}") for m in others) + " | "
                     + " | ".join(cell(m, lambda x: f"{x / t['attndsl']:.2f}x") for m in others) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    fig, parts = panels(rows)
    for ax, which, sel in parts:
        x = range(len(sel))
        names = [m for m in ("attndsl", "attndsl padded", "attndsl expanded", "sdpa", "eager", "compile", "flex")
                 if any(m in r["ms"] for r in sel)]
        width = 0.8 / len(names)
        for j, m in enumerate(names):
            ax.bar([i - 0.4 + width * (j + 0.5) for i in x], [r["ms"].get(m, float("nan")) for r in sel], width,
                   label=m)
        ax.set_yscale("log")
        ax.set_xticks(list(x), [f"{r['spec']}\n{r['nq']}×{r['nk']}" for r in sel], fontsize=6, rotation=60)
        ax.set_title(which)
        ax.set_ylabel("ms (log), lower is better")
        ax.legend(fontsize=7)
    finish(fig, f"cross-attention, B={B} H={H} (kv heads {rows[0]['kv_heads']}) D={DIM}, float32", path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=SHAPES, help="Nq x Nk pairs, comma-separated")
    ap.add_argument("--specs", default=",".join(SPECS))
    ap.add_argument("--kv-heads", type=int, default=H, help=f"heads of k and v (a divisor of H = {H})")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-compile", action="store_true", help="leave out torch.compile and FlexAttention")
    ap.add_argument("--out", default=str(RESULTS / "bench_cross"))
    args = ap.parse_args(argv)
    rows = []
    for name in args.specs.split(","):
        for shape in args.shapes.split(","):
            nq, nk = (int(x) for x in shape.split("x"))
            rows += measure(name, nq, nk, args.rounds, not args.no_compile, args.kv_heads)
    save(Path(args.out), "bench_cross", argv, table(rows), rows, plot)


if __name__ == "__main__":
    main()

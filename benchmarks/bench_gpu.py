"""Linear attention on a CUDA GPU: attndsl's portable kernels vs what a GPU user would otherwise run.

Causal and full masks, B·H = 16, M = Dk = Dv = 64, N in {1024, 4096, 16384}, float32:
  attndsl              the spec compiled for target='cuda' (te_forms.py kernels, dlight schedules)
  torch                the same maths in eager PyTorch (bench_linear.py's chunked / two-GEMM forms)
  torch.compile        that function under torch.compile (Inductor's Triton kernels)
  sdpa                 exact softmax attention, F.scaled_dot_product_attention (flash kernels)
  fla chunk            flash-linear-attention's chunked kernel (`fla.ops.linear_attn`), when installed
forward and forward+backward, CUDA-synchronized wall time; ratios are (baseline) / (attndsl).

    python benchmarks/bench_gpu.py [--kernel elu1|favor|softmax|clipped|rpe] [--lengths 1024,4096,16384] [--quick]
(--kernel softmax: the quadratic form against SDPA, eager softmax(s·q·kᵀ)·v and its torch.compile;
--kernel clipped: elu1 with a learned table clipped at W = 128, the banded form, against SDPA with
the bias as a float mask and the same maths written out with its (H, N, N) weights; --kernel rpe:
elu1 with a table as long as the sequence, the Toeplitz-FFT form (fft_blocks.py), against the same
baselines and the same table forced onto the banded form, `attndsl banded`, which the planner's
flop costs rank below the FFT.)
Writes benchmarks/results/bench_gpu_<kernel>.{md,png}. Without a GPU it says so and exits 0.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import attndsl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_linear  # noqa: E402
import bench_rpe  # noqa: E402
from bench_linear import SPECS, fwd_and_bwd, plot, torch_feature_map  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GPU_SPECS = {**SPECS, "softmax": "attention bench {{ mask = {mask} }}",
             "clipped": "attention bench {{ kernel = elu1; position = toeplitz(max_distance=128, init=normal); "
                        "mask = {mask} }}",
             "rpe": "attention bench {{ kernel = elu1; position = toeplitz(max_distance=16384, init=normal); "
                    "mask = {mask} }}"}


def timeit(fn) -> float:
    """Best CUDA-synchronized wall time of fn() after a warm-up (which also compiles)."""
    return bench_linear.timeit(fn, budget=1.0, max_reps=50, sync=torch.cuda.synchronize)


def fla_method(attn, causal):
    """flash-linear-attention's chunked linear attention with the same φ, or None without fla."""
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except ImportError:
        return None
    if not causal:
        return None                         # fla's linear_attn kernels are causal only
    phi = torch_feature_map(attn)

    def run(q, k, v):                       # fla: (B, T, H, D), normalized by the running Σφk
        o, _ = chunk_linear_attn(phi(q).transpose(1, 2), phi(k).transpose(1, 2), v.transpose(1, 2),
                                 scale=1.0, normalize=True)
        return o.transpose(1, 2)
    return run


def softmax_methods(attn, causal):
    """The quadratic form (softmax_rows.py) against SDPA and the same maths written out."""
    def plain(q, k, v):
        s = attn.scale * q @ k.transpose(-1, -2)
        if causal:
            n = q.shape[-2]
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        return torch.softmax(s, -1) @ v
    return {"attndsl": attn, "torch": plain, "torch.compile": torch.compile(plain, dynamic=False),
            "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                   scale=attn.scale)}


def clipped_methods(attn, causal):
    """A table's form (banded, or toeplitz_fft) against SDPA with the bias as a float mask, and
    Σ_j c(i−j) κ_ij v_j written out."""
    phi = torch_feature_map(attn)
    cache = {}

    def bias(q):                             # built once per length, outside the timed calls
        n = q.shape[-2]
        if n not in cache:
            cache[n] = bench_rpe.bias_matrix(attn, n).to(q.device)    # (1, H, N, N), −inf where masked
        return cache[n]

    def plain(q, k, v):
        a = (phi(q) @ phi(k).transpose(-1, -2)) * bias(q).exp()
        return (a @ v) / a.sum(-1, keepdim=True)
    return {"attndsl": attn, "torch": plain, "torch.compile": torch.compile(plain, dynamic=False),
            "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bias(q), scale=attn.scale)}


def banded_twin(attn, text):
    """`text` compiled for CUDA on the banded form, with attn's table (the FFT form's rival)."""
    twin = attndsl.compile(text, heads=attn.heads, head_dim=attn.head_dim, target="cuda", plan="banded")
    with torch.no_grad():
        twin.position_table.copy_(attn.position_table)
    return twin


def methods(attn, causal):
    if attn.spec.kernel.name == "softmax":
        return softmax_methods(attn, causal)
    if attn.position_table is not None:
        return clipped_methods(attn, causal)
    ms = bench_linear.methods(attn, causal)           # attndsl, torch, torch.compile, sdpa
    fla = fla_method(attn, causal)
    if fla is not None:
        ms["fla chunk"] = fla
    return ms


MASKS = ("causal", "none")


def compiled(kernel: str, mask: str, heads=8, dim=64):
    """(the spec compiled for CUDA, {name: its rival forms}): what run() times; what
    tools/gpu_bundle.py compiles ahead."""
    text = GPU_SPECS[kernel].format(mask=mask)
    attn = attndsl.compile(text, heads=heads, head_dim=dim, target="cuda")
    return attn, ({"attndsl banded": banded_twin(attn, text)} if kernel == "rpe" else {})


def run(kernel: str, lengths: list[int], bh=(2, 8), dim=64, with_backward=True):
    rows = []
    for mask in MASKS:
        causal = mask == "causal"
        attn, extra = compiled(kernel, mask, bh[1], dim)
        attn.cuda()                         # its buffers (the projection W) on the GPU, as a user would
        extra = {name: twin.cuda() for name, twin in extra.items()}
        print("\n".join(l for l in attn.explain().splitlines() if l.lstrip().startswith(("build", "tuning"))),
              flush=True)
        for n in lengths:
            torch._dynamo.reset()
            q, k, v = (torch.randn(*bh, n, dim, device="cuda") for _ in range(3))
            ref = None
            for name, fn in {**methods(attn, causal), **extra}.items():
                try:
                    out = fn(q, k, v)
                    fwd, bwd = fwd_and_bwd(fn, q, k, v, with_backward, timer=timeit)
                except torch.cuda.OutOfMemoryError:         # an (N, N) or (N, 2W − 1) tensor at large N
                    print(f"  {mask:6s} N={n:6d} {name:14s} out of GPU memory: left out", flush=True)
                    torch.cuda.empty_cache()
                    continue
                if name == "torch":
                    ref = out
                rows.append(dict(mask=mask, n=n, method=name, fwd=fwd, fwd_bwd=bwd))
                print(f"  {mask:6s} N={n:6d} {name:14s} fwd {fwd * 1e3:9.3f} ms   "
                      f"fwd+bwd {bwd * 1e3:9.3f} ms", flush=True)
            if ref is not None:
                err = ((attn(q, k, v) - ref).norm() / ref.norm()).item()
                print(f"  {mask:6s} N={n:6d} attndsl vs torch: relative error {err:.1e}", flush=True)
    return rows


def table(rows, kernel) -> str:
    by = {(r["mask"], r["n"], r["method"]): r for r in rows}
    names = [m for m in ("torch", "torch.compile", "sdpa", "fla chunk", "attndsl banded")
             if any(r["method"] == m for r in rows)]
    what = {"softmax": "softmax attention (quadratic form)",
            "clipped": "elu1 with a table clipped at W = 128 (banded form; sdpa: the bias as a float mask)",
            "rpe": "elu1 with a table as long as the sequence (toeplitz_fft form; sdpa: the bias as a float mask)"}.get(
        kernel, f"linear attention, kernel {kernel}")
    out = [f"### {what} on {torch.cuda.get_device_name()}, B·H=16, M=D=64, float32",
           "", f"| mask | N | attndsl fwd ms | {' | '.join(names)} | fwd speed-up vs {' / '.join(names)} "
           f"| attndsl fwd+bwd ms | fwd+bwd speed-up |", "|---" * (6 + len(names)) + "|"]
    for mask, n in sorted({(r["mask"], r["n"]) for r in rows if r["method"] == "attndsl"}):
        a = by[(mask, n, "attndsl")]
        base = [by.get((mask, n, m)) for m in names]
        cell = lambda b, f: "—" if b is None else f(b)       # noqa: E731
        out.append(f"| {mask} | {n} | {a['fwd'] * 1e3:.3f} | "
                   + " | ".join(cell(b, lambda b: f"{b['fwd'] * 1e3:.3f}") for b in base)
                   + " | " + " / ".join(cell(b, lambda b: f"{b['fwd'] / a['fwd']:.2f}x") for b in base)
                   + f" | {a['fwd_bwd'] * 1e3:.3f} | "
                   + " / ".join(cell(b, lambda b: f"{b['fwd_bwd'] / a['fwd_bwd']:.2f}x") for b in base) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", choices=sorted(GPU_SPECS), default="elu1")
    p.add_argument("--lengths", default="1024,4096,16384")
    p.add_argument("--quick", action="store_true", help="N=1024 only, forward only")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU here (torch.cuda.is_available() is False); nothing to measure")
        return 0
    lengths = [1024] if a.quick else [int(x) for x in a.lengths.split(",")]
    print(f"bench_gpu: {torch.cuda.get_device_name()}, kernel {a.kernel}, lengths {lengths}", flush=True)
    rows = run(a.kernel, lengths, with_backward=not a.quick)
    md = table(rows, a.kernel)
    print("\n" + md)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"bench_gpu_{a.kernel}.md").write_text(md + "\n")
    plot(rows, f"{a.kernel} (GPU)", RESULTS / f"bench_gpu_{a.kernel}.png",
         methods=list(dict.fromkeys(r["method"] for r in rows)))
    print(f"\nwrote {RESULTS / f'bench_gpu_{a.kernel}.md'} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

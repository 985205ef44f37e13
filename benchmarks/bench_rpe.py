"""Relative positions in linear attention: attndsl vs what a user would otherwise run, one table.

M = Dk = Dv = 64, B·H = 8 (1 × 8 heads), elu1 feature map, forward pass, float32. Scenarios:
  table     learned table over the whole range (W = N), apply = scores, no mask (Luo et al.)
  clipped   learned table clipped at W = 128, apply = scores, no mask (the banded form; `attndsl
            fft` is the same spec forced onto the Toeplitz-FFT form, up to N = 8192)
  alibi     alibi, causal (the decayed form), next to plain causal linear attention
  alibi_full  alibi, no mask (the decayed form, both directions), next to non-causal linear attention
Baselines:
  sdpa+bias   exact F.scaled_dot_product_attention with the bias as a float mask (H, N, N)
  naive fft   Luo et al. written directly in PyTorch: φk⊗v states (N, M·(D+1)) for all heads,
              rfft over 2N, product with the bias spectrum, irfft, contraction with φq
  linear      attndsl's own linear attention without a position term, same mask (alibi's yardstick)
Ratios are baseline time / attndsl time (> 1: attndsl wins). Baselines whose big tensors alone
would exceed MEM_LIMIT are skipped (the naive formulation ran this 24 GiB machine out of memory
at N = 16384). Where SDPA's (H, N, N) mask would (N = 32768: 34 GB), the row runs B = 8, H = 1
instead: the same B·H and work, one table shared by the batch, a (1, 1, N, N) mask of 4.3 GB.

Peak memory (--memory): each method runs once in a fresh child process, under a 20 GiB
address-space limit; the child resets its peak RSS (/proc/self/clear_refs) after set-up and
reports VmHWM − VmRSS, i.e. what the call itself needed on top of its inputs and parameters.

    python benchmarks/bench_rpe.py [--lengths 1024,4096,8192,16384,32768] [--quick] [--memory]
Writes benchmarks/results/bench_rpe.{md,png}.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import attndsl
from bench_linear import timeit

RESULTS = Path(__file__).resolve().parent / "results"
H, DIM = 8, 64
MEM_LIMIT = 16e9            # skip a baseline whose big tensors alone would need more than this
AS_LIMIT = 20 * 2**30       # address space of a --memory child: a failed allocation, not an OOM kill
FORCED_FFT_MAX_N = 8192     # the clipped table through the FFT form, for comparison, up to this N


def _cpu() -> str:
    from tvm.target.codegen import llvm_get_system_cpu
    return llvm_get_system_cpu()


def spec(scenario: str, n: int) -> str:
    pos = {"table": f"toeplitz(max_distance={n}, init=normal)",
           "clipped": "toeplitz(max_distance=128, init=normal)",
           "alibi": "alibi", "alibi_full": "alibi", "linear": "none", "linear_full": "none"}[scenario]
    mask = "causal" if scenario in ("alibi", "linear") else "none"
    return f"attention bench {{ kernel = elu1\n position = {pos}\n mask = {mask} }}"


def bias_matrix(attn: attndsl.Attention, n: int) -> torch.Tensor:
    """b_h(i − j) as (1, H, N, N), masked entries −inf: what SDPA gets as attn_mask. Built a block
    of rows at a time (the (N, N) int64 offsets alone would be 8.6 GB at N = 32768)."""
    heads = (attn.position_table if attn.position_table is not None else attn.position_slopes).shape[0]
    out = torch.empty(1, heads, n, n)
    j = torch.arange(n)
    for i0 in range(0, n, 1024):
        r = torch.arange(i0, min(n, i0 + 1024))[:, None] - j[None, :]
        if attn.position_table is not None:
            w = (attn.position_table.shape[1] - 1) // 2
            b = attn.position_table.detach()[:, r.clamp(-w, w) + w]
        else:
            b = -attn.position_slopes.detach()[:, :, None] * r.abs().float()
        if attn.spec.causal:
            b = b.masked_fill(r < 0, float("-inf"))
        out[0, :, i0:i0 + r.shape[0]] = b
    return out


def naive_fft(attn: attndsl.Attention, q, k, v):
    """Luo et al. in plain PyTorch (non-causal): every (m, d) channel through rfft at once."""
    s = math.sqrt(attn.scale)
    qf, kf = F.elu(s * q) + 1, F.elu(s * k) + 1
    n = q.shape[2]
    L = 2 * n
    w = (attn.position_table.shape[1] - 1) // 2
    r = torch.arange(L)
    r = torch.where(r < n, r, r - L)
    c = torch.exp(attn.position_table.detach()[:, r.clamp(-w, w) + w])
    c[:, n] = 0                                               # r = ±n: outside the sequence
    chat = torch.fft.rfft(c, dim=-1)                          # (H, L/2+1)
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1)
    states = torch.einsum("bhnm,bhnd->bhmdn", kf, v1)         # (B, H, M, D+1, N)
    spec_ = torch.fft.rfft(states, n=L, dim=-1) * chat[None, :, None, None, :]
    conv = torch.fft.irfft(spec_, n=L, dim=-1)[..., :n]
    num = torch.einsum("bhnm,bhmdn->bhnd", qf, conv)
    return num[..., :-1] / num[..., -1:]


def naive_bytes(n: int) -> float:
    """States (N, M·(D+1)) per head, their padded copy, spectrum and inverse: ~8 x the states
    (measured: N = 16384 ran this 24 GiB machine out of memory)."""
    return 8 * H * DIM * (DIM + 1) * n * 4


def layout(n: int) -> tuple[int, int]:
    """(B, heads) with B·heads = H: (1, H), or (H, 1) where an (H, N, N) float mask exceeds MEM_LIMIT."""
    return (1, H) if 4.0 * H * n * n <= MEM_LIMIT else (H, 1)


def inputs(n: int):
    return tuple(torch.randn(*layout(n), n, DIM) for _ in range(3))


def methods(scenario: str, n: int):
    heads = layout(n)[1]
    attn = attndsl.compile(spec(scenario, n), heads=heads, head_dim=DIM)
    out = {"attndsl": lambda q, k, v: attn(q, k, v)}
    if scenario in ("alibi", "alibi_full"):
        yardstick = "linear" if scenario == "alibi" else "linear_full"
        lin = attndsl.compile(spec(yardstick, n), heads=heads, head_dim=DIM)
        out["linear"] = lambda q, k, v: lin(q, k, v)
    if scenario == "clipped" and n <= FORCED_FFT_MAX_N:
        fft = attndsl.compile(spec(scenario, n), heads=heads, head_dim=DIM, plan="toeplitz_fft")
        fft.load_state_dict(attn.state_dict())
        out["attndsl fft"] = lambda q, k, v: fft(q, k, v)
    if 4.0 * heads * n * n <= MEM_LIMIT:
        bias = bias_matrix(attn, n)
        out["sdpa+bias"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    if scenario == "table" and naive_bytes(n) <= MEM_LIMIT:
        out["naive fft"] = lambda q, k, v: naive_fft(attn, q, k, v)
    return attn, out


def run(lengths, scenarios, backward=False):
    """Forward times, or with `backward` forward + backward (out.sum().backward(), the inputs
    requiring grad; the naive FFT is left out there)."""
    rows = []
    for scenario in scenarios:
        for n in lengths:
            attn, ms = methods(scenario, n)
            form = attn.planned.decisions[0].form
            q, k, v = (t.requires_grad_(backward) for t in inputs(n))
            for name, fn in ms.items():
                if backward and name == "naive fft":
                    continue
                with torch.set_grad_enabled(backward):
                    t = timeit((lambda: fn(q, k, v).sum().backward()) if backward else (lambda: fn(q, k, v)),
                               budget=3.0, max_reps=5)
                rows.append(dict(scenario=scenario, n=n, method=name, fwd=t, form=form, batch=q.shape[0]))
                print(f"  {scenario:8s} N={n:6d} {name:10s} {t * 1e3:10.1f} ms"
                      + (f"   ({form})" if name == "attndsl" else ""), flush=True)
    return rows


def table(rows) -> str:
    by = {(r["scenario"], r["n"], r["method"]): r for r in rows}
    out = [f"### relative positions, elu1, B·H={H}, M=D={DIM}, forward, {torch.get_num_threads()} threads, "
           f"{_cpu()}", "",
           "| scenario | N | attndsl form | attndsl ms | sdpa+bias ms | naive fft ms | attndsl fft ms | "
           "linear ms | vs sdpa+bias | vs naive fft | vs attndsl fft | attndsl / linear |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for scenario, n in sorted({(r["scenario"], r["n"]) for r in rows}, key=lambda x: (x[0], x[1])):
        a = by[(scenario, n, "attndsl")]

        def ms(m):
            r = by.get((scenario, n, m))
            return f"{r['fwd'] * 1e3:.1f}" if r else "—"

        def ratio(m, inv=False):
            r = by.get((scenario, n, m))
            if not r:
                return "—"
            return f"{a['fwd'] / r['fwd']:.2f}x" if inv else f"{r['fwd'] / a['fwd']:.2f}x"
        out.append(f"| {scenario} | {n} | {a['form']} | {a['fwd'] * 1e3:.1f} | {ms('sdpa+bias')} | "
                   f"{ms('naive fft')} | {ms('attndsl fft')} | {ms('linear')} | {ratio('sdpa+bias')} | "
                   f"{ratio('naive fft')} | {ratio('attndsl fft')} | {ratio('linear', inv=True)} |")
    folded = sorted({r["n"] for r in rows if r.get("batch", 1) > 1})
    if folded:
        out += ["", f"N = {', '.join(map(str, folded))}: B = {H}, H = 1 (SDPA's (H, N, N) mask would not fit)."]
    return "\n".join(out)


def plot(rows, path, what="forward"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scenarios = sorted({r["scenario"] for r in rows})
    fig, axes = plt.subplots(1, len(scenarios), figsize=(5 * len(scenarios), 4.2), squeeze=False)
    for ax, sc in zip(axes[0], scenarios):
        for method in ("attndsl", "sdpa+bias", "naive fft", "attndsl fft", "linear"):
            pts = sorted((r["n"], r["fwd"] * 1e3) for r in rows if r["scenario"] == sc and r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method, linewidth=2.5 if method == "attndsl" else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(sc)
        ax.set_xlabel("sequence length N")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel(f"{what} time (ms), lower is better")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _peak_child(scenario: str, n: int, method: str) -> None:
    """In a fresh process: set up one method, reset the peak RSS, run it once, print JSON."""
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))
    _, ms = methods(scenario, n)
    q, k, v = inputs(n)
    Path("/proc/self/clear_refs").write_text("5")            # VmHWM := VmRSS
    base = _status("VmRSS")
    try:
        with torch.no_grad():
            ms[method](q, k, v)
        print(json.dumps({"peak": _status("VmHWM") - base}))
    except (RuntimeError, MemoryError) as e:                 # the address-space limit
        print(json.dumps({"failed": str(e).splitlines()[0][:120]}))


def peak_memory(scenario: str, n: int) -> list[dict]:
    rows = []
    for method in ("attndsl", "naive fft"):
        proc = subprocess.run([sys.executable, __file__, "--_peak", scenario, str(n), method],
                              capture_output=True, text=True, timeout=1800)
        lines = proc.stdout.strip().splitlines()
        res = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
            "failed": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
        rows.append(dict(scenario=scenario, n=n, method=method, **res))
        what = f"{res['peak'] / 2**20:.0f} MiB" if "peak" in res else f"failed ({res['failed']})"
        print(f"  peak memory {scenario} N={n} {method:10s} {what}", flush=True)
    return rows


def memory_table(rows) -> str:
    out = [f"### peak memory of one forward call (above inputs and parameters), B·H={H}, M=D={DIM}", "",
           "| scenario | N | method | peak MiB |", "|---|---|---|---|"]
    for r in rows:
        peak = f"{r['peak'] / 2**20:.0f}" if "peak" in r else \
            f"> {AS_LIMIT / 2**30:.0f} GiB (allocation failed under the limit)"
        out.append(f"| {r['scenario']} | {r['n']} | {r['method']} | {peak} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="1024,4096,8192,16384,32768")
    p.add_argument("--scenarios", default="table,clipped,alibi,alibi_full")
    p.add_argument("--quick", action="store_true", help="N=1024 only")
    p.add_argument("--backward", action="store_true",
                   help="time forward + backward instead (table and plot: bench_rpe_bwd.*)")
    p.add_argument("--memory", action="store_true", help="also the peak memory at N = --memory-n")
    p.add_argument("--memory-n", type=int, default=16384)
    p.add_argument("--_peak", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._peak:
        return _peak_child(a._peak[0], int(a._peak[1]), a._peak[2])
    lengths = [1024] if a.quick else [int(x) for x in a.lengths.split(",")]
    print(f"bench_rpe: lengths {lengths}, {torch.get_num_threads()} threads", flush=True)
    rows = run(lengths, a.scenarios.split(","), a.backward)
    md = table(rows)
    if a.backward:
        md = md.replace(", forward,", ", forward + backward,", 1)
    mem = peak_memory("table", a.memory_n) if a.memory else []
    if mem:
        md += "\n\n" + memory_table(mem)
    print("\n" + md)
    RESULTS.mkdir(exist_ok=True)
    stem = "bench_rpe_bwd" if a.backward else "bench_rpe"
    (RESULTS / f"{stem}.md").write_text(md + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"timings": rows, "peak_memory": mem}, indent=1))
    plot(rows, RESULTS / f"{stem}.png", "forward + backward" if a.backward else "forward")
    print(f"\nwrote {RESULTS / stem}.md and .png")


if __name__ == "__main__":
    main()

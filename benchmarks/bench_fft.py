"""The FFT inside the Toeplitz kernels: TVMScript (lowering/fft/real.py) vs the library (lowering/fft/packed.py).

Both sides run exactly as the Toeplitz kernels run them: a compiled TVM kernel that calls
T.call_packed("attndsl.fft.rfft" / "attndsl.fft.irfft") on its (G, L) / (G, L/2+1, 2) buffers,
served by lowering/fft/packed.py with IMPL = "library" (torch.fft/pocketfft with out=) or IMPL = "tir" (real.py's
compiled TVMScript FFT); "direct" times that TVMScript kernel called straight from Python
(the packed detour's cost is the difference). G = 260 channels (4 features × 65 = D+1 channels, M = D =
64), float32, rfft with n = L/2 valid samples (the zero padding of a Toeplitz product) and irfft.
GFLOP/s count 2.5·L·log2 L flops per real transform. Calls are interleaved (A, B, A, B, ...) and
the median of each is reported, so machine noise hits both sides alike; ratio > 1: TVMScript wins.
Threads: --threads, else ATTNDSL_NUM_THREADS, else every CPU; TVM and torch.set_num_threads alike.

    python benchmarks/bench_fft.py [--lengths 2048,8192,16384,32768,65536] [--reps 7] [--threads T]
Writes benchmarks/results/bench_fft.{md,png} (bench_fft_tT.* when --threads is given).

    python benchmarks/bench_fft.py --toeplitz 4096 [--reps 5]
instead times the one Toeplitz form that still calls the packed FFT with each FFT (fftlib.IMPL
switched in-process): the values form (apply = values, FastRPB), elu1, B·H = 8, M = D = 64,
learned table over the whole range, no mask, forward, float32. (The scores kernels run their
own FFT inline, lowering/fft/convolve.py, and call no packed FFT.)
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from attndsl import config

RESULTS = Path(__file__).resolve().parent / "results"
G = 260
IMPLS = ("library", "tir", "direct")
LABEL = {"library": "library (torch.fft)", "tir": "TVMScript", "direct": "TVMScript, direct call"}


def gflops(L: int, seconds: float) -> float:
    return G * 2.5 * L * math.log2(L) / seconds / 1e9


def compile_kernels():
    """{impl: (rfft, irfft)}: the packed-call kernels (served per fftlib.IMPL) and the direct ones."""
    from attndsl.lowering import build
    from attndsl.lowering.fft import packed as fftlib, real as fft_tir
    funcs = {"rfft_packed": fft_tir.rfft("rfft_packed", "float32", "library"),
             "irfft_packed": fft_tir.irfft("irfft_packed", "float32", "library")}
    fftlib.register()
    lib = build.build(funcs, build.resolve_target("llvm"))
    direct = fftlib.tir_library("float32")

    def served(f, impl):
        def call(*args):
            fftlib.IMPL = impl
            f(*args)
        return call
    return {"library": (served(lib["rfft_packed"], "library"), served(lib["irfft_packed"], "library")),
            "tir": (served(lib["rfft_packed"], "tir"), served(lib["irfft_packed"], "tir")),
            "direct": (direct["rfft"], direct["irfft"])}


def measure(kernels, L: int, reps: int) -> dict:
    """{(transform, impl): median seconds} for one length, calls interleaved."""
    x = torch.randn(G, L)
    bufs = {impl: (torch.empty(G, L // 2 + 1, 2), torch.empty(G, L)) for impl in IMPLS}
    calls = {}
    for impl in IMPLS:
        y, back = bufs[impl]
        fr, fi = kernels[impl]
        calls[("rfft", impl)] = (lambda f, y: lambda: f(x, y, L // 2))(fr, y)
        calls[("irfft", impl)] = (lambda f, y, b: lambda: f(y, b))(fi, y, back)
    for fn in calls.values():              # warm up: workspaces, twiddles, library plans
        fn()
    diff = {t: rel_diff(bufs["tir"][i], bufs["library"][i]) for i, t in enumerate(("rfft", "irfft"))}
    times = {key: [] for key in calls}
    for _ in range(reps):
        for key, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return {key: statistics.median(ts) for key, ts in times.items()}, diff


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def table(rows: list[dict], threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = [f"### batched real FFT, G = {G} channels, float32, {threads} threads ({cpu})", "",
           "| L | transform | library ms | TVMScript ms | TVMScript direct ms | library GFLOP/s "
           "| TVMScript GFLOP/s | library / TVMScript | rel. diff |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['L']} | {r['transform']} | {r['library'] * 1e3:.2f} | {r['tir'] * 1e3:.2f} "
                   f"| {r['direct'] * 1e3:.2f} "
                   f"| {gflops(r['L'], r['library']):.1f} | {gflops(r['L'], r['tir']):.1f} "
                   f"| {r['library'] / r['tir']:.2f}x | {r['diff']:.1e} |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path, threads: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, transform in zip(axes, ("rfft", "irfft")):
        sel = [r for r in rows if r["transform"] == transform]
        Ls = [r["L"] for r in sel]
        for impl in IMPLS[:2]:
            ax.plot(Ls, [gflops(r["L"], r[impl]) for r in sel], "o-", label=LABEL[impl])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("L")
        ax.set_title(f"{transform}, G = {G}, float32, {threads} threads")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("GFLOP/s (2.5·L·log2 L per transform)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def toeplitz_ab(N: int, reps: int) -> str:
    """Forward time of the values form over a full-range table with each FFT behind the
    kernels' packed calls (fftlib.IMPL, read per call: the same compiled kernels)."""
    import attndsl
    from attndsl.lowering.fft import packed as fftlib
    text = (f"attention bench {{ kernel = elu1\n position = toeplitz(max_distance={N}, init=normal)\n"
            f" apply = values\n mask = none }}")
    q, k, v = (torch.randn(1, 8, N, 64) for _ in range(3))
    attn = attndsl.compile(text, heads=8, head_dim=64)
    impls = ("library", "tir")
    outs, times = {}, {impl: [] for impl in impls}
    with torch.no_grad():
        for impl in impls:
            fftlib.IMPL = impl
            outs[impl] = attn(q, k, v)                  # builds / loads everything
        for _ in range(reps):
            for impl in impls:
                fftlib.IMPL = impl
                t0 = time.perf_counter()
                attn(q, k, v)
                times[impl].append(time.perf_counter() - t0)
    med = {impl: statistics.median(ts) for impl, ts in times.items()}
    form = " + ".join(d.form for d in attn.planned.decisions)
    return (f"{form} forms, elu1, B·H=8, N={N}, M=D=64, learned table, no mask, forward, float32, "
            f"{config.num_threads()} threads: library FFT {med['library'] * 1e3:.0f} ms, TVMScript FFT "
            f"{med['tir'] * 1e3:.0f} ms ({med['library'] / med['tir']:.2f}x); outputs differ by "
            f"{rel_diff(outs['tir'], outs['library']):.1e} (relative)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="2048,8192,16384,32768,65536")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--toeplitz", type=int, default=None, metavar="N")
    args = p.parse_args(argv)
    if args.threads:
        os.environ["ATTNDSL_NUM_THREADS"] = str(args.threads)
    config.export_tvm_threads()            # before anything starts TVM's thread pool
    threads = config.num_threads()
    torch.set_num_threads(threads)
    if args.toeplitz:
        print(toeplitz_ab(args.toeplitz, args.reps))
        return
    kernels = compile_kernels()
    rows = []
    for L in (int(s) for s in args.lengths.split(",")):
        med, diff = measure(kernels, L, args.reps * max(1, 16384 // L))   # short calls: more reps
        for transform in ("rfft", "irfft"):
            rows.append({"L": L, "transform": transform, "diff": diff[transform],
                         **{impl: med[(transform, impl)] for impl in IMPLS}})
            r = rows[-1]
            print(f"L={L:6d} {transform:5s} library {r['library'] * 1e3:8.2f} ms  "
                  f"TVMScript {r['tir'] * 1e3:8.2f} ms  ratio {r['library'] / r['tir']:.2f}x", flush=True)
    text = table(rows, threads)
    text += (f"\nMedians of {args.reps} interleaved calls ({args.reps}·16384/L below L = 16384); "
             f"load average at the end {os.getloadavg()[0]:.1f} (other jobs share this machine). "
             f"rel. diff: ‖tvm − lib‖/‖lib‖.\n")
    print("\n" + text)
    RESULTS.mkdir(exist_ok=True)
    stem = f"bench_fft_t{args.threads}" if args.threads else "bench_fft"
    (RESULTS / f"{stem}.md").write_text(text)
    plot(rows, RESULTS / f"{stem}.png", threads)


if __name__ == "__main__":
    main()

"""`make gpu-bundle`: everything a GPU machine needs beyond torch, built on this one (no GPU needed).

    python tools/gpu_bundle.py [--out build/gpu-bundle] [--arch sm_90] [--jobs 2] [--pythons 3.11,3.12]

Compiles, for CUDA, every library the GPU tests load (tests/test_cuda.py `gpu_builds`) and
bench_gpu.py's softmax, elu1 and clipped specs, with their kernels compiled by nvcc for `--arch`
(H100 and H200: sm_90), in `--jobs` processes; then adds attndsl, lark, tvm_ffi (for each Python
of `--pythons`: the GPU machines run 3.12) and TVM's runtime libraries (attndsl/bundle.py), and
checks that what ships is at most 16 MiB and that, unpacked, every build finds its library in it
without TVM's compiler. tools/gpu_check.sh runs from it.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 16 << 20
BENCH_KERNELS = ("softmax", "elu1", "clipped")


def builds() -> list[tuple[str, object]]:
    """(label, build) of every library the bundle holds, in a fixed order."""
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]
    import bench_gpu
    import test_cuda
    out = list(test_cuda.gpu_builds())
    out += [(f"bench {k} {m}", lambda k=k, m=m: bench_gpu.compiled(k, m))       # float32, built by compile
            for k in BENCH_KERNELS for m in bench_gpu.MASKS]
    return out


def shard(out: Path, arch: str, index: int, count: int) -> None:
    from attndsl import bundle
    todo = builds()
    with bundle.kernels(out, arch=arch):
        for i in range(index, len(todo), count):
            label, build = todo[i]
            t0 = time.perf_counter()
            build()
            print(f"  [{i + 1}/{len(todo)}] {label}: {time.perf_counter() - t0:.1f} s", flush=True)


# in the bundle's environment, with TVM's compiler out of reach: every build() must find its library
CHECK = """
import sys
sys.path[:0] = sys.argv[1:3]
import no_compiler
import gpu_bundle
for label, build in gpu_bundle.builds():
    build()
print(f"gpu-bundle: all {len(gpu_bundle.builds())} builds resolve from the bundle, without TVM's compiler")
"""


def check(out: Path) -> bool:
    """Unpack a copy of the bundle and run every build in its environment: each finds its library
    in the bundle's cache (keyed by the bundle's own attndsl), so the GPU machine compiles nothing."""
    with tempfile.TemporaryDirectory(prefix="gpu-bundle-check-") as tmp:
        for name in ("env.sh", "bundle.tar.xz"):
            shutil.copy2(out / name, Path(tmp) / name)
        run = subprocess.run(["bash", "-c", f'source "{tmp}/env.sh" && cd / && exec "{sys.executable}" -c "$0" "$1" "$2"',
                              CHECK, str(Path(__file__).parent), str(ROOT / "tests")])
        return run.returncode == 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "build" / "gpu-bundle"))
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--pythons", default=f"{sys.version_info.major}.{sys.version_info.minor},3.12")
    ap.add_argument("--shard", help=argparse.SUPPRESS)          # i/n: one worker's share
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.shard:
        index, count = map(int, args.shard.split("/"))
        shard(out, args.arch, index, count)
        return 0
    t0 = time.perf_counter()
    print(f"gpu-bundle: compiling for CUDA ({args.arch}) in {args.jobs} processes into {out}.work/cache", flush=True)
    workers = [subprocess.Popen([sys.executable, __file__, "--out", str(out), "--arch", args.arch,
                                 "--shard", f"{i}/{args.jobs}"]) for i in range(args.jobs)]
    if any(w.wait() != 0 for w in workers):
        print("gpu-bundle: a compile failed (above)", file=sys.stderr)
        return 1
    from attndsl import bundle
    pythons = list(dict.fromkeys(args.pythons.split(",")))
    manifest = bundle.runtime(out, pythons=pythons, wheels=ROOT / "build" / "wheels")
    shipped = bundle.size(out)
    mib = shipped / (1 << 20)
    print(f"gpu-bundle: {len(manifest['libraries'])} libraries, {manifest['fatbins']} compiled for {args.arch}, "
          f"Python {', '.join(pythons)}: {mib:.1f} MiB in {out} ({time.perf_counter() - t0:.0f} s)")
    if shipped > LIMIT:
        print(f"gpu-bundle: over the {LIMIT >> 20} MiB a device call carries", file=sys.stderr)
        return 1
    return 0 if check(out) else 1


if __name__ == "__main__":
    sys.exit(main())

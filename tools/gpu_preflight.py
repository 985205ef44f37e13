"""Before the GPU checks: stop early, saying why, where they could not run.

    python tools/gpu_preflight.py        (after `source build/gpu-bundle/env.sh`; tools/gpu_check.sh)

In order: torch sees a CUDA GPU; TVM's CUDA runtime loads (libtvm_runtime_cuda.so, with the
driver's libcuda.so.1 and torch's libcudart.so.13); how a kernel missing from the compiled store
would be compiled (nvcc, found and run); a tiny kernel from the bundle runs on the GPU and
matches the reference. Exit status 0 when all pass, 2 at the first that does not.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time


def stop(why: str) -> int:
    print(f"gpu preflight: STOP: {why}", flush=True)
    return 2


def main() -> int:
    t0 = time.perf_counter()
    import torch
    if not torch.cuda.is_available():
        return stop("torch sees no CUDA GPU here (torch.cuda.is_available() is False)")
    torch.cuda.init()                       # loads torch's libcudart, which TVM's CUDA runtime links
    major, minor = torch.cuda.get_device_capability()
    print(f"gpu preflight: torch {torch.__version__}, {torch.cuda.get_device_name()} (sm_{major}{minor})", flush=True)

    import attndsl
    from attndsl import config
    from attndsl.runtime import cuda
    problem = cuda.load_runtime()
    if problem:
        return stop(f"TVM's CUDA runtime: {problem}")
    print(f"gpu preflight: TVM's CUDA runtime from {config.tvm_runtime_dir() or 'the apache-tvm package'}; "
          f"attndsl from {attndsl.__file__}; kernel cache {config.cache_dir()}", flush=True)

    from attndsl.schedules.cuda import nvcc_path
    nvcc = nvcc_path()
    if nvcc:
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        print(f"gpu preflight: a kernel missing from the store compiles with {nvcc} ({version[-1] if version else '?'})",
              flush=True)
    else:
        print("gpu preflight: no nvcc: only kernels compiled ahead (the bundle's) can load", flush=True)
    if shutil.which("nvidia-smi") is None:
        print("gpu preflight: (nvidia-smi is not on PATH)", flush=True)

    text = "attention preflight { kernel = elu1; mask = causal }"
    try:
        attn = attndsl.compile(text, heads=2, head_dim=8, target="cuda").cuda()
        q, k, v = (torch.randn(1, 2, 100, 8, device="cuda") for _ in range(3))
        out = attn(q, k, v)
        torch.cuda.synchronize()
    except Exception as e:                  # noqa: BLE001  (any failure here is the answer)
        return stop(f"a tiny kernel did not run: {type(e).__name__}: {e}")
    ref = attn.reference(q.double(), k.double(), v.double())
    err = ((out.double() - ref).norm() / ref.norm()).item()
    if not err < 1e-5:
        return stop(f"a tiny kernel ran but is wrong: relative error {err:.2e} against the reference")
    build = next((ln.strip() for ln in attn.explain().splitlines() if "float32:" in ln), "")
    print(f"gpu preflight: ok in {time.perf_counter() - t0:.1f} s (elu1 causal: relative error {err:.1e}; {build})",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CUDA targets and their schedule: dlight's GPU rules over lowering/portable/te_forms.py's stages.

lowering/portable/softmax_rows.py's kernels bind their own loops to threads (a hand schedule, marked
`tirx.is_scheduled`, which dlight skips). te_forms.py's kernels are unscheduled dataflow (one
block per `te.compute`), and `schedule` hands every block to dlight: Matmul, GEMV, Reduction and GeneralReduction where the block has their shape,
else Fallback, which fuses the block's spatial loops, splits them over thread blocks and threads
and keeps its reduction serial in each thread. Each block then runs as one kernel launch.
"""
from __future__ import annotations

from dataclasses import dataclass

# what users may write as `target=` for CUDA -> the TVM target (a tag, or a dict)
TARGETS: dict[str, str | dict] = {
    "cuda": "nvidia/nvidia-h100",                 # this machine's GPU if it has one, else the H100
    "nvidia/nvidia-h100": "nvidia/nvidia-h100",
    "sm_90a": "nvidia/nvidia-h100",
    "sm_80": {"kind": "cuda", "arch": "sm_80"},   # A100 class
}


def is_cuda(target: str | dict) -> bool:
    if isinstance(target, dict):
        return target.get("kind") == "cuda"
    return target in TARGETS


def unknown(target) -> ValueError:
    """The error for a target that is neither the CPU nor a CUDA name."""
    return ValueError(f"unknown target {target!r}; valid: 'llvm' (this CPU), "
                      f"{', '.join(map(repr, TARGETS))}, 'mlir-cpu' (the torch-mlir backend), "
                      f"attndsl.Target('llvm', kernels='portable') or a TVM target dict")


def has_gpu() -> bool:
    """Whether TVM has its CUDA runtime here and sees a GPU."""
    import tvm
    return bool(tvm.runtime.enabled("cuda")) and tvm.runtime.device("cuda", 0).exist


def tvm_target(target: str | dict):
    """The TVM target; plain 'cuda' is the GPU of this machine (its arch, shared memory, threads)
    where there is one, else the H100."""
    import tvm
    if target == "cuda" and has_gpu():
        return tvm.target.Target.from_device("cuda")
    return tvm.target.Target(TARGETS.get(target, target) if isinstance(target, str) else target)


def arch(target) -> str:
    """The sm_XX a TVM target compiles for."""
    return str(target.attrs.get("arch", "sm_90a"))


def schedule(mod, target):
    """Every prim_func of `mod` with its blocks bound to GPU threads (dlight)."""
    from tvm.s_tir import dlight as dl
    with target:
        return dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                       dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)


# --- the census: what the generated kernels use, from the CUDA C and from ptxas -------------------

@dataclass(frozen=True)
class KernelUsage:
    """One __global__ kernel: registers, spills, static shared memory and stack (ptxas -v), and in
    its CUDA C the tensor-core instructions (mma, ldmatrix), shared buffers and barriers."""
    name: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    stack: int
    mma: int
    shared_buffers: int
    barriers: int


def nvcc_path() -> str | None:
    """nvcc on PATH, else under CUDA_PATH or /usr/local/cuda."""
    import os
    import shutil
    from pathlib import Path
    found = shutil.which("nvcc")
    for root in (os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if found is None and root and (Path(root) / "bin" / "nvcc").exists():
            found = str(Path(root) / "bin" / "nvcc")
    return found


def census(source: str, target) -> list[KernelUsage]:
    """Every kernel of `source` (CUDA C that TVM generated for `target`) compiled by nvcc for its
    arch with `ptxas -v`; RuntimeError when there is no nvcc or it fails."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("no nvcc (on PATH, under CUDA_PATH or /usr/local/cuda)")
    sm = arch(target).removeprefix("sm_")
    with tempfile.TemporaryDirectory() as tmp:
        cu = Path(tmp) / "kernels.cu"
        cu.write_text(source)
        run = subprocess.run([nvcc, "--cubin", "-O3", "-gencode", f"arch=compute_{sm},code=sm_{sm}",
                              "-Xptxas", "-v", "-o", str(Path(tmp) / "kernels.cubin"), str(cu)],
                             capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"nvcc failed: {run.stderr.strip().splitlines()[-1] if run.stderr else run.returncode}")
    usage: dict[str, dict] = {}
    name = None
    for line in run.stderr.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([\w$]+)'?", line)
        if m:
            name = m.group(1)
            usage.setdefault(name, {})
            continue
        if name is None:
            continue
        for key, pattern in (("stack", r"(\d+) bytes stack frame"), ("spill_stores", r"(\d+) bytes spill stores"),
                             ("spill_loads", r"(\d+) bytes spill loads"), ("registers", r"Used (\d+) registers"),
                             ("shared", r"(\d+) bytes smem")):
            m = re.search(pattern, line)
            if m:
                usage[name][key] = int(m.group(1))
    bodies = dict(_kernel_bodies(source))
    return [KernelUsage(n, u.get("registers", 0), u.get("spill_stores", 0), u.get("spill_loads", 0),
                        u.get("shared", 0), u.get("stack", 0), *_source_counts(bodies.get(n, "")))
            for n, u in sorted(usage.items())]


def _kernel_bodies(source: str):
    """(name, body text) of each __global__ definition (not its declaration) in `source`."""
    import re
    for m in re.finditer(r'__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\([^;{]*\)\s*\{', source):
        depth, i = 1, m.end()
        while depth and i < len(source):
            depth += {"{": 1, "}": -1}.get(source[i], 0)
            i += 1
        yield m.group(1), source[m.end():i]


def _source_counts(body: str) -> tuple[int, int, int]:
    """(tensor-core instructions, __shared__ buffers, __syncthreads) in a kernel's CUDA C."""
    import re
    return (len(re.findall(r"\bmma\.sync|\bwmma::mma_sync|\bldmatrix", body)), body.count("__shared__"),
            body.count("__syncthreads"))


def census_table(rows: list[KernelUsage]) -> str:
    """The census as a markdown table."""
    lines = ["| kernel | registers | spill stores / loads (B) | shared (B) | stack (B) | mma, ldmatrix | "
             "shared buffers | barriers |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.name} | {r.registers} | {r.spill_stores} / {r.spill_loads} | {r.shared} | {r.stack} | "
              f"{r.mma} | {r.shared_buffers} | {r.barriers} |" for r in rows]
    return "\n".join(lines)

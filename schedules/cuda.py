"""CUDA targets and their schedule: dlight's GPU rules over lowering/portable/te_forms.py's stages.

lowering/portable/softmax_rows.py's kernels bind their own loops to threads (a hand schedule, marked
`tirx.is_scheduled`, which dlight skips). te_forms.py's kernels are unscheduled dataflow (one
block per `te.compute`), and `schedule` hands every block to dlight: Matmul, GEMV, Reduction and GeneralReduction where the block has their shape,
else Fallback, which fuses the block's spatial loops, splits them over thread blocks and threads
and keeps its reduction serial in each thread. Each block then runs as one kernel launch.
"""
from __future__ import annotations

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

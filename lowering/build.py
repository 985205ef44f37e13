"""Targets and building: TIR functions -> one compiled TVM module."""
from __future__ import annotations

import tvm

from attndsl import config
from attndsl.schedules import cuda

from .target import Target


def resolve_target(target) -> dict | tvm.target.Target:
    """The TVM target of a Target (target.py), a name or a TVM target dict: 'llvm' means this
    machine's CPU (its -mcpu, so AVX-512 is used where present); CUDA names (schedules/cuda.py
    TARGETS) their TVM target."""
    if isinstance(target, Target):
        target = target.spec()
    if cuda.is_cuda(target):
        return cuda.tvm_target(target)
    if isinstance(target, dict):
        return dict(target)
    if target in ("llvm", "cpu"):
        from tvm.target import codegen
        return {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()}
    raise cuda.unknown(target)


# The CPU kernels allocate every buffer at the size they access, so CompactBufferAllocation leaves
# them as they are (tests/test_build.py checks the lowered code with and without it) while it costs
# a third of a Toeplitz-FFT library's build; the scheduled CUDA kernels need it.
CPU_SKIPPED_PASSES = ("s_tir.CompactBufferAllocation",)


def build(funcs: dict, target) -> tvm.runtime.Module:
    """The kernels `funcs` ({name: prim_func}) compiled for `target` into one module."""
    config.export_tvm_threads()          # before a kernel of it starts TVM's thread pool
    mod = tvm.IRModule(funcs)
    if isinstance(target, tvm.target.Target) and target.kind.name == "cuda":
        mod = cuda.schedule(mod, target)
        with target:
            return tvm.compile(mod, target=target)
    with cpu_pass_context():
        return tvm.compile(mod, target=target)


def cpu_pass_context(skipped=CPU_SKIPPED_PASSES) -> tvm.transform.PassContext:
    """The current pass context less the passes `skipped`."""
    now = tvm.transform.PassContext.current()
    return tvm.transform.PassContext(opt_level=now.opt_level, config=dict(now.config),
                                     required_pass=list(now.required_pass),
                                     disabled_pass=[*now.disabled_pass, *skipped])


def cuda_source(lib) -> str:
    """The CUDA C of a library built for a CUDA target (its device module)."""
    mod = lib.mod if hasattr(lib, "mod") else lib
    return "\n".join(m.inspect_source("cuda") for m in mod.imports if m.kind == "cuda")


def module_text(funcs: dict) -> str:
    """The TVMScript of every kernel (what `emit --stage tir` prints, and the cache key)."""
    return tvm.IRModule(funcs).script()

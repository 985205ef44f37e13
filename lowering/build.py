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


def build(funcs: dict, target) -> tvm.runtime.Module:
    """The kernels `funcs` ({name: prim_func}) compiled for `target` into one module."""
    config.export_tvm_threads()          # before a kernel of it starts TVM's thread pool
    mod = tvm.IRModule(funcs)
    if isinstance(target, tvm.target.Target) and target.kind.name == "cuda":
        mod = cuda.schedule(mod, target)
        with target:
            return tvm.compile(mod, target=target)
    return tvm.compile(mod, target=target)


def cuda_source(lib) -> str:
    """The CUDA C of a library built for a CUDA target (its device module)."""
    mod = lib.mod if hasattr(lib, "mod") else lib
    return "\n".join(m.inspect_source("cuda") for m in mod.imports if m.kind == "cuda")


def module_text(funcs: dict) -> str:
    """The TVMScript of every kernel (what `emit --stage tir` prints, and the cache key)."""
    return tvm.IRModule(funcs).script()

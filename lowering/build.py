"""Targets and building: TIR functions -> one compiled TVM module."""
from __future__ import annotations

import tvm


def resolve_target(target: str | dict) -> dict:
    """'llvm' means this machine's CPU (its -mcpu, so AVX-512 is used where present)."""
    if isinstance(target, dict):
        return dict(target)
    if target in ("llvm", "cpu"):
        from tvm.target import codegen
        return {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()}
    raise ValueError(f"unknown target {target!r}; valid: 'llvm' (this CPU) or a TVM target dict")


def build(funcs: dict, target: dict) -> tvm.runtime.Module:
    return tvm.compile(tvm.IRModule(funcs), target=target)


def module_text(funcs: dict) -> str:
    """The TVMScript of every kernel (what `emit --stage tir` prints, and the cache key)."""
    return tvm.IRModule(funcs).script()

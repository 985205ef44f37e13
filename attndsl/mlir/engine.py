"""linalg -> LLVM -> machine code through MLIR's ExecutionEngine; calls with torch tensors.

The pipeline bufferizes the whole module (function boundaries included, arguments read-only),
frees every buffer it allocates (ownership-based deallocation, so repeated calls do not grow
memory), lowers linalg to loops and everything to the LLVM dialect. The result of a call is
written into a tensor the caller allocates (`out`), so nothing crosses the boundary to be freed.
Tensors pass as memref descriptors over their storage: no copies.
"""
from __future__ import annotations

import ctypes
import functools

import torch
from torch_mlir import execution_engine, ir, passmanager, rewrite
from torch_mlir.dialects import linalg

BUFFERIZE = ",".join([
    "one-shot-bufferize{bufferize-function-boundaries function-boundary-type-conversion=identity-layout-map}",
    "buffer-deallocation-pipeline",
])
TO_LLVM = ",".join([
    "convert-linalg-to-loops",
    "convert-scf-to-cf",
    "expand-strided-metadata",
    "lower-affine",
    "convert-math-to-llvm",
    "convert-math-to-libm",
    "convert-to-llvm",
    "reconcile-unrealized-casts",
])


def _copy_to_linalg(op, rewriter) -> None:
    """memref.copy(src, dst) -> linalg.copy ins(src) outs(dst): a loop nest, not a call into
    MLIR's C runner library (which torch-mlir does not ship)."""
    with rewriter.ip, op.location:
        linalg.copy(op.operands[0], outs=[op.operands[1]])
    rewriter.erase_op(op)


def _copies() -> rewrite.FrozenRewritePatternSet:
    patterns = rewrite.RewritePatternSet()
    patterns.add("memref.copy", _copy_to_linalg)
    return patterns.freeze()


@functools.cache
def _descriptor_type(rank: int) -> type[ctypes.Structure]:
    """MLIR's ranked memref descriptor {allocated, aligned, offset, sizes[rank], strides[rank]}.
    One class per rank: torch_mlir.runtime builds a new ctypes class per call, and ctypes keeps
    every pointer type it ever made (a leak of ~60 KB a call here)."""
    return type(f"MemRef{rank}", (ctypes.Structure,), {"_fields_": [
        ("allocated", ctypes.c_void_p), ("aligned", ctypes.c_void_p), ("offset", ctypes.c_int64),
        ("sizes", ctypes.c_int64 * rank), ("strides", ctypes.c_int64 * rank)]})


def descriptor(t: torch.Tensor):
    """A pointer to a pointer to `t`'s memref descriptor (what a C-interface function takes)."""
    d = _descriptor_type(t.dim())()
    d.allocated = d.aligned = t.data_ptr()
    d.offset = 0
    d.sizes[:] = list(t.shape)
    d.strides[:] = list(t.stride())
    return ctypes.pointer(ctypes.pointer(d))


class Compiled:
    """The functions @run_NAME of a lowered module, JIT-compiled once."""

    def __init__(self, module: ir.Module, opt_level: int = 3):
        with module.context:
            llvm = ir.Module.parse(str(module))         # keep the caller's linalg module intact
            passmanager.PassManager.parse(f"builtin.module({BUFFERIZE})").run(llvm.operation)
            rewrite.apply_patterns_and_fold_greedily(llvm, _copies())
            passmanager.PassManager.parse(f"builtin.module({TO_LLVM})").run(llvm.operation)
            self.engine = execution_engine.ExecutionEngine(llvm, opt_level=opt_level)

    def __call__(self, name: str, *tensors: torch.Tensor) -> None:
        """@run_NAME(*tensors): every tensor contiguous, on the CPU, of the function's dtype; the
        last one receives the result."""
        self.engine.invoke(f"run_{name}", *(descriptor(t) for t in tensors))

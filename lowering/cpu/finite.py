"""Whether a CPU tensor is all finite, as one compiled pass: the NaN rule's check (nonfinite.py).

    finite_sum(X (m, L), S (BLOCKS, L) out)     S[b] = Σ X[rows of block b]   (lane by lane)

X is the tensor's elements, L to a row; the sum of S is finite iff every element is (or the sum
overflows, which only sends the caller down its exact path). torch's own sum would do, but at
sizes above its grain it opens an OpenMP team, and on a machine whose other core is busy the
team's start and join wait for a spinning worker (milliseconds, beside kernels of 2-8 ms); this
kernel's parallel loop runs through the kernels' launcher (attndsl/runtime/omp.py), which runs it
on the calling thread while workers come late. Blocks take contiguous row ranges, four rows at a
time into four accumulators.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

BLOCKS = 64                           # partial sums: a few per task of the launcher
LANES = {"float32": 16, "float64": 8}  # one row: 64 bytes
MIN_NUMEL = 1 << 15                   # below this torch's sum is serial and cheaper to call
_DTYPES = {torch.float32: "float32", torch.float64: "float64"}
_LIBS: dict[str, object] = {}


def kernel(dtype: str):
    """The prim_func finite_sum for dtype."""
    from tvm.script import tirx as T
    lanes, zero = LANES[dtype], T.cast(0, dtype)

    @T.prim_func
    def finite_sum(x: T.handle, s: T.handle):
        T.func_attr({"global_symbol": "finite_sum", "tirx.noalias": True})
        m = T.int64()
        X = T.match_buffer(x, (m, lanes), dtype)
        S = T.match_buffer(s, (BLOCKS, lanes), dtype)
        for b in T.parallel(BLOCKS):
            acc = T.alloc_buffer((4, lanes), dtype)
            chunk = (m + BLOCKS - 1) // BLOCKS
            for u in range(4):
                for l in T.vectorized(lanes):
                    acc[u, l] = zero
            for r in range((chunk + 3) // 4):
                for u in T.unroll(4):
                    if r * 4 + u < chunk and b * chunk + r * 4 + u < m:
                        for l in T.vectorized(lanes):
                            acc[u, l] = acc[u, l] + X[b * chunk + r * 4 + u, l]
            for l in T.vectorized(lanes):
                S[b, l] = (acc[0, l] + acc[1, l]) + (acc[2, l] + acc[3, l])

    return finite_sum


def _library(dtype: str):
    """The compiled finite_sum for dtype, from the compile cache or built (a second or so); None
    where it cannot be had (a runtime-only install without TVM's compiler and no cached copy)."""
    if dtype not in _LIBS:
        from attndsl import cache, config
        from attndsl.runtime.load import host_cpu

        def build_it():
            from ..build import build, resolve_target
            return build({"finite_sum": kernel(dtype)}, resolve_target("llvm"))
        here = Path(__file__)
        source = hashlib.sha256(here.read_bytes() + (here.parent.parent / "build.py").read_bytes()).hexdigest()[:16]
        key = cache.make_key(util="finite_sum", dtype=dtype, host=host_cpu(), source=source)
        try:
            lib, _ = cache.load_or_build(key, build_it, label=f"finite_sum/{dtype}", expect=("finite_sum",))
            _LIBS[dtype] = lib["finite_sum"]
        except Exception as e:                   # never fatal: torch's sum does the same check
            _LIBS[dtype] = None
            if config.verbose():
                print(f"attndsl: the NaN check uses torch's sum ({type(e).__name__}: {e})")
    return _LIBS[dtype]


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of t is finite (False also when their sum overflows)."""
    fn = None
    if t.numel() >= MIN_NUMEL and t.device.type == "cpu" and t.dtype in _DTYPES and t.is_contiguous():
        fn = _library(_DTYPES[t.dtype])
    if fn is None:                               # torch's sum: serial at this size, or no library
        return math.isfinite(t.sum().item())
    lanes = LANES[_DTYPES[t.dtype]]
    flat = t.detach().view(-1)
    rows, rest = divmod(flat.numel(), lanes)
    partial = flat.new_empty((BLOCKS, lanes))
    fn((flat[:rows * lanes] if rest else flat).view(rows, lanes), partial)
    total = partial.sum()
    if rest:
        total = total + flat[rows * lanes:].sum()
    return math.isfinite(total.item())

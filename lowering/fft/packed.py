"""The FFT that the Toeplitz kernels call, behind registered packed functions.

TVM has no FFT op. The Toeplitz kernels (toeplitz.py) do everything else themselves and call
    T.call_packed("attndsl.fft.rfft",  X (G, L) real, Y (G, L/2+1, 2), n)   Y = rfft(X[:, :n], L)
    T.call_packed("attndsl.fft.irfft", Y (G, L/2+1, 2), X (G, L) real)      X = irfft(Y, L)
on their scratch buffers (zero copy); `register()` must run before such a kernel is called.

ATTNDSL_FFT picks what serves them, read at every call (so switching it needs no rebuild of any
kernel; `IMPL`, when set, overrides it, as benchmarks/bench_fft.py does):
  "tir"      real.py's TVMScript FFT (channels across vector lanes, Stockham radix-8), compiled
             once per dtype into its own library, kept in the compile cache like the kernels
             (a cache hit needs only the TVM runtime; a miss builds it, ~10-20 s).
  "library"  torch.fft (pocketfft) on the same buffers; needs only torch and tvm_ffi.
Measured with benchmarks/bench_fft.py through the kernels' packed calls (G = 260 channels,
float32, L = 2048..65536, on this shared 2-core AVX2 EPYC with a load average of 5-9 from other
jobs): with one thread the TVMScript FFT was faster at every length, 1.3-3x for irfft and 3-6x
for rfft (7-15 vs 1.5-7 GFLOP/s; results/bench_fft_t1.md); with two threads 2-5x faster from
L = 8192 up, while at L = 2048 (~1 ms calls) the two-thread runs were dominated by scheduling
stalls and went either way (results/bench_fft.md). A whole Toeplitz form (elu1, B·H = 8,
N = 4096, forward) ran 1.8x faster with it on one thread (4.7 s -> 2.7 s), 4.8x on two.
It is called through this packed function rather than inlined into the kernels because an
inlined copy per call site made building one spec's kernels ~30x slower (18 s vs 0.6 s, f32);
the detour costs microseconds per call of milliseconds (the "direct" column).
"""
from __future__ import annotations

import ctypes
import hashlib

import torch

from attndsl import config

IMPL: str | None = None      # "tir" | "library" overrides ATTNDSL_FFT (see above)


def impl() -> str:
    """What serves the packed calls now: IMPL, else ATTNDSL_FFT (config.fft_impl)."""
    return IMPL or config.fft_impl()

_DTYPES = {"float32": (torch.float32, ctypes.c_float), "float64": (torch.float64, ctypes.c_double)}
_registered = False
_TIR: dict[str, dict] = {}             # dtype -> {"rfft", "irfft": compiled functions, "module"}


def _wrap(t) -> torch.Tensor:
    """A torch view of a kernel's scratch buffer (a raw DLTensor: no DLPack capsule to take)."""
    dtype, ctype = _DTYPES[str(t.dtype)]
    shape = tuple(int(s) for s in t.shape)
    n = 1
    for s in shape:
        n *= s
    buf = (ctype * n).from_address(t.data_ptr())
    return torch.frombuffer(buf, dtype=dtype).view(shape)


def _source_hash() -> str:
    """The FFT library's code (and what it builds on) is part of its cache key."""
    from pathlib import Path
    h = hashlib.sha256()
    root = Path(__file__).parent.parent
    for name in ("fft/real.py", "tir/vmath.py", "tir/tiles.py", "build.py"):
        h.update(name.encode())
        h.update((root / name).read_bytes())
    return h.hexdigest()[:16]


def tir_library(dtype: str):
    """real.py's compiled {"rfft", "irfft"} functions for dtype: from the compile cache, else built
    (~10-20 s, once per machine and lowering source)."""
    if dtype not in _TIR:
        from attndsl import cache

        from attndsl.runtime.load import host_cpu

        def build():
            from . import real
            return real.library(dtype)
        key = cache.make_key(fft="fft_tir", dtype=dtype, host=host_cpu(), source=_source_hash())
        lib, _ = cache.load_or_build(key, build, label=f"fft_tir/{dtype}")
        _TIR[dtype] = {"rfft": lib["rfft"], "irfft": lib["irfft"], "module": lib}
    return _TIR[dtype]


def _rfft(x, y, n) -> int:
    if impl() == "tir":                    # the kernel's DLTensors pass straight through
        tir_library(str(x.dtype))["rfft"](x, y, n)
        return 0
    xt, yt = _wrap(x), _wrap(y)
    length = 2 * (yt.shape[1] - 1)
    torch.fft.rfft(xt[:, :n], n=length, dim=1, out=torch.view_as_complex(yt))
    return 0


def _irfft(y, x) -> int:
    if impl() == "tir":
        tir_library(str(x.dtype))["irfft"](y, x)
        return 0
    yt, xt = _wrap(y), _wrap(x)
    torch.fft.irfft(torch.view_as_complex(yt), n=xt.shape[1], dim=1, out=xt)
    return 0


def register() -> None:
    """Make the FFT packed functions visible to compiled kernels (idempotent)."""
    global _registered
    if _registered:
        return
    import tvm_ffi
    tvm_ffi.register_global_func("attndsl.fft.rfft", _rfft, override=True)
    tvm_ffi.register_global_func("attndsl.fft.irfft", _irfft, override=True)
    _registered = True


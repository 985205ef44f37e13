"""The library FFT that TVM kernels call: PyTorch's (pocketfft) behind registered packed functions.

TVM has no FFT op. The Toeplitz kernels (toeplitz.py) do everything else themselves and call
    T.call_packed("attndsl.fft.rfft",  X (G, L) real, Y (G, L/2+1, 2), n)   Y = rfft(X[:, :n], L)
    T.call_packed("attndsl.fft.irfft", Y (G, L/2+1, 2), X (G, L) real)      X = irfft(Y, L)
on their scratch buffers (zero copy). This module needs only tvm_ffi and torch, so a cached
library runs without the TVM compiler; `register()` must run before such a kernel is called.
Why a library FFT and not one in TVMScript: benchmarks/bench_fft.py measures both.
"""
from __future__ import annotations

import ctypes

import torch

_DTYPES = {"float32": (torch.float32, ctypes.c_float), "float64": (torch.float64, ctypes.c_double)}
_registered = False


def _wrap(t) -> torch.Tensor:
    """A torch view of a kernel's scratch buffer (a raw DLTensor: no DLPack capsule to take)."""
    dtype, ctype = _DTYPES[str(t.dtype)]
    shape = tuple(int(s) for s in t.shape)
    n = 1
    for s in shape:
        n *= s
    buf = (ctype * n).from_address(t.data_ptr())
    return torch.frombuffer(buf, dtype=dtype).view(shape)


def _rfft(x, y, n) -> int:
    xt, yt = _wrap(x), _wrap(y)
    length = 2 * (yt.shape[1] - 1)
    torch.fft.rfft(xt[:, :n], n=length, dim=1, out=torch.view_as_complex(yt))
    return 0


def _irfft(y, x) -> int:
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


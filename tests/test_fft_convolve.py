"""lowering/fft/convolve.py, the fused Toeplitz-FFT forward's transform, on its own: the in-place
depth-first convolver vs torch.fft in float64, for every last-stage radix, both vector widths of
each dtype (AVX2 and AVX-512, on any host), one and two levels of blocks, zero-padded inputs and
NaN wherever it must not read."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

from conftest import assert_close  # noqa: E402
from test_fft_tir import DTYPES, rtol  # noqa: E402

# log2 L = 4..11: a last radix-2, radix-4 and radix-8 stage, one to three radix-8 stages
LENGTHS = (16, 32, 64, 128, 512, 1024, 2048)
HEADS = 5                                  # two blocks of heads in the spectrum when VL = 4


def _kernel(dtype: str, VL: int, block_bytes: int):
    """(U (2L, VL), CC (H, L), Y (2L, VL) out, junk): the work buffer filled with `junk`, points
    t < L/2 from U (rows 2t, 2t + 1), convolved with CC[H − 1], points t < L/2 copied to Y."""
    from tvm.script import tirx as T
    from attndsl.lowering.fft import convolve as fft_convolve
    setup, spectrum, convolve, _, _ = fft_convolve.convolver(dtype, VL, block_bytes)

    @T.prim_func
    def kernel(u: T.handle, cc: T.handle, y: T.handle, junk: T.float64):
        T.func_attr({"global_symbol": "convolve", "tirx.noalias": True})
        L = T.int64()
        H = T.int64()
        U = T.match_buffer(u, (2 * L, VL), dtype)
        CC = T.match_buffer(cc, (H, L), dtype)
        Y = T.match_buffer(y, (2 * L, VL), dtype)
        TW = T.alloc_buffer((L, 2), dtype)
        TWi = T.alloc_buffer((L, 2), dtype)
        CH = T.alloc_buffer((H, L, 2), dtype)
        ZS = T.alloc_buffer((2 * L, VL), dtype)
        Z = T.alloc_buffer((2 * L, VL), dtype)
        setup(TW, TWi, L)
        spectrum(CC, CH, ZS, H, TW, L)
        for r in range(2 * L):
            for l in range(VL):
                Z[r, l] = T.Cast(dtype, junk)
        for r in range(L):
            for l in range(VL):
                Z[r, l] = U[r, l]
        convolve(Z, CH, H - 1, TW, TWi, L)
        for r in range(L):
            for l in range(VL):
                Y[r, l] = Z[r, l]

    return kernel


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("tag,VL", [("f32", 8), ("f32", 16), ("f64", 4), ("f64", 8)])
def test_convolver_is_a_linear_convolution(tag, VL, levels):
    """For z zero past L/2, points t < L/2 become (c ⊛ z)[t] (circular, length L), complex z: the
    real and imaginary parts are two real sequences convolved at once. levels = 2 sets block_bytes
    to 0, so every L ≥ 64 takes the second level of blocks (by default only L ≥ 65536 does)."""
    from attndsl.lowering import build
    dtype = DTYPES[tag]
    kernel = _kernel(str(dtype).split(".")[1], VL, 2**40 if levels == 1 else 0)
    lib = build.build({"convolve": kernel}, build.resolve_target("llvm"))
    for L in LENGTHS:
        n = L // 2 - 3 if L > 16 else L // 2
        z = torch.zeros(L, VL, dtype=torch.complex128)
        z[:n] = torch.randn(n, VL, dtype=torch.complex128)
        u = torch.view_as_real(z.T).permute(1, 2, 0).reshape(2 * L, VL).to(dtype)   # rows re, im
        u[L:] = float("nan")                                                       # t ≥ L/2: never read
        c = torch.randn(HEADS, L, dtype=dtype)
        y = torch.full((2 * L, VL), float("nan"), dtype=dtype)
        lib["convolve"](u.contiguous(), c, y, float("nan"))
        ref = torch.fft.ifft(torch.fft.fft(z, dim=0) * torch.fft.fft(c[-1].double())[:, None], dim=0)
        ref = torch.view_as_real(ref.T).permute(1, 2, 0).reshape(2 * L, VL)
        assert_close(f"convolve L={L}", ref[:L], y[:L], 4 * rtol(dtype, L))

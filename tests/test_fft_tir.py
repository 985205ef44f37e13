"""The TVMScript real FFT (lowering/fft/real.py) vs torch.fft in float64: every length from 16 to
65536 (odd and even log2 L: with and without the radix-2 stage), zero padding (n < L), channel
counts that are not a multiple of the vector width, float32 and float64."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("tvm")

from conftest import assert_close  # noqa: E402

LENGTHS = [16, 32, 64, 128, 1024, 2048, 65536]
# (channels G, valid samples n as a function of L): full blocks, ragged blocks, one channel, n < L
SHAPES = [(8, lambda L: L), (13, lambda L: L // 2 + 3), (1, lambda L: 5), (21, lambda L: L // 2)]
SHAPE_IDS = ["G8-full", "G13-half+3", "G1-n5", "G21-half"]
DTYPES = {"f32": torch.float32, "f64": torch.float64}


def rtol(dtype: torch.dtype, L: int) -> float:
    """Round-off grows like log2 L (one rounding per butterfly stage)."""
    return (5e-7 if dtype == torch.float32 else 1e-15) * math.log2(L)


@pytest.fixture(scope="module")
def kernels():
    from attndsl.lowering import build
    from attndsl.lowering.fft import real as fft_tir
    funcs = {}
    for tag, dt in (("f32", "float32"), ("f64", "float64")):
        funcs[f"rfft_{tag}"] = fft_tir.rfft(f"rfft_{tag}", dt)
        funcs[f"irfft_{tag}"] = fft_tir.irfft(f"irfft_{tag}", dt)
    return build.build(funcs, build.resolve_target("llvm"))


@pytest.mark.parametrize("tag", DTYPES)
@pytest.mark.parametrize("G,n_of", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("L", LENGTHS, ids=[f"L{L}" for L in LENGTHS])
def test_rfft_matches_torch(kernels, L, G, n_of, tag):
    dtype = DTYPES[tag]
    n = n_of(L)
    x = torch.randn(G, L, dtype=dtype)
    y = torch.full((G, L // 2 + 1, 2), float("nan"), dtype=dtype)   # every entry must be written
    kernels[f"rfft_{tag}"](x, y, n)
    ref = torch.view_as_real(torch.fft.rfft(x[:, :n].double(), n=L, dim=1))
    assert_close("rfft", ref, y, rtol(dtype, L))


@pytest.mark.parametrize("tag", DTYPES)
@pytest.mark.parametrize("G", [8, 13, 1], ids=["G8", "G13", "G1"])
@pytest.mark.parametrize("L", LENGTHS, ids=[f"L{L}" for L in LENGTHS])
def test_irfft_matches_torch(kernels, L, G, tag):
    """Any complex half spectrum, as torch takes it: the imaginary parts at 0 and L/2 are ignored."""
    dtype = DTYPES[tag]
    y = torch.randn(G, L // 2 + 1, 2, dtype=dtype)
    x = torch.full((G, L), float("nan"), dtype=dtype)
    kernels[f"irfft_{tag}"](y, x)
    ref = torch.fft.irfft(torch.view_as_complex(y.double()), n=L, dim=1)
    assert_close("irfft", ref, x, rtol(dtype, L))


@pytest.mark.parametrize("tag", DTYPES)
def test_round_trip_with_padding(kernels, tag):
    """irfft(rfft(x[:, :n], L)) is x[:, :n] followed by zeros."""
    dtype, L, n = DTYPES[tag], 4096, 1500
    x = torch.randn(5, L, dtype=dtype)
    y = torch.empty(5, L // 2 + 1, 2, dtype=dtype)
    back = torch.empty(5, L, dtype=dtype)
    kernels[f"rfft_{tag}"](x, y, n)
    kernels[f"irfft_{tag}"](y, back)
    want = torch.cat([x[:, :n], torch.zeros(5, L - n, dtype=dtype)], 1)
    assert_close("round trip", want.double(), back, rtol(dtype, L))


@pytest.mark.parametrize("impl", ["library", "tir"])
def test_packed_functions_agree(impl, monkeypatch):
    """A kernel calling T.call_packed("attndsl.fft.rfft"/"irfft"), as the Toeplitz kernels do, gets
    the same transform whichever implementation ATTNDSL_FFT has serve it (read at every call)."""
    from attndsl.lowering import build
    from attndsl.lowering.fft import packed as fftlib, real as fft_tir
    fftlib.register()
    monkeypatch.setenv("ATTNDSL_FFT", impl)
    lib = build.build({"r": fft_tir.rfft("r", "float32", "library"),
                       "i": fft_tir.irfft("i", "float32", "library")}, build.resolve_target("llvm"))
    x = torch.randn(3, 256)
    y = torch.empty(3, 129, 2)
    back = torch.empty(3, 256)
    lib["r"](x, y, 100)
    lib["i"](y, back)
    ref = torch.view_as_real(torch.fft.rfft(x[:, :100].double(), n=256, dim=1))
    assert_close("packed rfft", ref, y, rtol(torch.float32, 256))
    assert_close("packed irfft", torch.fft.irfft(torch.view_as_complex(ref), n=256, dim=1), back,
                 rtol(torch.float32, 256))

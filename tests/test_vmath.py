"""The vectorizable exp/cos builders of lowering/tir/vmath.py against torch, element by element."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("tvm")
from tvm.script import tirx as T  # noqa: E402

from attndsl.lowering.tir import vmath  # noqa: E402
from attndsl.lowering.build import build, resolve_target  # noqa: E402

FUNCS = {
    "exp": (vmath.exp, torch.exp, (-120.0, 120.0)),
    "cos": (vmath.cos, torch.cos, (-500.0, 500.0)),
    "sin": (lambda x: vmath.cos(x, -1), torch.sin, (-500.0, 500.0)),
    "-sin": (lambda x: vmath.cos(x, 1), lambda x: -torch.sin(x), (-500.0, 500.0)),
}
ULP = {torch.float32: 2.0 ** -23, torch.float64: 2.0 ** -52}


def _elementwise(fn, dtype: str):
    @T.prim_func
    def kernel(x: T.handle, y: T.handle):
        T.func_attr({"global_symbol": "f", "tirx.noalias": True})
        N = T.int64()
        X = T.match_buffer(x, (N, 16), dtype)
        Y = T.match_buffer(y, (N, 16), dtype)
        for o in range(N):
            for i in T.vectorized(16):
                Y[o, i] = fn(X[o, i])
    return build({"f": kernel}, resolve_target("llvm"))["f"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(FUNCS))
def test_matches_torch_within_a_few_ulp(name, dtype):
    fn, ref, (lo, hi) = FUNCS[name]
    f = _elementwise(fn, str(dtype).removeprefix("torch."))
    x = torch.linspace(lo, hi, 1 << 16, dtype=torch.float64).to(dtype)
    y = torch.empty_like(x)
    f(x.view(-1, 16), y.view(-1, 16))
    want = ref(x.double())
    if name == "exp":      # relative error where the result is a normal number
        keep = (want > torch.finfo(dtype).tiny) & (want < torch.finfo(dtype).max)
        err = ((y.double() - want).abs() / want)[keep].max().item()
    else:                  # absolute error of a bounded function
        err = (y.double() - want).abs().max().item()
    assert err < 4 * ULP[dtype], err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_exp_special_values(dtype):
    f = _elementwise(vmath.exp, str(dtype).removeprefix("torch."))
    x = torch.tensor([math.nan, math.inf, -math.inf, -1e4, 1e4, 0.0, 1.0, -1.0] * 2, dtype=dtype)
    y = torch.empty_like(x)
    f(x.view(-1, 16), y.view(-1, 16))
    assert torch.isnan(y[0]) and y[1] == math.inf and y[2] == 0 and y[3] == 0 and y[4] == math.inf
    torch.testing.assert_close(y[5:8], torch.exp(x[5:8]))

"""Vectorizable exp and cos as PrimExpr builders.

TVM's llvm target lowers `T.exp`/`T.cos` to libm calls, one lane at a time (~5–10 ns an element
here): a feature map then costs more than the attention it feeds. These builders emit plain
arithmetic that LLVM vectorizes (AVX-512: 16 lanes):

  exp(x) = p(r)·2ⁿ,   n = ⌊x·log₂e + ½⌋,  r = x − n·ln2 (two-part ln2),  p = Taylor of eʳ, |r| ≤ ln2/2
  cos(x + k·π/2) by its quadrant: j = ⌊x·2/π + ½⌋, r = x − j·π/2 (two-part π/2), |r| ≤ π/4,
      (j + k) mod 4 selects cos r, −sin r, −cos r, sin r (Taylor polynomials)

Taylor degrees keep errors within about one ulp of the dtype on the reduced range; exp underflows
through the subnormals to 0 and overflows to inf like libm; NaN propagates (through p).
float32 range reduction is exact for |x| < ~6000 (larger arguments lose accuracy gradually).
No let-bindings are emitted (a vectorized let miscompiles in TVM 0.27); LLVM shares the repeats.
"""
from __future__ import annotations

import math

from tvm import tirx


def _c(v: float, dtype: str) -> tirx.PrimExpr:
    return tirx.const(v, dtype)


def _horner(r: tirx.PrimExpr, coeffs: list[float], dtype: str) -> tirx.PrimExpr:
    """c0 + r·(c1 + r·(c2 + ...))."""
    out = _c(coeffs[-1], dtype)
    for c in reversed(coeffs[:-1]):
        out = out * r + _c(c, dtype)
    return out


def _split(x: float, bits: int) -> float:
    """x rounded to `bits` significant bits: j·hi is exact for small integers j."""
    m, e = math.frexp(x)
    return math.ldexp(round(m * 2 ** bits), e - bits)


# (hi, lo) with hi + lo = ln 2 and π/2 to well past float64 (fdlibm's constants); hi has few bits
_LN2 = {"float32": (_split(math.log(2), 12), math.log(2) - _split(math.log(2), 12)),
        "float64": (6.93147180369123816490e-01, 1.90821492927058770002e-10)}
_PIO2 = {"float32": (_split(math.pi / 2, 12), math.pi / 2 - _split(math.pi / 2, 12)),
         "float64": (1.57079632673412561417e+00, 6.07710050650619224932e-11)}

# dtype -> (int dtype, mantissa bits, exponent bias, lowest x kept, highest x finite, exp degree,
#           sin/cos degree)
_FLOAT = {
    "float32": ("int32", 23, 127, -104.0, 88.72283, 7, 11),
    "float64": ("int64", 52, 1023, -746.0, 709.782712893384, 13, 19),
}


def _pow2(n: tirx.PrimExpr, dtype: str) -> tirx.PrimExpr:
    """2ⁿ for an integer n of the int dtype in the normal range, by building the exponent bits."""
    idt, mbits, bias, *_ = _FLOAT[dtype]
    bits = tirx.shift_left(n + tirx.const(bias, idt), tirx.const(mbits, idt))
    return tirx.reinterpret(dtype, bits)


def exp(x: tirx.PrimExpr) -> tirx.PrimExpr:
    dtype = str(x.ty)
    if dtype not in _FLOAT:
        return tirx.exp(x)
    _, _, _, lo, hi, deg, _ = _FLOAT[dtype]
    n = tirx.floor(x * _c(1 / math.log(2), dtype) + _c(0.5, dtype))
    ln2_hi, ln2_lo = _LN2[dtype]
    r = x - n * _c(ln2_hi, dtype) - n * _c(ln2_lo, dtype)
    p = _horner(r, [1 / math.factorial(i) for i in range(deg + 1)], dtype)
    # p·2ⁿ as p·2ᵃ·2ⁿ⁻ᵃ with a = n >> 1: both factors are normal numbers over all of [lo, hi],
    # so results in the subnormal range round correctly instead of flushing to 0
    idt = _FLOAT[dtype][0]
    ni = tirx.Cast(idt, n)
    a = tirx.shift_right(ni, tirx.const(1, idt))
    val = p * _pow2(a, dtype) * _pow2(ni - a, dtype)
    return tirx.Select(x < _c(lo, dtype), _c(0.0, dtype),
                       tirx.Select(x > _c(hi, dtype), _c(math.inf, dtype), val))


def cos(x: tirx.PrimExpr, quadrants: int | tirx.PrimExpr = 0) -> tirx.PrimExpr:
    """cos(x + quadrants·π/2): sin(x) = cos(x, −1), −sin(x) = cos(x, 1)."""
    dtype = str(x.ty)
    if dtype not in _FLOAT:
        return tirx.cos(x + _c(math.pi / 2, dtype) * tirx.Cast(dtype, quadrants))
    idt, *_, deg = _FLOAT[dtype]
    j = tirx.floor(x * _c(2 / math.pi, dtype) + _c(0.5, dtype))
    p1, p2 = _PIO2[dtype]
    r = x - j * _c(p1, dtype) - j * _c(p2, dtype)
    r2 = r * r
    # cos r = Σ (−1)^i r^2i/(2i)!,  sin r = r·Σ (−1)^i r^2i/(2i+1)!
    c = _horner(r2, [(-1) ** i / math.factorial(2 * i) for i in range(deg // 2 + 1)], dtype)
    s = r * _horner(r2, [(-1) ** i / math.factorial(2 * i + 1) for i in range(deg // 2)], dtype)
    q = tirx.bitwise_and(tirx.Cast(idt, j) + tirx.Cast(idt, quadrants), tirx.const(3, idt))
    return tirx.Select(q == tirx.const(0, idt), c,
                       tirx.Select(q == tirx.const(1, idt), -s,
                                   tirx.Select(q == tirx.const(2, idt), -c, s)))


# below this, exp(x) is under the smallest normal number: a softmax weight of 0
_EXP_MIN = {"float32": -87.3, "float64": -708.3}


def softmax_exp(x):
    """exp(x) for x ≤ 0 (a score minus its row max or log-sum-exp): exp without the overflow
    branch and the subnormal range (which a softmax weight next to 1 cannot resolve anyway)."""
    dtype = str(x.ty)
    idt, _, _, _, _, deg, _ = _FLOAT[dtype]
    n = tirx.floor(x * _c(1.4426950408889634, dtype) + _c(0.5, dtype))
    ln2_hi, ln2_lo = _LN2[dtype]
    r = x - n * _c(ln2_hi, dtype) - n * _c(ln2_lo, dtype)
    p = _horner(r, [1 / math.factorial(i) for i in range(deg + 1)], dtype)
    val = p * _pow2(tirx.Cast(idt, n), dtype)
    return tirx.Select(x < _c(_EXP_MIN[dtype], dtype), _c(0.0, dtype), val)

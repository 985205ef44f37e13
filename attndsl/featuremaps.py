"""Kernel feature maps φ, registered by name: output width, random projection, torch definition.

κ(q, k) = φ(√s·q)·φ(√s·k). The torch definitions here are the reference's; the TVM kernels of
the same maps live in `attndsl.lowering.featuremap`, registered under the same names.
Shapes: x (..., N, Dk) -> φ(x) (..., N, M).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .ast import Choice
from .expr import BUILTIN_MAPS, evaluate


@dataclass(frozen=True)
class FeatureMap:
    name: str
    width: Callable[[Choice, int], int]                                  # (params, Dk) -> M
    projection: Callable[[Choice, int], torch.Tensor | None]             # (params, Dk) -> W' (M, Dk)
    apply: Callable[[Choice, torch.Tensor, torch.Tensor | None, str], torch.Tensor]  # φ(x), role q|k
    elementwise: bool = False        # φ(x)_d = f(x_d), same for q and k: fusable into its consumer


FEATURE_MAPS: dict[str, FeatureMap] = {}


def register(name, width, projection=lambda c, dk: None, elementwise=False):
    def deco(apply):
        FEATURE_MAPS[name] = FeatureMap(name, width, projection, apply, elementwise)
        return apply
    return deco


def random_projection(m: int, dk: int, seed: int, orthogonal: bool) -> torch.Tensor:
    """W (m, Dk) with N(0, 1) rows; orthogonal: blocks of Dk orthonormal rows rescaled to
    chi-distributed norms, so each row is still marginally Gaussian (Performer, §4.2)."""
    g = torch.Generator().manual_seed(int(seed))
    if not orthogonal:
        return torch.randn(m, dk, generator=g, dtype=torch.float64)
    blocks = []
    for _ in range(math.ceil(m / dk)):
        qr, _ = torch.linalg.qr(torch.randn(dk, dk, generator=g, dtype=torch.float64))
        blocks.append(qr.T)
    norms = torch.randn(m, dk, generator=g, dtype=torch.float64).norm(dim=1, keepdim=True)
    return torch.cat(blocks)[:m] * norms


def stabilizer(raw: torch.Tensor, role: str) -> torch.Tensor:
    """The max subtracted before exp: per row for queries, per (batch, head) for keys.
    Either is a constant factor of one row's (or every row's) kernel values, so it cancels. The max
    is over the finite entries: a NaN key stays in its own column (docs/numerics.md), not in every row."""
    dims = (-1,) if role == "q" else (-2, -1)
    raw = raw.detach()
    return raw.masked_fill(~torch.isfinite(raw), float("-inf")).amax(dim=dims, keepdim=True).clamp_min(
        torch.finfo(raw.dtype).min)


def _dk(c: Choice, dk: int) -> int:
    return dk


def _m(c: Choice, dk: int) -> int:
    return int(c["features"])


def _2m(c: Choice, dk: int) -> int:
    return 2 * int(c["features"])


for _name, _expr in BUILTIN_MAPS.items():
    register(_name, _dk, elementwise=True)(lambda c, x, w, role, _e=_expr: evaluate(_e, x))


@register("user", _dk, elementwise=True)
def _user(c: Choice, x, w, role):
    return evaluate(c.expr, x)                                           # φ(x) = EXPR elementwise


@register("exp_shift", _dk)
def _exp_shift(c: Choice, x, w, role):
    return torch.exp(x - stabilizer(x, role))                            # φ(x) = exp(x − shift)


@register("favor", _m, lambda c, dk: random_projection(_m(c, dk), dk, c["seed"], c["orthogonal"]))
def _favor(c: Choice, x, w, role):
    # φ(x) = exp(Wx − |x|²/2 − stab) / √m: positive random features for exp(q·k)
    raw = x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)
    if c["stabilize"]:
        raw = raw - stabilizer(raw, role)
    return torch.exp(raw) / math.sqrt(w.shape[0])


def _hyperbolic_projection(c: Choice, dk: int) -> torch.Tensor:
    w = random_projection(_m(c, dk), dk, c["seed"], True)
    return torch.cat([w, -w])                                            # W' = [W; −W]


@register("hyperbolic", _2m, _hyperbolic_projection)
def _hyperbolic(c: Choice, x, w, role):
    # φ(x) = [exp(Wx − |x|²/2), exp(−Wx − |x|²/2)] / √(2m) − stab: lower-variance FAVOR+
    m = w.shape[0] // 2
    u = x @ w[:m].T
    h = 0.5 * (x * x).sum(-1, keepdim=True)
    raw = torch.cat([u - h, -u - h], dim=-1)
    return torch.exp(raw - stabilizer(raw, role)) / math.sqrt(2 * m)


def _trig_projection(c: Choice, dk: int) -> torch.Tensor:
    w = random_projection(_m(c, dk), dk, c["seed"], False) / float(c["sigma"])
    return torch.cat([w, w])                                             # W' = [W; W]/σ


@register("trig", _2m, _trig_projection)
def _trig(c: Choice, x, w, role):
    # φ(x) = [cos(Wx/σ), sin(Wx/σ)] / √m: random Fourier features of exp(−|q−k|²/(2σ²))
    m = w.shape[0] // 2
    u = x @ w[:m].T
    return torch.cat([torch.cos(u), torch.sin(u)], dim=-1) / math.sqrt(m)


def lookup(kernel: Choice) -> FeatureMap:
    return FEATURE_MAPS[kernel.name]

"""AST -> IR: the spec's meaning (docs/language.md) written down literally as quadratic nodes.

    out = Normalize(Masked?(Biased?(κ, b)), v) [+ ToeplitzValues(b, v)]  [Sample(...)]
    κ   = ExpDot(q, k, s)                      softmax
        | Dot(φ(√s·q), φ(√s·k))                a feature map

A sliding window is the relative-position weight exp(b(r)) set to 0 beyond ±W: b is the spec's
position term (or 0) inside the window. A position(r) = EXPR that reads `param`s is tabulated:
the module evaluates it per call, and the forms read it as a learned table.
"""
from __future__ import annotations

import math

from ..ast import AttentionSpec, tabulated, windowed
from ..featuremaps import lookup
from ..ir import (Add, Biased, Dot, ExpDot, FeatureMap, Input, Masked, Node, Normalize, Position,
                  Sample, Scale, ToeplitzValues)
from ..reference import effective_scale


def lower(spec: AttentionSpec, head_dim: int, value_dim: int) -> Node:
    s = effective_scale(spec, head_dim)
    q, k, v = Input("q", head_dim), Input("k", head_dim), Input("v", value_dim)
    kspan = spec.span_of("kernel")
    if spec.kernel.name == "softmax":
        scores: Node = ExpDot(q, k, s, span=kspan)
    else:
        width = lookup(spec.kernel).width(spec.kernel, head_dim)
        c = math.sqrt(s)
        scores = Dot(FeatureMap(Scale(q, c), spec.kernel, "q", width, span=kspan),
                     FeatureMap(Scale(k, c), spec.kernel, "k", width, span=kspan), span=kspan)

    bias = None
    if spec.window is not None:             # a sliding window: weights 0 beyond ±W (ast.windowed)
        bias = Position(windowed(spec.position, spec.window), span=spec.span_of("mask"))
        scores = Biased(scores, bias, span=spec.span_of("mask"))
    elif spec.position.name != "none":
        position = tabulated(spec.position) if spec.learned_position else spec.position
        bias = Position(position, span=spec.span_of("position"))
        if spec.apply.name == "scores":
            scores = Biased(scores, bias, span=spec.span_of("position"))
    if spec.causal:
        scores = Masked(scores, span=spec.span_of("mask"))
    out: Node = Normalize(scores, v, spec.floor or None, span=kspan)
    if spec.sampling.name != "none":
        out = Sample(out, spec.sampling, span=spec.span_of("sampling"))
    if bias is not None and spec.apply.name == "values":
        out = Add(out, ToeplitzValues(bias, v, spec.causal, span=spec.span_of("apply")))
    return out

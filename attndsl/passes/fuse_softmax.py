"""Softmax attention stays quadratic, but fused: the N×N scores are never materialized.

    Normalize(M? ⊙ exp(b) ⊙ exp(s·q·kᵀ), v)
      = softmax(s·q·kᵀ + b, masked) v
      -> SoftmaxAttention(q, k, v, b, causal, s)

computed tile by tile with a running max and normalizer (lowering/cpu/quadratic.py), b(i − j)
evaluated on the fly from the position parameters. A sampled estimate of it becomes its own form:

    Sample(SoftmaxAttention(q, k, v, none, causal, s), sampling) -> SampledAttention(...)
"""
from __future__ import annotations

from ..ir import Biased, ExpDot, Masked, Normalize, Sample, SampledAttention, SoftmaxAttention


def normalize_of_exp_dot(n):
    # Normalize(M? ⊙ exp(b)? ⊙ exp(s·q·kᵀ), v)  ->  SoftmaxAttention(q, k, v, b | None, causal, s)
    if not isinstance(n, Normalize):
        return None
    s, causal, bias = n.scores, False, None
    if isinstance(s, Masked):
        s, causal = s.scores, True
    if isinstance(s, Biased):
        s, bias = s.scores, s.bias
    if isinstance(s, ExpDot):
        return SoftmaxAttention(s.q, s.k, n.v, bias, causal, s.scale, span=n.span)
    return None


def sample_of_softmax(n):
    # Sample(SoftmaxAttention(q, k, v, none, causal, s), sampling) -> SampledAttention (check.py
    # refuses a position term with sampling)
    if isinstance(n, Sample) and isinstance(n.x, SoftmaxAttention) and n.x.bias is None:
        x = n.x
        return SampledAttention(x.q, x.k, x.v, x.causal, x.scale, n.sampling, span=n.span)
    return None


RULES = [("normalize_of_exp_dot", normalize_of_exp_dot), ("sample_of_softmax", sample_of_softmax)]

"""Quadratic -> linear: the associativity that makes feature-map attention O(N).

    Σ_j (φq_i·φk_j) M_ij v_j / (Σ_j (φq_i·φk_j) M_ij + eps)
      = φq_i·(Σ_j M_ij φk_j v_jᵀ) / (φq_i·(Σ_j M_ij φk_j) + eps)

and, with a relative-position weight c(i − j) = exp(b(i − j)) inside (Luo et al.), the same sums
with c in them: a Toeplitz product per feature-value channel (PositionalAttention).
"""
from __future__ import annotations

from ..ir import Biased, Dot, LinearAttention, Masked, Normalize, PositionalAttention


def normalize_of_dot(n):
    # Normalize(φq·φkᵀ, v)  ->  LinearAttention(φq, φk, v)
    if isinstance(n, Normalize) and isinstance(n.scores, Dot):
        return LinearAttention(n.scores.qf, n.scores.kf, n.v, causal=False, eps=n.eps, span=n.span)
    return None


def normalize_of_masked_dot(n):
    # Normalize(M ⊙ φq·φkᵀ, v)  ->  LinearAttention(φq, φk, v, causal)
    if isinstance(n, Normalize) and isinstance(n.scores, Masked) and isinstance(n.scores.scores, Dot):
        d = n.scores.scores
        return LinearAttention(d.qf, d.kf, n.v, causal=True, eps=n.eps, span=n.span)
    return None


def normalize_of_biased_dot(n):
    # Normalize(M? ⊙ exp(b) ⊙ φq·φkᵀ, v)  ->  PositionalAttention(φq, φk, v, b, causal)
    if not isinstance(n, Normalize):
        return None
    s, causal = n.scores, False
    if isinstance(s, Masked):
        s, causal = s.scores, True
    if isinstance(s, Biased) and isinstance(s.scores, Dot):
        return PositionalAttention(s.scores.qf, s.scores.kf, n.v, s.bias, causal, eps=n.eps, span=n.span)
    return None


RULES = [("normalize_of_biased_dot", normalize_of_biased_dot),
         ("normalize_of_dot", normalize_of_dot),
         ("normalize_of_masked_dot", normalize_of_masked_dot)]

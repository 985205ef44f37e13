"""Quadratic -> linear: the associativity that makes feature-map attention O(N).

    Σ_j (φq_i·φk_j) M_ij v_j / Σ_j (φq_i·φk_j) M_ij
      = φq_i·(Σ_j M_ij φk_j v_jᵀ) / φq_i·(Σ_j M_ij φk_j)
"""
from __future__ import annotations

from ..ir import Dot, LinearAttention, Masked, Normalize


def normalize_of_dot(n):
    # Normalize(φq·φkᵀ, v)  ->  LinearAttention(φq, φk, v)
    if isinstance(n, Normalize) and isinstance(n.scores, Dot):
        return LinearAttention(n.scores.qf, n.scores.kf, n.v, causal=False, span=n.span)
    return None


def normalize_of_masked_dot(n):
    # Normalize(M ⊙ φq·φkᵀ, v)  ->  LinearAttention(φq, φk, v, causal)
    if isinstance(n, Normalize) and isinstance(n.scores, Masked) and isinstance(n.scores.scores, Dot):
        d = n.scores.scores
        return LinearAttention(d.qf, d.kf, n.v, causal=True, span=n.span)
    return None


RULES = [("normalize_of_dot", normalize_of_dot),
         ("normalize_of_masked_dot", normalize_of_masked_dot)]

"""The cost model: pick the cheapest valid form for every form site, or the one `plan=` forces.

A form is registered with its node type, when it is valid, and its cost in flops per batch·head
for a sequence of N.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

from ..diagnostics import SpecError
from ..ir import (LinearAttention, Node, PositionalAttention, SampledAttention, SoftmaxAttention,
                  ToeplitzValues, postorder)
from ..rewrite import rewrite
from ..schedules.knobs import defaults
from .geometric import decay_rates

PLAN_LENGTH = 4096                               # the sequence length the plan is costed at
BANDED_CHUNK = defaults("banded")["chunk"]       # the banded kernels' default chunk (their window tiles)


@dataclass(frozen=True)
class Form:
    name: str
    node: type
    valid: Callable[[Node], bool]
    cost: Callable[[Node, int], float]       # (node, N) -> flops per batch·head
    summary: str


def _linear_cost(n: LinearAttention, N: int) -> float:
    m, d = n.qf.shape[-1], n.v.shape[-1]
    return 4.0 * N * m * (d + 1)                 # S = Σ φk⊗[v,1] and φq·S, two M×(D+1) products a row


def fft_length(n: int) -> int:
    """The FFT length of a linear Toeplitz product over n positions: a power of two ≥ 2n − 1."""
    length = 16
    while length < 2 * n - 1:
        length *= 2
    return length


def _fft_cost(channels: int, N: int) -> float:
    """One real FFT, spectral product and inverse per channel: 2 × 2.5·L·log2 L + 3·L."""
    L = fft_length(N)
    return channels * (5.0 * L * math.log2(L) + 3.0 * L)


def _toeplitz_fft_cost(n: PositionalAttention, N: int) -> float:
    m, d = n.qf.shape[-1], n.v.shape[-1]
    return _fft_cost(m * (d + 1), N) + 4.0 * N * m * (d + 1)   # + the products with φk and φq


def _banded_cost(n: PositionalAttention, N: int) -> float:
    """Window tiles (keys within ±(W + C) of a query chunk, C the banded chunk knob's default) with
    exact weights, plus the constant weights beyond the clip through chunk prefix sums (one
    M×(D+1) product a row)."""
    m, d = n.qf.shape[-1], n.v.shape[-1]
    w = int(n.bias.position["max_distance"])
    window = min(N, (1 if n.causal else 2) * w + BANDED_CHUNK)
    return 2.0 * N * window * (m + d + 1) + 4.0 * N * m * (d + 1)


def _decayed_cost(n: PositionalAttention, N: int) -> float:
    """The prefix-sum recurrence plus the decay weights; twice that with a second, backward-in-time
    pass for the later keys (non-causal)."""
    return (1 if n.causal else 2) * 1.1 * _linear_cost(n, N)


def _values_fft_cost(n: ToeplitzValues, N: int) -> float:
    return _fft_cost(n.v.shape[-1], N)


EXP_FLOPS = 20.0      # a vectorized exp (range reduction + polynomial), in flops


def _softmax_cost(n: SoftmaxAttention, N: int) -> float:
    """Scores and weighted values, 2·N²·(Dk + Dv), plus an exp per score; half when causal."""
    pairs = N * N / 2 if n.causal else N * N
    return pairs * (2.0 * (n.q.shape[-1] + n.v.shape[-1]) + EXP_FLOPS)


def _sampled_cost(n: SampledAttention, N: int) -> float:
    """Each query scores its block's keys and the samples (2·(Dk + Dv) + an exp each); the LSH
    hash (kde) is r sign tests of Dk each per row of q and k."""
    per_query = min(N, n.sampling["block"] + n.sampling["samples"] if n.sampling.name == "kde"
                    else 1 + n.sampling["samples"])
    lsh = 4.0 * N * n.q.shape[-1] * math.log2(n.sampling["buckets"]) if n.sampling.name == "kde" else 0.0
    return N * per_query * (2.0 * (n.q.shape[-1] + n.v.shape[-1]) + EXP_FLOPS) + lsh


FORMS: list[Form] = [
    Form("linear", LinearAttention, lambda n: not n.causal, _linear_cost,
         "S = Σ_j φk_j⊗[v_j, 1] once, then out_i = φq_i·S (two GEMMs)"),
    Form("prefix_sum", LinearAttention, lambda n: n.causal, _linear_cost,
         "running state S_i = S_{i−1} + φk_i⊗[v_i, 1], out_i = φq_i·S_i (one pass)"),
    Form("toeplitz_fft", PositionalAttention, lambda n: True, _toeplitz_fft_cost,
         "per channel (m, d): Σ_j c(i−j) φk_jm [v_j, 1]_d by FFT (Luo et al.), contracted with φq_i"),
    Form("banded", PositionalAttention, lambda n: n.bias.position.name == "toeplitz", _banded_cost,
         "c(r) constant beyond the clip ±W: chunk prefix sums for the far keys, exact C×C tiles "
         "for the ±W band"),
    Form("decayed", PositionalAttention,
         lambda n: decay_rates(n.bias.position, n.causal) is not None,
         _decayed_cost,
         "exp(b(r)) = γ^|r|: a running state that decays by γ per token, S_i = γ S_{i−1} + φk_i⊗[v_i, 1] "
         "(and, without a causal mask, a second one backward in time over the later keys)"),
    Form("values_fft", ToeplitzValues, lambda n: True, _values_fft_cost,
         "Σ_j b(i−j) v_j by FFT per value channel (FastRPB)"),
    Form("quadratic", SoftmaxAttention, lambda n: True, _softmax_cost,
         "flash-style tiles: scores in L1, running max and normalizer, b(i−j) on the fly"),
    Form("kde", SampledAttention, lambda n: n.sampling.name == "kde", _sampled_cost,
         "KDEformer: LSH-sorted blocks exact, the rest by keys sampled ∝ |v|² + uniform, weighted 1/(p·s)"),
    Form("uniform", SampledAttention, lambda n: n.sampling.name == "uniform", _sampled_cost,
         "each query's own key exact, the rest by uniformly sampled keys weighted N/s"),
]


def quadratic_cost(n: Node, N: int) -> float:
    """What the O(N²) reference costs: N² kernel values, each a dot product, and N² weighted value rows."""
    if isinstance(n, ToeplitzValues):
        return 2.0 * N * N * n.v.shape[-1]
    if isinstance(n, (SoftmaxAttention, SampledAttention)):
        return _softmax_cost(n, N)
    m, d = n.qf.shape[-1], n.v.shape[-1]
    return 2.0 * N * N * (m + d + 1)


@dataclass(frozen=True)
class Decision:
    site: Node
    form: str
    costs: tuple[tuple[str, float], ...]      # every valid form with its estimated cost


def candidates(n: Node) -> list[Form]:
    return [f for f in FORMS if isinstance(n, f.node) and f.valid(n)]


def choose(root: Node, plan: str = "auto", n: int = PLAN_LENGTH,
           forms: frozenset | None = None) -> tuple[Node, list[Decision]]:
    """Set `form` on every site; returns the new tree and the choices made (for explain()).
    `forms`: the forms the target has kernels for (None: all); a site none of whose valid forms
    is among them keeps every candidate, so that lowering names what is missing."""
    known = sorted({f.name for f in FORMS})
    if plan != "auto" and plan not in known:
        from ..diagnostics import did_you_mean
        raise SpecError(f"unknown plan {plan!r}", help=did_you_mean(plan, ["auto", *known], "plans"))
    choices: list[Decision] = []

    def rule(node):
        if not hasattr(node, "form") or node.form is not None:
            return None
        valid = candidates(node)
        usable = [f for f in valid if forms is None or f.name in forms] or valid
        if plan != "auto":
            forced = [f for f in valid if f.name == plan]
            if not forced:
                raise SpecError(f"plan {plan!r} does not apply to this spec", node.span,
                                help=f"forms valid here: {', '.join(f.name for f in valid) or 'none'}")
            usable = forced
        best = min(usable, key=lambda f: f.cost(node, n))
        choices.append(Decision(node, best.name, tuple((f.name, f.cost(node, n)) for f in usable)))
        return replace(node, form=best.name)

    out = rewrite(root, [("choose_form", rule)])
    return out, choices


def unplanned(root: Node) -> list[Node]:
    return [x for x in postorder(root) if hasattr(x, "form") and x.form is None]

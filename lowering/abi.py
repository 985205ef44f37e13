"""The kernel ABI: each op's tensors, outputs, gradients and scalars, in the order its kernels take them.

Every op's forward and backward kernels follow one calling convention (tensors (BH, N, width),
contiguous; the position parameters TAB (H, P)):

    forward   fwd(*inputs it reads, *outputs, *scalars)
    backward  bwd(*inputs, *saved outputs, d(value), *gradients, *scalars)

The value is the first output; the others (a normalizer DEN, a log-sum-exp LSE) are internal:
saved for the backward kernel, never differentiated. An op with a normalizer DEN also takes
`empty` (BH, N) bool, which no kernel reads: the rows a key padding mask leaves with no key
(attndsl/padding.py), whose out and DEN ops.py sets to 0 and 1 (a (0, 0) tensor: none). attndsl/ops.py generates the torch custom
ops (forward, fake, backward, autograd) from these records; the tuner specializes the scalars
from them (tune.concrete). Each form's record (form.Form.op) names the op it runs through.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .costs import fft_length

# a shape rule: (the op's tensors and attributes by name) -> a new tensor
Alloc = Callable[[dict], object]


def like(x: str, zeros: bool = False) -> Alloc:
    """A tensor shaped like input `x` (zero-filled where the kernel accumulates into it)."""
    return (lambda t: t[x].new_zeros(t[x].shape)) if zeros else (lambda t: t[x].new_empty(t[x].shape))


def rows(x: str) -> Alloc:
    """(BH, N) of `x`: a value per row."""
    return lambda t: t[x].new_empty(t[x].shape[0], t[x].shape[1])


def rows_of(x: str, width: str) -> Alloc:
    """(BH, N, W): the rows of `x`, the width of `width` (an output per query row of q, a value
    row wide, when q and v may differ in length: cross-attention)."""
    return lambda t: t[x].new_empty(t[x].shape[0], t[x].shape[1], t[width].shape[2])


@dataclass(frozen=True)
class Scalar:
    """A trailing int64 kernel argument: its value from the sequence length n and the op's
    attributes (or, tuning, the tuner's sizes)."""
    name: str
    value: Callable[[int, dict], int]


@dataclass(frozen=True)
class Op:
    """name: attndsl::<name>; inputs: its tensors; attrs: its int attributes, after (lib, node);
    outputs: (name, shape rule), the value first; grads: (name, shape rule) of the backward
    kernel's output buffers: an input's name for its gradient (the inputs not named get None),
    another name for scratch that `fold` (tensors by name, gradients as "d" + input) folds into
    the gradients (in place, or returning {"d" + input: its gradient} to replace them); reads: the
    inputs the forward kernel takes (default all); saves: whether the backward kernel reads the
    outputs."""
    name: str
    doc: str
    inputs: tuple[str, ...]
    outputs: tuple[tuple[str, Alloc], ...]
    grads: tuple[tuple[str, Alloc], ...]
    attrs: tuple[str, ...] = ()
    scalars: tuple[Scalar, ...] = ()
    reads: tuple[str, ...] | None = None
    saves: bool = True
    fold: Callable[[dict], None] | None = None

    @property
    def empty(self) -> bool:
        return self.inputs[-1] == "empty"

    @property
    def kernel_inputs(self) -> tuple[str, ...]:
        """The inputs the backward kernel takes (all but `empty`)."""
        return self.inputs[:-1] if self.empty else self.inputs


FFT_LENGTH = Scalar("Lf", lambda n, attrs: fft_length(n))


def _fold_samples(t: dict) -> None:
    """Sampled rows repeat: add each sample's dk (dks (BH, S, Dk)) into its key's row."""
    import torch
    si, k = t["si"], t["k"]
    rows_ = (si.long() + k.shape[1] * torch.arange(si.shape[0], device=si.device)[:, None]).reshape(-1)
    t["dk"].view(-1, k.shape[2]).index_add_(0, rows_, t["dks"].view(-1, k.shape[2]))


def _fold_params(t: dict) -> None:
    """A map's params: each batch·head row's share (part (BH, P)) summed per head into dprm (H, P)."""
    t["dprm"].copy_(t["part"].view(-1, *t["prm"].shape).sum(0))


def per_query_row(x: str, q: str) -> Alloc:
    """(BH of q, the rest of x's shape): a gradient of k-like `x` (BHK, Nk, width) written per
    query row; with grouped heads (BHK = BH / G) fold_groups sums it per key row."""
    return lambda t: t[x].new_empty(t[q].shape[0], *t[x].shape[1:])


def fold_groups(q: str, k: str, v: str) -> Callable[[dict], dict | None]:
    """Grouped heads: the G query rows (of `q`) of a key row each wrote their share of the
    gradients of `k` and `v` (BH, Nk, ·); their sums (BHK, Nk, ·) are the gradients. None when
    every query row has its own keys."""
    def fold(t: dict) -> dict | None:
        bhk, bh = t[k].shape[0], t[q].shape[0]
        if bhk == bh:
            return None
        return {"d" + x: t["d" + x].view(bhk, bh // bhk, *t["d" + x].shape[1:]).sum(1) for x in (k, v)}
    return fold


def _per_sample(x: str) -> Alloc:
    """(BH, S, width of x): a row per sampled key."""
    return lambda t: t[x].new_empty(t["si"].shape[0], t["si"].shape[1], t[x].shape[2])


_POSITIONAL = dict(inputs=("qf", "kf", "v", "tab", "empty"), reads=("qf", "kf", "v", "tab"),
                   outputs=(("out", rows_of("qf", "v")), ("den", rows("qf"))),
                   grads=(("qf", like("qf")), ("kf", like("kf")), ("v", like("v")),
                          ("tab", like("tab", zeros=True))))

OPS: dict[str, Op] = {op.name: op for op in [
    Op("feature_map", "φ(x): x (BH, N, Dk), w = W' (width, Dk), wt = W'ᵀ -> (BH, N, width).",
       inputs=("x", "w", "wt"), attrs=("width",), reads=("x", "wt"),
       outputs=(("f", lambda t: t["x"].new_empty(t["x"].shape[0], t["x"].shape[1], t["width"])),),
       grads=(("x", like("x")),)),
    Op("param_map", "φ(x; p) of a kernel map reading params: x (BH, N, Dk), prm (H, P) the params' values "
       "per head (row bh reads head bh mod H) -> (BH, N, Dk); the backward writes each row's share of the "
       "params' gradient, part (BH, P), which is folded into dprm.",
       inputs=("x", "prm"), outputs=(("f", like("x")),), saves=False, fold=_fold_params,
       grads=(("x", like("x")), ("prm", like("prm", zeros=True)),
              ("part", lambda t: t["x"].new_empty(t["x"].shape[0], t["prm"].shape[1])))),
    Op("linear_attention",
       "(out (BH, N, Dv), den (BH, N)) = φq_i·Σ_{j∈M(i)} φk_j v_jᵀ / φq_i·Σ_{j∈M(i)} φk_j (+ eps) from "
       "φq, φk (BH, N, M), v; tab (H, 2): the decayed form's per-head rates (a_earlier, a_later), "
       "weighting a pair by e^(−a·|i−j|) (a (1, 1) dummy otherwise; never differentiated).",
       inputs=_POSITIONAL["inputs"], reads=_POSITIONAL["reads"], outputs=_POSITIONAL["outputs"],
       grads=_POSITIONAL["grads"][:3]),
    Op("toeplitz_attention",
       "(out, den) of Σ_j c(i−j)(φq_i·φk_j) v_j / Σ_j c(i−j)(φq_i·φk_j), c = exp(b), b from the "
       "position parameters tab (H, P), by FFT of length Lf ≥ 2N − 1.",
       scalars=(FFT_LENGTH,), **_POSITIONAL),
    Op("banded_attention", "toeplitz_attention's (out, den) for a table clipped at ±W: the band exactly, "
       "the far keys by chunk prefix sums.", **_POSITIONAL),
    Op("pairwise_attention", "toeplitz_attention's (out, den) pair by pair, exactly, in O(N²) tiles; "
       "den in each row's units (shifted by the row's largest b); tab a (1, 1) dummy without a position term. "
       "kf and v may have BHK = BH / G rows (grouped heads): query row bh reads key row bh // G.",
       inputs=_POSITIONAL["inputs"], reads=_POSITIONAL["reads"], outputs=_POSITIONAL["outputs"],
       grads=(("qf", like("qf")), ("kf", per_query_row("kf", "qf")), ("v", per_query_row("v", "qf")),
              ("tab", like("tab", zeros=True))), fold=fold_groups("qf", "kf", "v")),
    Op("toeplitz_values", "Σ_j b(i−j) v_j (BH, N, Dv) (FastRPB), b from tab (H, P), by FFT.",
       inputs=("v", "tab"), outputs=(("y", like("v")),), grads=(("v", like("v")), ("tab", like("tab", zeros=True))),
       scalars=(FFT_LENGTH,), saves=False),
    Op("softmax_attention",
       "(out (BH, N, Dv), lse (BH, N)): softmax(s·q·kᵀ + b + kb) v, flash-style, b(i − j) from tab (H, P) "
       "(a (1, 1) dummy without a position term), kb (BHK, Nk) a bias per key (padding.KEY_OUT at a "
       "padded key, else 0); lse is the row log-sum-exp the backward recomputes the weights from. k, v "
       "and kb may have BHK = BH / G rows (grouped heads): query row bh reads key row bh // G.",
       inputs=("q", "k", "v", "tab", "kb"), outputs=(("out", rows_of("q", "v")), ("lse", rows("q"))),
       grads=(("q", like("q")), ("k", per_query_row("k", "q")), ("v", per_query_row("v", "q")),
              ("tab", like("tab", zeros=True))), fold=fold_groups("q", "k", "v")),
    Op("sampled_attention",
       "(out, lse) of the sampled estimate of softmax attention: rows visited in the order pq "
       "(queries), pk (keys) (BH, N) int32 and cut into blocks of `block`; each query sees its "
       "block's keys exactly and the samples: key rows si (BH, S) int32 of k with values vs "
       "(BH, S, Dv) and log-weights lw (BH, S), unless its block holds them (sb (BH, S) int32, "
       "the sample's block); kb (BH, N) as softmax_attention's, added to the block's keys' scores.",
       inputs=("q", "k", "v", "pq", "pk", "si", "lw", "sb", "vs", "kb"), attrs=("block",),
       outputs=(("out", like("v")), ("lse", rows("v"))),
       grads=(("q", like("q")), ("k", like("k")), ("v", like("v")), ("dks", _per_sample("k")),
              ("vs", like("vs")), ("lw", like("lw"))), fold=_fold_samples,
       scalars=(Scalar("blk", lambda n, attrs: attrs.get("block", 1)),)),
]}


def scalar_values(op: Op, n: int, attrs: dict) -> list[int]:
    """The trailing scalars of `op`'s kernels at length n."""
    return [s.value(n, attrs) for s in op.scalars]

"""The `Form` record: all that is known about one form of an attention site, in one place.

A form is one way to compute an IR site (LinearAttention, PositionalAttention, ToeplitzValues,
SoftmaxAttention, SampledAttention): when it is valid, what it costs, the kernels that lower it
(CPU and portable), their knob families (schedules/knobs.py), and how the module runs them. Each
module of lowering/forms/ defines the records of its forms; registry.py collects them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from attndsl.ast import learned_table
from attndsl.ir import Node


@dataclass(frozen=True)
class Form:
    """name: what plan= and explain() call it; node: the IR site type (or a tuple of them);
    valid(node); cost(node, N):
    flops per batch·head at length N; summary: what it computes;
    cpu(node, (fwd name, bwd name), dtype, knobs {kernel: {knob: value}}) -> {name: PrimFunc},
    portable(the same, gpu) -> the portable kernels (None: none);
    run(node, children's values, library key, kernel name, module params) -> the site's value
    (params["pad"]: the call's key padding mask, attndsl/padding.py, or None);
    op: the kernel ABI op (abi.py) its kernels implement and `run` calls;
    cpu_knobs, portable_knobs: the kernels' knob families (None: not tunable);
    fft_scores: whether precision.py's FFT condition check guards it;
    probe: a spec body whose one site this form computes, which `attndsl calibrate` times
    (attndsl/calibration.py; None: not calibrated, e.g. a form with no rival on its site);
    decode(node, name, dtype) -> the PrimFunc of one decoding step (cpu/decode.py), for the causal
    forms that carry a running state (None: not decodable token by token);
    cross: whether its CPU kernels take keys of another length than the queries (q (BH, N, ·),
    k and v (BH, Nk, ·)), so that cross-attention runs without padding to max(N, Nk);
    narrow: whether `cpu` also builds narrow kernels in the NARROW_DTYPES (its keyword
    narrow=True: a tile of one vector of query lanes, named kernel_names(i, node, narrow=True)),
    which `run` takes for a call of at most params["narrow"] query rows (narrowed());
    grouped: whether its CPU kernels read k and v of fewer rows than q (BHK = BH / G: query row
    bh reads key row bh // G), so that grouped-query attention runs without copying k and v."""
    name: str
    node: type | tuple[type, ...]
    valid: Callable[[Node], bool]
    cost: Callable[[Node, int], float]
    summary: str
    cpu: Callable | None
    portable: Callable | None
    run: Callable
    op: str
    cpu_knobs: str | None = None
    portable_knobs: str | None = None
    fft_scores: bool = False
    probe: str | None = None
    decode: Callable | None = None
    cross: bool = False
    narrow: bool = False
    grouped: bool = False

    def sites(self) -> tuple[type, ...]:
        """The IR node types this form computes."""
        return self.node if isinstance(self.node, tuple) else (self.node,)


NARROW = "_narrow"          # the narrow kernels' names: the node's, then this
# the dtypes with narrow kernels: the working dtype (float16 and bfloat16 compute in it); float64,
# the precision fallback and the gradchecks' dtype, runs the wide tile at any length
NARROW_DTYPES = ("float32",)


def narrowed(name: str, q, params: dict) -> str:
    """The kernels a call of queries q (BH, N, ·) runs: the narrow ones (Form.narrow) when N is at
    most params["narrow"] (one vector of lanes on CPU targets, 0 elsewhere), else `name`'s."""
    return name + NARROW if q.shape[1] <= params["narrow"] else name


def learns(position) -> bool:
    """Whether the position term has trainable parameters (a toeplitz table)."""
    return learned_table(position)


def knob(knobs: dict, names, family: str, name: str) -> list[int]:
    """The value of knob `name` (schedules/knobs.py `family`) for each kernel of `names`."""
    from attndsl.schedules.knobs import resolve
    return [resolve(family, knobs.get(n))[name] for n in names]


def keys_out(kf, params: dict, fill: float = 0.0, tag: str = "kf"):
    """(kf with the call's padded keys set to `fill`, the op's `empty` rows) under a key padding
    mask (attndsl/padding.py; params["pad"]), else (kf, a (0, 0) tensor). `tag` names the
    scratch buffer a call without autograd fills. kf may have a row per kv head of grouped heads
    (Form.grouped), whose keys are those of its query rows."""
    from attndsl.padding import no_rows
    pad = params["pad"]
    if pad is None:
        return kf, no_rows(kf.device)
    return pad.drop(kf, fill, tag), pad.empty


def key_bias(like, params: dict):
    """The softmax kernels' kb (BHK, Nk) for k-like `like` (BHK, Nk, ·): padding.KEY_OUT at the
    call's padded keys, else 0. With grouped heads (BHK = BH / G) a key row's mask is that of its
    query rows (one mask per batch element)."""
    pad = params["pad"]
    return like.new_zeros(like.shape[:2]) if pad is None else pad.key_bias(like.dtype, like.shape[0])


def rows_seen(out, params: dict):
    """A softmax form's out with the rows that see no kept key (a key padding mask's) set to 0."""
    return out if params["pad"] is None else params["pad"].zero_empty(out)


def watched(out_den, params: dict):
    """out of a kernel's (out, DEN, ...): DEN's minimum per row (BH,) noted in params["dens"] when
    the module watches the normalizers (precision.py)."""
    out, den = out_den[:2]
    if params["dens"] is not None:
        params["dens"].append(den.amin(-1) if den.numel() else den.new_ones(den.shape[0]))
    return out

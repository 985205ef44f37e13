"""IR -> TVM TIR: the only place TVM kernels are written.

`lower(root, dtype)` walks a planned IR and asks the registry (`FORMS`, one record per form, and
`NODE_KERNELS` for the nodes that are not form sites) for the kernels of each node: every node
gets a forward and a backward prim_func named `<op><index>_fwd|_bwd`.
A node with no lowering raises `NotLowered`, which the front end reports against the spec.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from attndsl.passes.geometric import decayed_floor
from attndsl.schedules.knobs import resolve
from attndsl.ir import (Add, FeatureMap, Input, LinearAttention, Node, Position, PositionalAttention,
                        SampledAttention, SoftmaxAttention, ToeplitzValues, postorder)



class NotLowered(Exception):
    """Nodes of the planned IR for which no TVM kernel exists (yet), in post-order."""

    def __init__(self, nodes: list[Node]):
        self.nodes = nodes
        super().__init__(", ".join(n.op for n in nodes))


def kernel_names(index: int, node: Node) -> tuple[str, str]:
    base = f"{node.op}{index}"
    return f"{base}_fwd", f"{base}_bwd"


# featuremap and linear import the TVM compiler: only lower() needs them, not check() or a cache hit

def map_kernel_of(kernel, dk: int, width: int, prescale: float):
    from . import featuremap
    return featuremap.MAPS[kernel.name](kernel, dk, width, prescale)


def map_kernel(node: FeatureMap):
    return map_kernel_of(node.kernel, node.x.shape[-1], node.width, node.prescale)


def _feature_map(node: FeatureMap, names, dtype, knobs):
    from . import featuremap
    k = map_kernel(node)
    fwd, bwd = featuremap.FAMILIES[k.family]
    return {names[0]: fwd(names[0], k, node.role, dtype), names[1]: bwd(names[1], k, dtype)}


def _linear_attention(node: LinearAttention, names, dtype, knobs):
    from . import featuremap, linear
    m, d = node.qf.shape[-1], node.v.shape[-1]
    causal = node.causal                         # prefix_sum; linear when False
    phi = dphi = None
    if node.phi is not None:                     # fused elementwise map (passes/fuse_maps.py)
        phi, dphi = featuremap.elementwise_pair(map_kernel_of(node.phi, m, m, node.prescale), dtype)
    return {names[0]: linear.linear_forward(names[0], m, d, dtype, causal, phi, knobs=knobs.get(names[0]),
                                            eps=node.eps),
            names[1]: linear.linear_backward(names[1], m, d, dtype, causal, phi, dphi,
                                             knobs=knobs.get(names[1]))}


def learns(position) -> bool:
    """Whether the position term has trainable parameters (a toeplitz table)."""
    return position.name == "toeplitz"


def _banded(node: PositionalAttention, names, dtype, knobs):
    """A clipped table: the ±W band exactly, the far keys by chunk prefix sums."""
    from . import banded
    m, d = node.qf.shape[-1], node.v.shape[-1]
    return {names[0]: banded.banded_forward(names[0], m, d, dtype, node.causal, knobs.get(names[0]),
                                            eps=node.eps),
            names[1]: banded.banded_backward(names[1], m, d, dtype, node.causal, knobs.get(names[1]))}


def _decay_slope(TAB, h, later):
    """γ = exp(−TAB[h, later]): TAB (H, 2) holds the rates for earlier and later keys."""
    return TAB[h, 1 if later else 0]


def _decayed(node: PositionalAttention, names, dtype, knobs):
    from . import linear
    m, d = node.qf.shape[-1], node.v.shape[-1]
    return {names[0]: linear.linear_forward(names[0], m, d, dtype, node.causal, slope=_decay_slope,
                                            knobs=knobs.get(names[0]),
                                            eps=decayed_floor(node.eps, node.bias.position)),
            names[1]: linear.linear_backward(names[1], m, d, dtype, node.causal, slope=_decay_slope,
                                             knobs=knobs.get(names[1]))}


def _toeplitz_fft(node: PositionalAttention, names, dtype, knobs):
    from . import toeplitz
    m, d, pos = node.qf.shape[-1], node.v.shape[-1], node.bias.position
    return {names[0]: toeplitz.scores_forward(names[0], m, d, dtype, node.causal, pos, knobs.get(names[0]),
                                              eps=node.eps),
            names[1]: toeplitz.scores_backward(names[1], m, d, dtype, node.causal, pos, learns(pos),
                                               knobs.get(names[1]))}


def _toeplitz_values(node: ToeplitzValues, names, dtype, knobs):
    from . import toeplitz
    d, pos = node.v.shape[-1], node.bias.position
    return {names[0]: toeplitz.values_forward(names[0], d, dtype, node.causal, pos),
            names[1]: toeplitz.values_backward(names[1], d, dtype, node.causal, pos, learns(pos))}


def _softmax_attention(node: SoftmaxAttention, names, dtype, knobs):
    from . import quadratic
    dk, dv = node.q.shape[-1], node.v.shape[-1]
    pos = node.bias.position if node.bias is not None else None
    learn = pos is not None and learns(pos)
    return {names[0]: quadratic.softmax_forward(names[0], dk, dv, dtype, node.causal, node.scale, pos,
                                                knobs.get(names[0])),
            names[1]: quadratic.softmax_backward(names[1], dk, dv, dtype, node.causal, node.scale, pos, learn,
                                                 knobs.get(names[1]))}


def _sampled_attention(node: SampledAttention, names, dtype, knobs):
    from . import sampled
    dk, dv = node.q.shape[-1], node.v.shape[-1]
    return {names[0]: sampled.sampled_forward(names[0], dk, dv, dtype, node.causal, node.scale,
                                              knobs.get(names[0])),
            names[1]: sampled.sampled_backward(names[1], dk, dv, dtype, node.causal, node.scale,
                                               knobs.get(names[1]))}


def _no_kernels(*_) -> dict:
    """Inputs; a position (its parameters are an input of the kernels using it); an Add (an
    elementwise sum, done by torch)."""
    return {}


# --- the portable kernels (te_forms.py, softmax_rows.py, fft_blocks.py): what GPU targets build, scheduled by
# schedules/cuda.py. Their lowerings also take `gpu` (whether loops are bound to threads).

def _portable_feature_map(node: FeatureMap, names, dtype, knobs, gpu):
    from . import te_forms
    k = map_kernel(node)
    return {names[0]: te_forms.map_forward(names[0], k, node.role, dtype),
            names[1]: te_forms.map_backward(names[1], k, dtype)}


def _knob(knobs, names, family: str, knob: str) -> list[int]:
    """The value of `knob` (schedules/knobs.py `family`) for each kernel of `names`."""
    return [resolve(family, knobs.get(n))[knob] for n in names]


def _portable_linear(node: LinearAttention, names, dtype, knobs, gpu):
    from . import featuremap, te_forms
    m, d = node.qf.shape[-1], node.v.shape[-1]
    causal = node.causal                         # prefix_sum; linear when False
    phi = dphi = None
    if node.phi is not None:
        phi, dphi = featuremap.elementwise_pair(map_kernel_of(node.phi, m, m, node.prescale), dtype)
    cf, cb = _knob(knobs, names, "portable_linear", "chunk")
    return {names[0]: te_forms.linear_forward(names[0], m, d, dtype, causal, phi, chunk=cf, eps=node.eps),
            names[1]: te_forms.linear_backward(names[1], m, d, dtype, causal, phi, dphi, chunk=cb)}


def _portable_toeplitz_fft(node: PositionalAttention, names, dtype, knobs, gpu):
    """A thread block per FFT work row."""
    from . import fft_blocks
    m, d, pos = node.qf.shape[-1], node.v.shape[-1], node.bias.position
    tf, tb = _knob(knobs, names, "portable_fft", "threads")
    return {names[0]: fft_blocks.scores_forward(names[0], m, d, dtype, node.causal, pos, gpu, tf, eps=node.eps),
            names[1]: fft_blocks.scores_backward(names[1], m, d, dtype, node.causal, pos, learns(pos), gpu, tb)}


def _portable_banded(node: PositionalAttention, names, dtype, knobs, gpu):
    """A clipped table: the band by offsets, the far keys by chunks."""
    from . import te_forms
    m, d = node.qf.shape[-1], node.v.shape[-1]
    cf, cb = _knob(knobs, names, "portable_linear", "chunk")
    return {names[0]: te_forms.banded_forward(names[0], m, d, dtype, node.causal, chunk=cf, eps=node.eps),
            names[1]: te_forms.banded_backward(names[1], m, d, dtype, node.causal, chunk=cb)}


def _portable_decayed(node: PositionalAttention, names, dtype, knobs, gpu):
    from . import te_forms
    m, d = node.qf.shape[-1], node.v.shape[-1]
    cf, cb = _knob(knobs, names, "portable_linear", "chunk")
    return {names[0]: te_forms.linear_forward(names[0], m, d, dtype, node.causal, decayed=True, chunk=cf,
                                              eps=decayed_floor(node.eps, node.bias.position)),
            names[1]: te_forms.linear_backward(names[1], m, d, dtype, node.causal, decayed=True, chunk=cb)}


def _portable_values(node: ToeplitzValues, names, dtype, knobs, gpu):
    from . import fft_blocks
    d, pos = node.v.shape[-1], node.bias.position
    tf, tb = _knob(knobs, names, "portable_fft", "threads")
    return {names[0]: fft_blocks.values_forward(names[0], d, dtype, node.causal, pos, gpu, tf),
            names[1]: fft_blocks.values_backward(names[1], d, dtype, node.causal, pos, learns(pos), gpu, tb)}


def _portable_softmax(node: SoftmaxAttention, names, dtype, knobs, gpu):
    from . import softmax_rows
    dk, dv = node.q.shape[-1], node.v.shape[-1]
    pos = node.bias.position if node.bias is not None else None
    learn = pos is not None and learns(pos)
    rf, rb = _knob(knobs, names, "portable_rows", "rows")
    return {names[0]: softmax_rows.softmax_forward(names[0], dk, dv, dtype, node.causal, node.scale, pos, gpu,
                                                   rf),
            names[1]: softmax_rows.softmax_backward(names[1], dk, dv, dtype, node.causal, node.scale, pos,
                                                    learn, gpu, rb)}


def _portable_sampled(node: SampledAttention, names, dtype, knobs, gpu):
    from . import softmax_rows
    dk, dv = node.q.shape[-1], node.v.shape[-1]
    rf, rb = _knob(knobs, names, "portable_rows", "rows")
    return {names[0]: softmax_rows.sampled_forward(names[0], dk, dv, dtype, node.causal, node.scale, gpu, rf),
            names[1]: softmax_rows.sampled_backward(names[1], dk, dv, dtype, node.causal, node.scale, gpu, rb)}


# --- the registry: every form's kernels -------------------------------------------------------------

@dataclass(frozen=True)
class FormKernels:
    """The kernels of one form (passes/plan.py has when it is valid and its cost): the CPU lowering
    (node, (fwd name, bwd name), dtype, knobs {kernel name: {knob: value}}) -> {name: PrimFunc},
    the portable one (the same and `gpu`: loops bound to GPU threads), and the schedules/knobs.py
    family of each (None: no knobs)."""
    name: str
    node: type
    cpu: Callable | None
    portable: Callable | None
    cpu_knobs: str | None
    portable_knobs: str | None


FORMS: dict[str, FormKernels] = {f.name: f for f in [
    FormKernels("linear", LinearAttention, _linear_attention, _portable_linear, "linear", "portable_linear"),
    FormKernels("prefix_sum", LinearAttention, _linear_attention, _portable_linear, "linear", "portable_linear"),
    FormKernels("decayed", PositionalAttention, _decayed, _portable_decayed, "linear", "portable_linear"),
    FormKernels("banded", PositionalAttention, _banded, _portable_banded, "banded", "portable_linear"),
    FormKernels("toeplitz_fft", PositionalAttention, _toeplitz_fft, _portable_toeplitz_fft, "toeplitz",
                "portable_fft"),
    FormKernels("values_fft", ToeplitzValues, _toeplitz_values, _portable_values, None, "portable_fft"),
    FormKernels("quadratic", SoftmaxAttention, _softmax_attention, _portable_softmax, "quadratic",
                "portable_rows"),
    # the sampled kernels share the quadratic ones' tiles (sampled.py)
    FormKernels("kde", SampledAttention, _sampled_attention, _portable_sampled, "quadratic", "portable_rows"),
    FormKernels("uniform", SampledAttention, _sampled_attention, _portable_sampled, "quadratic",
                "portable_rows"),
]}
# the nodes that are not form sites: feature maps have kernels of their own (no knobs); inputs,
# positions (their parameters are an input of the kernels using them) and sums (torch) have none
NODE_KERNELS: dict[type, tuple[Callable, Callable] | None] = {
    FeatureMap: (_feature_map, _portable_feature_map), Input: None, Position: None, Add: None,
}


def lowering_of(node: Node, portable: bool) -> Callable | None:
    """The function that writes `node`'s kernels, or None when it has none (its form unlowered)."""
    if type(node) in NODE_KERNELS:
        pair = NODE_KERNELS[type(node)]
        return (lambda *_: {}) if pair is None else pair[portable]
    f = FORMS.get(getattr(node, "form", None))
    if f is None or not isinstance(node, f.node):
        return None
    return f.portable if portable else f.cpu


def forms_for(target) -> frozenset | None:
    """The forms a Target (target.py) has kernels for, for the planner (None: every form)."""
    return frozenset(lowered_forms(True)) if target.portable else None


def lowered_forms(portable: bool = False) -> list[str]:
    """Every form that has kernels (CPU, or portable), for the planner and error messages."""
    return sorted(name for name, f in FORMS.items() if (f.portable if portable else f.cpu) is not None)


def check(root: Node, portable: bool = False) -> None:
    """Raise NotLowered naming every node that has no kernels (cheap: builds nothing)."""
    missing = [node for node in postorder(root) if lowering_of(node, portable) is None]
    if missing:
        raise NotLowered(missing)


def lower(root: Node, dtype: str, knobs: dict | None = None, only: set | None = None,
          portable: bool = False, gpu: bool = True) -> dict:
    """Every kernel the planned IR needs, {name: PrimFunc}, for one dtype; `knobs` {kernel name:
    {knob: value}} (schedules/knobs.py) overrides the defaults of the kernels it names; `only`:
    just the nodes owning these kernel names (the tuner's variants); `portable`: the portable
    kernels (GPU targets) instead of the CPU ones, with their loops bound to GPU threads when
    `gpu` (else CPU loops: how they are tested without a GPU)."""
    check(root, portable)
    funcs = {}
    for i, node in enumerate(postorder(root)):
        names = kernel_names(i, node)
        if only is None or only.intersection(names):
            extra = (gpu,) if portable else ()
            funcs.update(lowering_of(node, portable)(node, names, dtype, knobs or {}, *extra))
    return funcs


def lower_tuned(root: Node, dtype: str, dirs: list, target, portable: bool = False,
                gpu: bool = True) -> tuple[dict, dict]:
    """(funcs, chosen): lower() with the knobs the tuning databases `dirs` (searched in order,
    schedules/lookup.py) pick for `target`; chosen {kernel name: database.Choice} lists the kernels
    built with other than their defaults. `portable`, `gpu` as lower()'s."""
    funcs = lower(root, dtype, portable=portable, gpu=gpu)
    names = tunable(root, portable)
    if not dirs or not names:
        return funcs, {}
    import tvm
    from attndsl.schedules import database, knobs as knob_spaces
    dbs, tgt = database.open_dbs(dirs), tvm.target.Target(target)
    chosen = {}
    for name, family in names.items():
        choice = database.choose(dbs, funcs[name], family, tgt)
        if choice is not None and choice.knobs != knob_spaces.defaults(family):
            chosen[name] = choice
    if chosen:
        funcs.update(lower(root, dtype, {k: c.knobs for k, c in chosen.items()}, only=set(chosen),
                           portable=portable, gpu=gpu))
    return funcs, chosen


def knob_family(node: Node, portable: bool = False) -> str | None:
    """The schedules/knobs.py family of a node's kernels (both of them), None when not tunable;
    `portable`: of the portable kernels."""
    f = FORMS.get(getattr(node, "form", None))
    if f is None:
        return None
    return f.portable_knobs if portable else f.cpu_knobs


def tunable(root: Node, portable: bool = False) -> dict[str, str]:
    """{kernel name: knob family} of the planned IR's tunable kernels (`portable`: the portable
    kernels')."""
    out = {}
    for i, node in enumerate(postorder(root)):
        family = knob_family(node, portable)
        if family is not None:
            out.update(dict.fromkeys(kernel_names(i, node), family))
    return out



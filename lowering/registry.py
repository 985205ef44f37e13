"""The registry: one record per form of its kernels, CPU and portable, and their knob families.

passes/plan.py holds when each form is valid and what it costs; lower_cpu.py and
lower_portable.py say which kernel builders each form calls. Every table the back half needs is
derived from `FORMS` here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from attndsl.ir import (Add, FeatureMap, Input, LinearAttention, Node, Position, PositionalAttention,
                        SampledAttention, SoftmaxAttention, ToeplitzValues, postorder)

from . import lower_cpu, lower_portable


def kernel_names(index: int, node: Node) -> tuple[str, str]:
    """The forward and backward kernel names of the node at post-order `index`."""
    base = f"{node.op}{index}"
    return f"{base}_fwd", f"{base}_bwd"


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


def _form(name, node, lower: str, cpu_knobs, portable_knobs) -> FormKernels:
    """A record whose CPU and portable lowerings are lower_cpu's and lower_portable's `lower`."""
    return FormKernels(name, node, getattr(lower_cpu, lower), getattr(lower_portable, lower), cpu_knobs,
                       portable_knobs)


FORMS: dict[str, FormKernels] = {f.name: f for f in [
    _form("linear", LinearAttention, "lower_linear", "linear", "portable_linear"),
    _form("prefix_sum", LinearAttention, "lower_linear", "linear", "portable_linear"),
    _form("decayed", PositionalAttention, "lower_decayed", "linear", "portable_linear"),
    _form("banded", PositionalAttention, "lower_banded", "banded", "portable_linear"),
    _form("toeplitz_fft", PositionalAttention, "lower_toeplitz_fft", "toeplitz", "portable_fft"),
    _form("values_fft", ToeplitzValues, "lower_values_fft", None, "portable_fft"),
    _form("quadratic", SoftmaxAttention, "lower_softmax", "quadratic", "portable_rows"),
    # the sampled kernels share the quadratic ones' tiles (sampled.py)
    _form("kde", SampledAttention, "lower_sampled", "quadratic", "portable_rows"),
    _form("uniform", SampledAttention, "lower_sampled", "quadratic", "portable_rows"),
]}
# the nodes that are not form sites: feature maps have kernels of their own (no knobs); inputs,
# positions (their parameters are an input of the kernels using them) and sums (torch) have none
NODE_KERNELS: dict[type, tuple[Callable, Callable] | None] = {
    FeatureMap: (lower_cpu.lower_feature_map, lower_portable.lower_feature_map),
    Input: None, Position: None, Add: None,
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

"""The registry: every form's record (form.py), collected from lowering/forms/, and the nodes that
are not form sites. Every table the planner, the lowering, the tuner and the module need is
derived from here.
"""
from __future__ import annotations

from typing import Callable

from attndsl.ast import map_params
from attndsl.ir import Add, FeatureMap, Input, Node, Position, postorder

from . import forms
from .form import NARROW, Form
from .forms import feature_map

FORMS: dict[str, Form] = {f.name: f for f in forms.discover()}

# the nodes that are not form sites: feature maps have kernels of their own (no knobs); inputs,
# positions (their parameters are an input of the kernels using them) and sums (torch) have none
NODE_KERNELS: dict[type, tuple[Callable, Callable] | None] = {
    FeatureMap: (feature_map.lower_cpu, feature_map.lower_portable),
    Input: None, Position: None, Add: None,
}


def kernel_names(index: int, node: Node, narrow: bool = False) -> tuple[str, str]:
    """The forward and backward kernel names of the node at post-order `index` (`narrow`: of its
    form's narrow kernels, Form.narrow)."""
    base = f"{node.op}{index}{NARROW if narrow else ''}"
    return f"{base}_fwd", f"{base}_bwd"


def form_of(node: Node) -> Form | None:
    """The record of a planned site's form (None for other nodes or an unknown form)."""
    f = FORMS.get(getattr(node, "form", None))
    return f if f is not None and isinstance(node, f.node) else None


def lowering_of(node: Node, portable: bool) -> Callable | None:
    """The function that writes `node`'s kernels, or None when it has none (its form unlowered)."""
    if type(node) in NODE_KERNELS:
        pair = NODE_KERNELS[type(node)]
        if portable and isinstance(node, FeatureMap) and map_params(node.kernel):
            return None              # a map reading params: CPU kernels only
        return (lambda *_: {}) if pair is None else pair[portable]
    f = form_of(node)
    if f is None:
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
    f = form_of(node)
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

"""IR -> TVM TIR: the only place TVM kernels are written.

`lower(root, dtype)` walks a planned IR and asks the registry (registry.py: `FORMS`, one `Form`
record per form from forms/, and `NODE_KERNELS` for the nodes that are not form sites) for the
kernels of each node: every node gets a forward and a backward prim_func named
`<op><index>_fwd|_bwd`. A record names the kernel builders its form calls (the other modules
here). A node with no lowering raises `NotLowered`, which the front end reports against the spec.
"""
from __future__ import annotations

from attndsl.ir import Node, postorder

from .form import NARROW_DTYPES, Form
from .tir import script
from .registry import (FORMS, NODE_KERNELS, form_of, forms_for, kernel_names, knob_family, lowered_forms,
                       lowering_of, tunable)

__all__ = ["DECODE_KERNEL", "FORMS", "NODE_KERNELS", "Form", "NotLowered", "check", "decodable", "form_of",
           "forms_for", "kernel_names", "knob_family", "lower", "lower_decode", "lower_tuned", "lowered_forms",
           "lowering_of", "tunable"]

DECODE_KERNEL = "decode_step"


class NotLowered(Exception):
    """Nodes of the planned IR for which no TVM kernel exists (yet), in post-order."""

    def __init__(self, nodes: list[Node]):
        self.nodes = nodes
        super().__init__(", ".join(n.op for n in nodes))


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
    `gpu` (else CPU loops: how they are tested without a GPU). The CPU kernels include the narrow
    ones of the forms that have them (Form.narrow, in NARROW_DTYPES; never tuned)."""
    check(root, portable)
    script.install()                         # cheaper T.macro expansion (tir/script.py)
    funcs = {}
    for i, node in enumerate(postorder(root)):
        names = kernel_names(i, node)
        if only is None or only.intersection(names):
            extra = (gpu,) if portable else ()
            funcs.update(lowering_of(node, portable)(node, names, dtype, knobs or {}, *extra))
        form = form_of(node)
        if only is None and not portable and form is not None and form.narrow and dtype in NARROW_DTYPES:
            funcs.update(form.cpu(node, kernel_names(i, node, narrow=True), dtype, {}, narrow=True))
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


def decodable(root: Node) -> bool:
    """Whether a planned IR decodes token by token: its root a causal site of a form with a running
    state (Form.decode) whose φ is one map of the raw q, k, reading no params."""
    from .forms.feature_map import site_map
    form = form_of(root)
    if form is None or form.decode is None or not getattr(root, "causal", False):
        return False
    k = site_map(root)
    return k is not None and not k.params


def lower_decode(root: Node, dtype: str) -> dict:
    """{DECODE_KERNEL: PrimFunc}: one decoding step of the planned IR `root` (decodable) in `dtype`."""
    if not decodable(root):
        raise NotLowered([root])
    script.install()
    return {DECODE_KERNEL: form_of(root).decode(root, DECODE_KERNEL, dtype)}

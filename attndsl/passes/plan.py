"""The cost model: pick the cheapest valid form for every form site, or the one `plan=` forces.

Each form's record (lowering/forms/, collected in lowering/registry.py) says when it is valid and
its cost in flops per batch·head for a sequence of N.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .. import calibration
from ..diagnostics import SpecError
from ..ir import Node, postorder
from ..lowering.form import Form
from ..lowering.registry import FORMS
from ..rewrite import rewrite

PLAN_LENGTH = 4096                               # the length `Attention.planned` is costed at
# the lengths a module plans at: it keeps the kernels of every distinct plan and runs, per call,
# the one the cost model rates cheapest at the call's N (module.py)
LADDER = tuple(2 ** p for p in range(5, 17))      # 32 … 65536


@dataclass(frozen=True)
class Decision:
    site: Node
    form: str
    costs: tuple[tuple[str, float], ...]      # every valid form with its estimated cost


def cost_of(form: str, site: Node, n: int, calibrated: bool = True) -> float:
    """The estimated cost of `form` on `site` (an unplanned site) at sequence length n: its flops,
    or, calibrated on this CPU (calibration.py) unless `calibrated` is False, the flops it takes
    the median form to spend the form's measured time."""
    flops = FORMS[form].cost(site, n)
    return calibration.cost(form, flops) if calibrated else flops


def candidates(n: Node) -> list[Form]:
    return [f for f in FORMS.values() if isinstance(n, f.node) and f.valid(n)]


def choose(root: Node, plan: str = "auto", n: int = PLAN_LENGTH,
           forms: frozenset | None = None) -> tuple[Node, list[Decision]]:
    """Set `form` on every site; returns the new tree and the choices made (for explain()).
    `forms`: the forms the target has kernels for (None: all); a site none of whose valid forms
    is among them keeps every candidate, so that lowering names what is missing."""
    known = sorted(FORMS)
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
        best = min(usable, key=lambda f: cost_of(f.name, node, n))
        choices.append(Decision(node, best.name, tuple((f.name, cost_of(f.name, node, n)) for f in usable)))
        return replace(node, form=best.name)

    out = rewrite(root, [("choose_form", rule)])
    return out, choices


def unplanned(root: Node) -> list[Node]:
    return [x for x in postorder(root) if hasattr(x, "form") and x.form is None]

"""The compiler, top to bottom. Each stage is its own module; this file only lists them.

    text --parse--> AST --lower_ast--> IR (the meaning, quadratic)
         --fold_scale--> --linearize--> --fuse_softmax--> --fuse_maps--> --plan (cost model)--> forms
         --lowering (attndsl.lowering)--> TVM kernels --build/cache--> Attention module
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from . import config
from .ast import AttentionSpec
from .ir import Node, format_ir
from .passes import fold_scale, fuse_maps, fuse_softmax, linearize, lower_ast, plan
from .passes.plan import PLAN_LENGTH
from .rewrite import rewrite
from .verify import verify

# (name, rewrite rules), applied in order after lower_ast, each followed by the verifier
PASSES = [
    ("fold_scale", fold_scale.RULES),
    ("linearize", linearize.RULES),
    ("fuse_softmax", fuse_softmax.RULES),
    ("fuse_maps", fuse_maps.RULES),
]
STAGES = ("ir", *(name for name, _ in PASSES), "plan")     # the names of Planned.stages, in order


@dataclass(frozen=True)
class Planned:
    """The IR after every pass, and the cost model's decisions."""
    stages: tuple[tuple[str, Node], ...]
    decisions: tuple[plan.Decision, ...]

    @property
    def root(self) -> Node:
        return self.stages[-1][1]

    def stage(self, name: str) -> Node:
        return dict(self.stages)[name]

    @property
    def forms(self) -> tuple[str, ...]:
        return tuple(d.form for d in self.decisions)

    def cost(self, n: int) -> float:
        """The cost model's estimate for a sequence of n: its forms' costs summed."""
        return sum(plan.cost_of(d.form, d.site, n) for d in self.decisions)


def run(spec: AttentionSpec, head_dim: int, value_dim: int, *, plan_name: str = "auto",
        n: int = PLAN_LENGTH, forms: frozenset | None = None) -> Planned:
    """AST -> planned IR. `n` is the sequence length the cost model plans for; `forms` the forms
    the target has kernels for (None: every form)."""
    return run_lengths(spec, head_dim, value_dim, (n,), plan_name=plan_name, forms=forms)[0]


def run_lengths(spec: AttentionSpec, head_dim: int, value_dim: int, lengths, *, plan_name: str = "auto",
                forms: frozenset | None = None) -> list[Planned]:
    """The passes once, then a plan for each sequence length of `lengths` (the same Planned for
    lengths that choose the same forms)."""
    root = verify(lower_ast.lower(spec, head_dim, value_dim))
    stages = [("ir", root)]
    for name, rules in PASSES:
        root = verify(rewrite(root, rules))
        stages.append((name, root))
    out: list[Planned] = []
    for n in lengths:
        planned_root, decisions = plan.choose(root, plan_name, n, forms)
        same = next((p for p in out if p.forms == tuple(d.form for d in decisions)), None)
        out.append(same or Planned((*stages, ("plan", verify(planned_root))), tuple(decisions)))
    if config.dump_ir():
        for name, node in stages:
            print(f"// ----- IR after {name} ({spec.name}) -----\n{format_ir(node)}", file=sys.stderr)
        for p in {id(p): p for p in out}.values():
            print(f"// ----- IR after plan ({spec.name}: {', '.join(p.forms)}) -----\n{format_ir(p.root)}",
                  file=sys.stderr)
    return out

"""The rewrite engine: a pass is a table of rules `(name, node -> node | None)`, applied bottom-up
to a fixpoint. Rules are small and state the identity they apply in a comment."""
from __future__ import annotations

from typing import Callable, Sequence

from .ir import Node

Rule = tuple[str, Callable[[Node], "Node | None"]]


def rewrite(root: Node, rules: Sequence[Rule], *, limit: int = 100) -> Node:
    """Rebuild `root` with children rewritten first, then apply the first matching rule until
    none matches. Shared subtrees are rewritten once."""
    memo: dict[Node, Node] = {}

    def visit(n: Node) -> Node:
        if n in memo:
            return memo[n]
        new = {f: visit(c) for f, c in _child_fields(n)}
        out = n.with_children({f: c for f, c in new.items() if c is not getattr(n, f)})
        for _ in range(limit):
            for _name, rule in rules:
                res = rule(out)
                if res is not None and res != out:
                    out = visit(res)
                    break
            else:
                break
        else:
            raise RuntimeError(f"rewrite did not reach a fixpoint at {out.op}")
        memo[n] = out
        return out

    return visit(root)


def _child_fields(n: Node):
    for name in type(n).__dataclass_fields__:
        v = getattr(n, name)
        if isinstance(v, Node):
            yield name, v

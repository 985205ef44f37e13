"""attndsl: attention variants written in a small language, compiled to TVM kernels for PyTorch.

    spec = attndsl.parse(text, filename="x.attn")          # AST; raises SpecError
    attn = attndsl.compile("x.attn", heads=8, head_dim=64)  # -> Attention (torch.nn.Module)
    out = attn(q, k, v); ref = attn.reference(q, k, v); print(attn.explain())
    print(attndsl.from_torch(my_attention, (q, k, v)))     # an existing PyTorch attention as a spec
"""
from __future__ import annotations

import os
from pathlib import Path

from .diagnostics import SpecError
from .parse import parse

__version__ = "0.1.0"


def read_spec(text_or_path: str | os.PathLike) -> tuple[str | bytes, str]:
    """(source, filename): a path (or a one-line string without braces) is read as bytes; else text."""
    if isinstance(text_or_path, os.PathLike) or (
            isinstance(text_or_path, str) and "{" not in text_or_path and "\n" not in text_or_path):
        path = Path(text_or_path)
        if not path.is_file():
            raise SpecError(f"no spec file at {str(path)!r} (pass the spec text itself, or a path "
                            f"to an existing .attn file)")
        return path.read_bytes(), str(path)
    return str(text_or_path), "<spec>"


def compile(text_or_path, name: str | None = None, *, heads: int, head_dim: int,
            value_dim: int | None = None, target="llvm", plan: str = "auto",
            check_finite: bool = False, tuned: bool = True):
    """Parse, plan, lower and build one attention block; returns an `Attention` module.
    `tuned`: build the knobs a tuning database records for these kernels (schedules/lookup.py);
    False builds the defaults."""
    from .module import Attention
    text, filename = read_spec(text_or_path)
    spec = parse(text, filename=filename).block(name)
    return Attention(spec, heads=heads, head_dim=head_dim, value_dim=value_dim, target=target,
                     plan=plan, check_finite=check_finite, tuned=tuned)


def from_torch(fn_or_module, example_inputs, *, name: str = "imported"):
    """A PyTorch attention fn(q, k, v) read back as a spec (torch-mlir export; attndsl.mlir.from_torch):
    returns an `Imported` (its `.text`, the learned `.position_table`, `.compile(...)`)."""
    from .mlir.from_torch import from_torch as read
    return read(fn_or_module, example_inputs, name=name)


def __getattr__(name):
    if name == "Attention":
        from .module import Attention
        return Attention
    raise AttributeError(name)


__all__ = ["parse", "compile", "from_torch", "SpecError", "Attention", "read_spec"]

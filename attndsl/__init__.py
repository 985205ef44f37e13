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
from .lowering.target import Target
from .parse import parse

__version__ = "0.1.0"


MAX_HEAD_DIM = 1024    # head_dim and value_dim: the kernels vectorize whole rows


def read_spec(text_or_path: str | bytes | os.PathLike) -> tuple[str | bytes, str]:
    """(source, filename): a path (or a one-line string without braces) is read as bytes, after a
    check of its size (at most 1 MiB); bytes are the spec's UTF-8 text; else the str is the text."""
    from .parse import MAX_BYTES, too_large
    if isinstance(text_or_path, (bytes, bytearray, memoryview)):
        return bytes(text_or_path), "<spec>"
    if not isinstance(text_or_path, (str, os.PathLike)):
        raise TypeError(f"a spec is given as its text (str or bytes) or a path (str or os.PathLike), "
                        f"not {type(text_or_path).__name__}")
    if isinstance(text_or_path, os.PathLike) or ("{" not in text_or_path and "\n" not in text_or_path):
        path = Path(text_or_path)
        if not path.is_file():
            raise SpecError(f"no spec file at {str(path)!r} (pass the spec text itself, or a path "
                            f"to an existing .attn file)")
        try:
            size = path.stat().st_size
            if size > MAX_BYTES:
                raise too_large(size, str(path))
            with path.open("rb") as f:
                data = f.read(MAX_BYTES + 1)
        except OSError as e:
            raise SpecError(f"cannot read the spec file {str(path)!r}: {e.strerror or e}") from None
        if len(data) > MAX_BYTES:
            raise too_large(len(data), str(path))
        return data, str(path)
    return text_or_path, "<spec>"


def _check_dims(heads, head_dim, value_dim) -> None:
    """heads a positive int; head_dim and value_dim in [1, MAX_HEAD_DIM]."""
    for name, val, hi in (("heads", heads, None), ("head_dim", head_dim, MAX_HEAD_DIM),
                          ("value_dim", value_dim, MAX_HEAD_DIM)):
        if name == "value_dim" and val is None:
            continue
        if not isinstance(val, int) or isinstance(val, bool):
            raise TypeError(f"{name} must be a positive int, got {type(val).__name__} {val!r}")
        if val < 1:
            raise ValueError(f"{name} must be a positive int, got {val}")
        if hi is not None and val > hi:
            raise ValueError(f"{name} must be a positive int at most {hi} (the kernels vectorize "
                             f"whole rows of it), got {val}")


_DEFAULT_DTYPE = "float32"       # compile(dtype=...): torch.float32, named without importing torch here


def compile(text_or_path, name: str | None = None, *, heads: int, head_dim: int,
            value_dim: int | None = None, target: str | dict | Target = "llvm", plan: str = "auto",
            check_finite: bool = False, tuned: bool = True, dtype=_DEFAULT_DTYPE):
    """Parse, plan, lower and build one attention block; returns an `Attention` module.
    `text_or_path`: the spec's text (str or UTF-8 bytes) or a path to a .attn file.
    `tuned`: build the knobs a tuning database records for these kernels (schedules/lookup.py);
    False builds the defaults. `dtype`: the inputs' dtype whose kernels are built now (float32 by
    default; float16 and bfloat16 run on float32's); any other dtype builds at its first call, and
    None builds nothing before the first call."""
    from .module import Attention
    _check_dims(heads, head_dim, value_dim)
    text, filename = read_spec(text_or_path)
    spec = parse(text, filename=filename).block(name)
    return Attention(spec, heads=heads, head_dim=head_dim, value_dim=value_dim, target=target,
                     plan=plan, check_finite=check_finite, tuned=tuned, dtype=dtype)


def from_torch(fn_or_module, example_inputs, *, name: str = "imported"):
    """A PyTorch attention fn(q, k, v) read back as a spec (torch-mlir export; attndsl.mlir.from_torch):
    returns an `Imported` (its `.text`, the learned `.position_table`, `.compile(...)`)."""
    from .mlir.from_torch import from_torch as read
    return read(fn_or_module, example_inputs, name=name)


def __getattr__(name):
    if name == "Attention":
        from .module import Attention
        return Attention
    if name == "nn":                 # attndsl.nn.MultiheadAttention after a plain `import attndsl`
        import importlib
        return importlib.import_module(".nn", __name__)
    raise AttributeError(name)


__all__ = ["parse", "compile", "from_torch", "SpecError", "Attention", "Target", "read_spec"]

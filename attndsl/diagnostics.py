"""`SpecError`: every mistake in a spec, located and explained, rustc-style.

    error: unknown kernel 'favour'
     --> model.attn:2:16
      |
    2 |     kernel = favour(features=64)
      |              ^^^^^^
      = help: did you mean 'favor'? valid kernels: softmax, relu, ...
"""
from __future__ import annotations

import difflib
from typing import Iterable

from .ast import Span


class SpecError(ValueError):
    """A spec that cannot be compiled. `str(err)` is the full located diagnostic."""

    def __init__(self, message: str, span: Span | None = None, help: str | None = None):
        self.message = message
        self.span = span
        self.help = help
        super().__init__(render(message, span, help))


def render(message: str, span: Span | None, help: str | None) -> str:
    out = [f"error: {message}"]
    if span is not None and span.line > 0:
        text = span.line_text().expandtabs(1)
        gutter = " " * len(str(span.line))
        width = max(1, (span.end_column - span.column) if span.end_line == span.line else
                    len(text) - span.column + 1)
        out += [f"{gutter}--> {span}", f"{gutter} |",
                f"{span.line} | {text}",
                f"{gutter} | " + " " * (span.column - 1) + "^" * min(width, max(1, len(text) - span.column + 1))]
    elif span is not None:
        out.append(f" --> {span.filename}")
    if help:
        out.append(f"  = help: {help}")
    return "\n".join(out)


def did_you_mean(word: str, valid: Iterable[str], what: str) -> str:
    """'did you mean X? valid WHAT: a, b, c' — the help line for a misspelled name."""
    valid = list(valid)
    close = difflib.get_close_matches(word, valid, n=1, cutoff=0.6)
    listing = f"valid {what}: {', '.join(valid)}"
    return f"did you mean {close[0]!r}? {listing}" if close else listing

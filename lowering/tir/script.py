"""TVMScript parsing, made cheaper where TVM 0.27 spends most of it.

A `T.macro` call finds the parser that expands it by walking the Python stack with
`inspect.getouterframes`, which also reads a line of source for every frame (the parser recurses
~90 frames deep): per macro call ~40 ms here, about 60% of lowering a linear form's kernels.
`install()` swaps in a walk over `frame.f_back` that finds the same parser (the innermost frame
whose globals hold it) and reads no source. It is idempotent, and applied by `lowering.lower`.
"""
from __future__ import annotations

import sys

_INSTALLED = False


def _find_parser_def(self):
    from tvm.script.parser.core.parser import ScriptMacro
    frame = sys._getframe(1)
    while frame is not None:
        parser = frame.f_globals.get(ScriptMacro.parser_object_name)
        if parser is not None:
            return parser
        frame = frame.f_back
    raise RuntimeError(f"{ScriptMacro.parser_object_name} not available")


def install() -> None:
    """Use the frame walk for every TVMScript macro expanded from now on in this process."""
    global _INSTALLED
    if not _INSTALLED:
        from tvm.script.parser.core.parser import ScriptMacro
        ScriptMacro._find_parser_def = _find_parser_def
        _INSTALLED = True

"""Where grammar/attn.lark is, however attndsl was installed.

A wheel carries it as package data in attndsl/_grammar/ (pyproject.toml maps grammar/ there);
a source checkout and an editable install read it from grammar/ beside the attndsl/ folder.
"""
from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent
CANDIDATES = (_HERE / "_grammar" / "attn.lark",          # installed wheel
              _HERE.parent / "grammar" / "attn.lark")    # source checkout, editable install


def grammar_path() -> Path:
    for path in CANDIDATES:
        if path.is_file():
            return path
    raise FileNotFoundError("attndsl: grammar attn.lark not found; looked in "
                            + ", ".join(map(str, CANDIDATES)) + " (reinstall attndsl)")

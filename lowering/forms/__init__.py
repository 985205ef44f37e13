"""The forms, one module each (or one per pair sharing kernels): every module here with a
`FORMS` list of form.Form records is registered (registry.py). Adding a form = adding a module."""
from __future__ import annotations

import importlib
import pkgutil


def discover() -> list:
    """Every Form record of this package's modules, in module-name order."""
    out = []
    for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        out += getattr(importlib.import_module(f"{__name__}.{m.name}"), "FORMS", [])
    return out

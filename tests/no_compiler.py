"""Imported first in a process, it keeps TVM's compiler (the `tvm` package) out of reach there, as
on a machine that has only a runtime-only bundle (attndsl/bundle.py): tests/test_bundle.py and
tools/gpu_bundle.py run their bundle checks behind it."""
import importlib.abc
import sys


class _NoCompiler(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tvm" or name.startswith("tvm."):
            raise ImportError("TVM's compiler is not installed here (tests/no_compiler.py)")


sys.meta_path.insert(0, _NoCompiler())

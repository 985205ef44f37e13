"""Loading compiled kernels without the TVM compiler: a cache hit needs only libtvm_runtime.

`import tvm` costs ~1.7 s here (the compiler, LLVM, TVMScript); a cached library only needs the
runtime's C symbols (the thread pool, workspace allocation) and tvm_ffi's module loader.
"""
from __future__ import annotations

import ctypes
import importlib.util
import sys
from pathlib import Path

from attndsl import config

_RUNTIME: ctypes.CDLL | None = None


def runtime_dir() -> Path | None:
    """The folder of libtvm_runtime.so: ATTNDSL_TVM_RUNTIME (a runtime-only install,
    attndsl/bundle.py), else the apache-tvm package's lib/; None when neither is there."""
    if config.tvm_runtime_dir() is not None:
        return config.tvm_runtime_dir()
    spec = importlib.util.find_spec("tvm")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "lib"


def _load_runtime() -> None:
    global _RUNTIME
    config.export_tvm_threads()                           # before the thread pool starts
    if _RUNTIME is not None or sys.modules.get("tvm") is not None:   # `import tvm` loaded it
        return
    folder = runtime_dir()
    if folder is None:
        raise ImportError("apache-tvm is not installed (pip install apache-tvm==0.27.0.post1), "
                          "and ATTNDSL_TVM_RUNTIME names no runtime-only TVM")
    import tvm_ffi  # noqa: F401  (loads libtvm_ffi.so, which libtvm_runtime.so links against)
    lib = folder / "libtvm_runtime.so"
    if not lib.is_file():
        if config.tvm_runtime_dir() is not None:
            raise ImportError(f"ATTNDSL_TVM_RUNTIME={folder} holds no libtvm_runtime.so")
        import tvm  # noqa: F401                          # an unusual layout: take the full import
        return
    _RUNTIME = ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)


def host_cpu() -> str:
    """What 'llvm' compiles for, without asking LLVM: the CPU model and its feature flags (a
    library built with AVX-512 must not be loaded on a CPU without it). Part of the cache key."""
    try:
        info = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        import platform
        return platform.machine() + " " + platform.processor()
    keep = [ln for ln in info.splitlines() if ln.split(":")[0].strip() in ("vendor_id", "model name", "flags")]
    return "\n".join(keep)


def load_library(path: str | Path):
    """A library written by `export_library`, as a module whose kernels are looked up by name."""
    _load_runtime()
    import tvm_ffi

    from . import omp
    lib = tvm_ffi.load_module(str(path))
    omp.adopt(path)                              # its parallel loops on torch's OpenMP threads
    return lib

"""CUDA kernels at load time, without the TVM compiler.

A CUDA library (lowering/build.py) keeps its kernels as CUDA C; TVM's CUDA runtime
(libtvm_runtime_cuda.so) compiles them when the library is loaded, through the global function
`tvm_callback_cuda_compile`. attndsl registers its own, `compile_source`, which keeps what it
compiles in a store beside the kernel cache,

    <cache_dir>/cuda/<key[:2]>/<key>.fatbin      key = sha256 of (source, arch, flags)

so a library's CUDA C is compiled once per GPU architecture, not at every load. On a miss it
compiles with nvcc (a fatbin: the architecture's machine code plus its PTX), or, where there is no
nvcc, with TVM's own NVRTC path (which needs the apache-tvm package). On a machine without a GPU
the store is filled ahead for ATTNDSL_CUDA_ARCH (`compile_ahead`; attndsl/bundle.py), so a GPU
machine given the store and the library cache loads kernels without compiling anything.

Kernels are compiled without --use_fast_math: the float32 tolerances assume IEEE division, square
root and expf.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import subprocess
import tempfile
from pathlib import Path

from attndsl import config

NVCC_FLAGS = ("-O3", "-w", "--expt-relaxed-constexpr")

_CUDA_RUNTIME: ctypes.CDLL | None = None
_problem: str | None = None        # why this process has no CUDA runtime, once looked at


def load_runtime() -> str | None:
    """Load TVM's CUDA runtime (libtvm_runtime_cuda.so, beside libtvm_runtime.so) and register
    `compile_source`; None when CUDA libraries can be loaded here, else why not."""
    global _CUDA_RUNTIME, _problem
    if _CUDA_RUNTIME is not None or _problem is not None:
        return _problem
    from . import load
    load._load_runtime()
    import tvm_ffi
    path = load.runtime_dir() / "libtvm_runtime_cuda.so"     # _load_runtime raised if there is none
    if not path.is_file():
        _problem = f"{path} is missing (this TVM has no CUDA runtime)"
        return _problem
    try:
        _CUDA_RUNTIME = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:           # libcuda.so.1 (the driver) or libcudart.so.13 not found
        _problem = f"{path.name} does not load: {e}"
        return _problem
    _register()
    if tvm_ffi.get_global_func("device_api.cuda", allow_missing=True) is None:
        _problem = f"{path.name} registered no CUDA device API"
    return _problem


def _register() -> None:
    """`compile_source` as tvm_callback_cuda_compile. Where TVM's compiler is installed, `import
    tvm` registers its own (tvm.support.nvcc, which fails if the name is taken), so it is imported
    first and overridden."""
    import tvm_ffi
    if config.tvm_runtime_dir() is None:
        try:
            found = importlib.util.find_spec("tvm") is not None
        except ImportError:
            found = False
        if found:
            import tvm  # noqa: F401
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_source, override=True)


def arch() -> str:
    """The sm_XY to compile for: ATTNDSL_CUDA_ARCH, else this machine's first GPU."""
    if config.cuda_arch():
        return config.cuda_arch()
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU here to compile kernels for; set ATTNDSL_CUDA_ARCH "
                           "(e.g. sm_90) to compile them ahead for another machine")
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def store_path(source: str, sm: str) -> Path:
    h = hashlib.sha256("\0".join([source, sm, *NVCC_FLAGS]).encode()).hexdigest()
    return config.cache_dir() / "cuda" / h[:2] / f"{h}.fatbin"


def compile_source(source: str, sm: str | None = None) -> bytes:
    """The compiled form of a CUDA library's source for `sm` (default `arch()`): from the store,
    else compiled and stored. What TVM's CUDA runtime calls as tvm_callback_cuda_compile."""
    sm = sm or arch()
    path = store_path(source, sm)
    try:
        data = path.read_bytes()
        if data:
            return data
    except OSError:
        pass
    data = _compile(source, sm)
    try:
        from attndsl.cache import replace_atomically
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(path, lambda tmp: Path(tmp).write_bytes(data))
    except OSError:
        pass                                  # an unwritable cache: compiled, not kept
    return data


def compile_ahead(lib) -> int:
    """Fill the store for the CUDA modules of a built library `lib` (a TVM CUDA target's), for
    ATTNDSL_CUDA_ARCH; returns how many were compiled (0 where it is unset)."""
    if not config.cuda_arch():
        return 0
    mod = lib.mod if hasattr(lib, "mod") else lib
    sources = [m.inspect_source("cuda") for m in mod.imports if m.kind == "cuda"]
    for source in sources:
        compile_source(source, config.cuda_arch())
    return len(sources)


def _compile(source: str, sm: str) -> bytes:
    from attndsl.schedules.cuda import nvcc_path
    nvcc = nvcc_path()
    if nvcc is None:
        return _compile_with_tvm(source, sm)
    digits = sm.removeprefix("sm_")
    with tempfile.TemporaryDirectory(prefix="attndsl-cuda-") as tmp:
        cu, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        cu.write_text(source)
        cmd = [nvcc, "--fatbin", *NVCC_FLAGS, "-gencode",
               f"arch=compute_{digits},code=[sm_{digits},compute_{digits}]", "-o", str(out), str(cu)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc could not compile a CUDA library for {sm}:\n"
                               f"{proc.stdout}{proc.stderr}")
        return out.read_bytes()


def _compile_with_tvm(source: str, sm: str) -> bytes:
    try:
        from tvm.support import nvcc
    except ImportError:
        raise RuntimeError(f"a CUDA library's kernels are not compiled for {sm} in {config.cache_dir() / 'cuda'}, "
                           "and this machine has neither nvcc nor TVM's compiler to compile them; "
                           "compile them ahead (make gpu-bundle, or ATTNDSL_CUDA_ARCH) or install "
                           "the CUDA toolkit") from None
    config.export_cuda_compile_mode()
    return bytes(nvcc.compile_cuda(source, target_format="cubin", arch=sm,
                                   compiler=config.cuda_compile_mode()))

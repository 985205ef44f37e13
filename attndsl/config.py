"""Every environment flag attndsl reads, in one place (no other module reads os.environ for them).

Each flag is read when its function is called, so a test can monkeypatch the environment.
"""
from __future__ import annotations

import os
from pathlib import Path

_FALSE = {"", "0", "false", "no", "off"}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in _FALSE


def cache_dir() -> Path:
    """ATTNDSL_CACHE_DIR, else $XDG_CACHE_HOME/attndsl, else ~/.cache/attndsl."""
    if os.environ.get("ATTNDSL_CACHE_DIR"):
        return Path(os.environ["ATTNDSL_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "attndsl"


def tuning_db() -> Path | None:
    """ATTNDSL_TUNING_DB: the tuning-database folder `attndsl tune` writes to and compile() reads
    first (else <cache>/tuning; schedules/lookup.py)."""
    raw = os.environ.get("ATTNDSL_TUNING_DB", "").strip()
    return Path(raw).expanduser() if raw else None


def use_tuned() -> bool:
    """False when ATTNDSL_UNTUNED is truthy: compile() builds the default knobs, ignoring every
    tuning database (to compare, or to rule tuning out)."""
    return not _flag("ATTNDSL_UNTUNED")


def use_calibration() -> bool:
    """False when ATTNDSL_UNCALIBRATED is truthy: the planner compares flop counts, ignoring the
    measured rates of `attndsl calibrate` (attndsl/calibration.py)."""
    return not _flag("ATTNDSL_UNCALIBRATED")


def dump_ir() -> bool:
    """ATTNDSL_DUMP_IR truthy: print the IR after every pass to stderr."""
    return _flag("ATTNDSL_DUMP_IR")


def verbose() -> int:
    """ATTNDSL_VERBOSE: 0 silent, 1 one line per compile or cache load, 2 also per-stage detail."""
    raw = os.environ.get("ATTNDSL_VERBOSE", "0").strip().lower()
    if raw in _FALSE:
        return 0
    try:
        return max(0, min(2, int(raw)))
    except ValueError:
        return 1                      # "yes", "true": the user asked for messages


def use_cache() -> bool:
    """False when ATTNDSL_NO_CACHE is truthy: always rebuild, never read or write the cache."""
    return not _flag("ATTNDSL_NO_CACHE")


def num_threads() -> int:
    """ATTNDSL_NUM_THREADS, else TVM_NUM_THREADS, else every CPU this process may run on.
    (TVM's own default counts physical cores in a way that gives 1 thread on this 2-vCPU VM.)"""
    for name in ("ATTNDSL_NUM_THREADS", "TVM_NUM_THREADS"):
        raw = os.environ.get(name, "").strip()
        if raw.isdigit() and int(raw) > 0:
            return int(raw)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def use_openmp() -> bool:
    """False when ATTNDSL_OPENMP is 0/false/no: the CPU kernels' parallel loops on TVM's own thread
    pool instead of torch's OpenMP threads (attndsl/runtime/omp.py)."""
    return "ATTNDSL_OPENMP" not in os.environ or _flag("ATTNDSL_OPENMP")


FFT_IMPLS = ("tir", "library")


def fft_impl() -> str:
    """ATTNDSL_FFT: what serves the Toeplitz kernels' FFTs, "tir" (lowering/fft/real.py, the
    default: faster here, see benchmarks/bench_fft.py) or "library" (torch.fft)."""
    raw = os.environ.get("ATTNDSL_FFT", "").strip().lower() or "tir"
    if raw not in FFT_IMPLS:
        raise ValueError(f"ATTNDSL_FFT={raw!r}: valid values are {', '.join(FFT_IMPLS)}")
    return raw


def tvm_runtime_dir() -> Path | None:
    """ATTNDSL_TVM_RUNTIME: a folder holding libtvm_runtime.so (and libtvm_runtime_cuda.so, and
    versions.json), for a runtime-only install without the apache-tvm package (attndsl/bundle.py);
    None: the apache-tvm package's own lib folder."""
    raw = os.environ.get("ATTNDSL_TVM_RUNTIME", "").strip()
    return Path(raw).expanduser() if raw else None


def cuda_arch() -> str | None:
    """ATTNDSL_CUDA_ARCH (e.g. "sm_90"): the GPU that CUDA kernels are compiled for ahead of
    loading, on a machine without one (attndsl/runtime/cuda.py); None: this machine's GPU."""
    raw = os.environ.get("ATTNDSL_CUDA_ARCH", "").strip().lower()
    return raw or None


def export_tvm_threads() -> None:
    """Hand num_threads() to TVM, which reads TVM_NUM_THREADS when its thread pool starts."""
    os.environ["TVM_NUM_THREADS"] = str(num_threads())


def cuda_compile_mode() -> str:
    """TVM_CUDA_COMPILE_MODE (TVM's own flag), else "nvrtc" where the cuda-bindings package is
    installed, else "nvcc" (the CUDA toolkit's, found through CUDA_PATH or PATH)."""
    raw = os.environ.get("TVM_CUDA_COMPILE_MODE", "").strip().lower()
    if raw:
        return raw
    import importlib.util
    return "nvrtc" if importlib.util.find_spec("cuda") is not None else "nvcc"


def export_cuda_compile_mode() -> None:
    os.environ["TVM_CUDA_COMPILE_MODE"] = cuda_compile_mode()


# name -> (current value, meaning); what `attndsl` prints for its flags
def _flags() -> dict[str, tuple[object, str]]:
    return {
        "ATTNDSL_CACHE_DIR": (cache_dir(), "where compiled kernels are cached"),
        "ATTNDSL_TUNING_DB": (tuning_db(), "where attndsl tune writes and compile() reads first (default <cache>/tuning)"),
        "ATTNDSL_UNTUNED": (not use_tuned(), "build the default knobs; ignore tuning databases"),
        "ATTNDSL_UNCALIBRATED": (not use_calibration(), "plan by flop counts; ignore attndsl calibrate's rates"),
        "ATTNDSL_DUMP_IR": (dump_ir(), "dump the IR after every pass to stderr"),
        "ATTNDSL_VERBOSE": (verbose(), "0/1/2: progress messages while compiling"),
        "ATTNDSL_NO_CACHE": (not use_cache(), "always rebuild kernels; never read or write the cache"),
        "ATTNDSL_NUM_THREADS": (num_threads(), "threads of the TVM kernels (read when TVM starts)"),
        "ATTNDSL_OPENMP": (use_openmp(), "run the CPU kernels' parallel loops on torch's OpenMP threads"),
        "ATTNDSL_FFT": (fft_impl(), "FFT of the Toeplitz kernels: tir (TVMScript) or library (torch.fft)"),
        "TVM_CUDA_COMPILE_MODE": (cuda_compile_mode(), "how CUDA kernels compile when loaded without nvcc: nvrtc or nvcc"),
        "ATTNDSL_TVM_RUNTIME": (tvm_runtime_dir(), "a runtime-only TVM (libtvm_runtime*.so) to load kernels with"),
        "ATTNDSL_CUDA_ARCH": (cuda_arch(), "the GPU (sm_XY) CUDA kernels are compiled for where there is none"),
    }


def describe() -> str:
    """One line per flag: name, current value, meaning."""
    return "\n".join(f"{name:<18} = {str(value):<30} {meaning}"
                     for name, (value, meaning) in _flags().items())

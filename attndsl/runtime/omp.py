"""TVM's parallel loops on torch's OpenMP threads, so the two never fight over the cores.

A CPU kernel's `T.parallel` loop calls `TVMBackendParallelLaunch(f, cdata, num_task)` through a
function pointer that every compiled library exports (`__TVMBackendParallelLaunch`, set when
the library loads). By default that is TVM's own thread pool: a second set of worker threads
beside torch's OpenMP pool. torch's workers spin for a while after each op, so on a machine with
few cores a TVM kernel called between torch ops waits for them (measured here, 2 cores, softmax
N = 512 in bench_softmax.py's interleaved rounds: 17.5 ms against 8.1 ms with the OpenMP
workers told to sleep, OMP_WAIT_POLICY=PASSIVE).

`adopt(path)` points a loaded library's launcher at a small C function that runs the tasks as
one OpenMP team in the libgomp torch has loaded (same soname, so the same runtime and the same
threads): task i of n = omp_get_thread_num() of a team of n = num_threads() threads, which is
what TVM's launcher hands a lambda. The shim is compiled once per machine with the C compiler
TVM links kernels with, and cached. Libraries that use TVM's parallel barrier keep TVM's pool.
ATTNDSL_OPENMP=0, or no C compiler with OpenMP, keeps TVM's pool everywhere.

Fork: neither libgomp nor TVM's pool survives `fork()` (the child inherits a pool whose threads
do not exist, and the first parallel loop waits for them forever). In a forked child (a
DataLoader worker, multiprocessing with fork) every library, loaded before or after the fork,
runs its parallel loops inline as one task on the calling thread, as torch's own ops do in
DataLoader workers (`torch.set_num_threads(1)`).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from attndsl import config

SOURCE = r"""
#include <omp.h>
typedef struct { void* sync_handle; int num_task; } TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);
static int team = 1;
static long launches = 0;                     /* for the tests: how often a kernel came here */
void attndsl_set_threads(int n) { team = n > 0 ? n : 1; }
long attndsl_launches(void) { return launches; }
int attndsl_parallel_launch(FTVMParallelLambda flambda, void* cdata, int num_task) {
  int n = num_task > 0 ? num_task : team, err = 0;
#pragma omp atomic
  launches++;
  if (n == 1 || omp_in_parallel()) {          /* one task, or already inside a team: run inline */
    TVMParallelGroupEnv env = {0, 1};
    return flambda(0, &env, cdata);
  }
#pragma omp parallel num_threads(n)
  {
    TVMParallelGroupEnv env = {0, omp_get_num_threads()};
    int rc = flambda(omp_get_thread_num(), &env, cdata);
    if (rc != 0) {
#pragma omp atomic write
      err = rc;
    }
  }
  return err;
}
"""

_SHIM: ctypes.CDLL | None | bool = None      # False: unavailable (no compiler, or switched off)
_LOADED: list[ctypes.CDLL] = []               # every kernel library loaded in this process
_forked = False                               # this process is a fork() child (of one that imported this)


class _GroupEnv(ctypes.Structure):
    _fields_ = [("sync_handle", ctypes.c_void_p), ("num_task", ctypes.c_int)]


_LAMBDA = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.POINTER(_GroupEnv), ctypes.c_void_p)


@ctypes.CFUNCTYPE(ctypes.c_int, _LAMBDA, ctypes.c_void_p, ctypes.c_int)
def _inline_launch(flambda, cdata, num_task):
    """TVMBackendParallelLaunch without threads: the whole loop as task 0 of 1."""
    return flambda(0, ctypes.byref(_GroupEnv(None, 1)), cdata)


@ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
def _inline_barrier(task_id, penv):
    """TVMBackendParallelBarrier of a team of one: nothing to wait for."""
    return 0


def _set_pointer(so: ctypes.CDLL, symbol: str, fn) -> bool:
    try:
        ptr = ctypes.c_void_p.in_dll(so, symbol)
    except ValueError:                           # the library has no such hook
        return False
    ptr.value = ctypes.cast(fn, ctypes.c_void_p).value
    return True


def _run_inline(so: ctypes.CDLL) -> None:
    _set_pointer(so, "__TVMBackendParallelLaunch", _inline_launch)
    _set_pointer(so, "__TVMBackendParallelBarrier", _inline_barrier)


def _after_fork_in_child() -> None:
    global _forked
    _forked = True
    for so in _LOADED:
        _run_inline(so)


os.register_at_fork(after_in_child=_after_fork_in_child)


def _build(dst: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc)")
    from attndsl.cache import replace_atomically
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "omp_launch.c"
        src.write_text(SOURCE)
        replace_atomically(dst, lambda out: subprocess.run(
            [cc, "-O2", "-fPIC", "-shared", "-fopenmp", str(src), "-o", out], check=True, capture_output=True))


def shim() -> ctypes.CDLL | None:
    """The compiled launcher (cached under <cache>/omp), or None where it cannot be had."""
    global _SHIM
    if _SHIM is None:
        _SHIM = False
        if config.use_openmp():
            import torch  # noqa: F401  (loads torch's libgomp first, so the shim binds to it)
            path = config.cache_dir() / "omp" / f"launch-{hashlib.sha256(SOURCE.encode()).hexdigest()[:16]}.so"
            try:
                if not path.is_file():
                    _build(path)
                lib = ctypes.CDLL(str(path))
                lib.attndsl_set_threads(config.num_threads())
                _SHIM = lib
            except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
                if config.verbose():
                    print(f"attndsl: TVM's own thread pool for the kernels (OpenMP launcher: {e})")
    return _SHIM or None


def adopt(path: str | Path) -> bool:
    """Point the parallel launcher of the loaded library at `path` to the OpenMP shim; False
    (TVM's pool kept) where there is no shim, or the library has no parallel loops or uses
    TVM's barrier. In a forked child its loops run inline instead (False)."""
    so = ctypes.CDLL(str(path))                  # the loaded library itself (dlopen refcount)
    _LOADED.append(so)
    if _forked:
        _run_inline(so)
        return False
    lib = shim()
    if lib is None:
        return False
    try:
        ctypes.c_void_p.in_dll(so, "__TVMBackendParallelBarrier")
        return False                             # a barrier needs TVM's pool
    except ValueError:
        pass
    return _set_pointer(so, "__TVMBackendParallelLaunch", lib.attndsl_parallel_launch)

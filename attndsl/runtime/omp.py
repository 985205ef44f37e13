"""TVM's parallel loops on torch's OpenMP threads, so the two never fight over the cores.

A CPU kernel's `T.parallel` loop calls `TVMBackendParallelLaunch(f, cdata, num_task)` through a
function pointer that every compiled library exports (`__TVMBackendParallelLaunch`, set when
the library loads). By default that is TVM's own thread pool: a second set of worker threads
beside torch's OpenMP pool. torch's workers spin for a while after each op, so on a machine with
few cores a TVM kernel called between torch ops waits for them (measured here, 2 cores, softmax
N = 512 in bench_softmax.py's interleaved rounds: 17.5 ms against 8.1 ms with the OpenMP
workers told to sleep, OMP_WAIT_POLICY=PASSIVE).

`adopt(path)` points a loaded library's launcher at a small C function that runs the loop's
tasks as one OpenMP team in the libgomp torch has loaded (same soname, so the same runtime and
the same threads). The loop is cut into SPLIT tasks a thread; each thread runs its own share
first, in order (a static split's rows, so one loop's output is still in the cache of the thread
that reads it in the next), then claims what is left of the others' shares from their ends. The
shim is compiled once per machine with the C compiler TVM links kernels with, and cached.
Libraries that use TVM's parallel barrier keep TVM's pool. ATTNDSL_OPENMP=0, or no C compiler
with OpenMP, keeps TVM's pool everywhere.

A busy core: under libgomp's default wait policy an idle worker spins rather than sleeps, and a
spinning thread that shares its core with another process's waits its turn (milliseconds) to
see the next team start, or to go on with its task; the team's end waits for it. When the calling
thread, its own tasks and whatever it could take from the others done, waits at the team's end
more than LATE_NS and longer than it worked (more than a last task's imbalance), or was itself off
its core for more than LATE_NS and half the time it had work (one thread too many), the next loops
run inline on the calling thread alone for MIN_ALONE_NS, doubled while this recurs (up to
MAX_ALONE_NS), then a team is tried again (benchmarks/bench_busy.py). Meanwhile a module call runs
torch's own ops in it (sampling's sort and hashes, copies, sums) on the calling thread too
(`torch_alone`): each parallel torch op would wait for the late worker, a scheduler slice each
(measured here: kde's draw, ten such ops, took 10 ms or 90-130 ms by turns).

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
#include <time.h>
typedef struct { void* sync_handle; int num_task; } TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);
#define SPLIT 2                    /* tasks per thread */
#define MAX_TASKS 256
#define LATE_NS 500000L            /* the calling thread waiting this long for a team's workers... */
#define MIN_ALONE_NS 20000000L     /* ...and the loops run on the calling thread alone this long, */
#define MAX_ALONE_NS 1000000000L   /* doubled (up to this) while it recurs */
#define MEMORY_NS 10000000000L     /* within this of the last */
static int team = 1;
static long launches = 0, alone_until = 0, alone_for = 0, last_late = 0, last_worked = 0;
void attndsl_set_threads(int n) { team = n > 0 ? n : 1; }
long attndsl_launches(void) { return launches; }       /* for the tests: how often a kernel came here */
static long ns_of(clockid_t c) { struct timespec t; clock_gettime(c, &t); return t.tv_sec * 1000000000L + t.tv_nsec; }
static long now_ns(void) { return ns_of(CLOCK_MONOTONIC); }
void attndsl_alone(long ns) { __atomic_store_n(&alone_until, now_ns() + ns, __ATOMIC_RELAXED); }  /* the tests */
int attndsl_is_alone(void) { return now_ns() < __atomic_load_n(&alone_until, __ATOMIC_RELAXED); }

static void came_late(long end) {
  long was = __atomic_load_n(&alone_for, __ATOMIC_RELAXED);
  long ns = end - __atomic_load_n(&last_late, __ATOMIC_RELAXED) < MEMORY_NS ? 2 * was : MIN_ALONE_NS;
  ns = ns < MIN_ALONE_NS ? MIN_ALONE_NS : ns > MAX_ALONE_NS ? MAX_ALONE_NS : ns;
  __atomic_store_n(&alone_for, ns, __ATOMIC_RELAXED);
  __atomic_store_n(&last_late, end, __ATOMIC_RELAXED);
  __atomic_store_n(&alone_until, end + ns, __ATOMIC_RELAXED);
}

int attndsl_parallel_launch(FTVMParallelLambda flambda, void* cdata, int num_task) {
  int n = team, err = 0;
  __atomic_fetch_add(&launches, 1, __ATOMIC_RELAXED);
  long start = now_ns();
  if (n == 1 || omp_in_parallel() || start < __atomic_load_n(&alone_until, __ATOMIC_RELAXED)) {
    TVMParallelGroupEnv env = {0, 1};        /* one task, inside a team, or alone: run inline */
    return flambda(0, &env, cdata);
  }
  int tasks = num_task > 0 ? num_task : n * SPLIT;
  if (tasks > MAX_TASKS) tasks = MAX_TASKS;
  unsigned char claimed[MAX_TASKS] = {0};
  /* the thread's CPU clock is a system call: read only when loops run long */
  int timed = __atomic_load_n(&last_worked, __ATOMIC_RELAXED) > LATE_NS / 4;
  long master_done = start, cpu = timed ? ns_of(CLOCK_THREAD_CPUTIME_ID) : 0;
#pragma omp parallel num_threads(n)
  {
    TVMParallelGroupEnv env = {0, tasks};
    int me = omp_get_thread_num(), size = omp_get_num_threads();
    int lo = (int)((long)tasks * me / size), hi = (int)((long)tasks * (me + 1) / size), own = hi - lo;
    /* its own share first, in order (a static split's rows: caches stay warm), then what is
       left of the others' shares, from their ends */
    for (int j = 0; j < tasks; j++) {
      int k = j - own;
      int i = k < 0 ? lo + j : k < tasks - hi ? tasks - 1 - k : lo - 1 - (k - (tasks - hi));
      if (__atomic_exchange_n(&claimed[i], 1, __ATOMIC_ACQ_REL)) continue;
      int rc = flambda(i, &env, cdata);
      if (rc != 0) {
#pragma omp atomic write
        err = rc;
      }
    }
    if (me == 0) {
      master_done = now_ns();
      if (timed) cpu = ns_of(CLOCK_THREAD_CPUTIME_ID) - cpu;
    }
  }
  long end = now_ns();
  long waited = end - master_done, worked = master_done - start, off = timed ? worked - cpu : 0;
  __atomic_store_n(&last_worked, worked, __ATOMIC_RELAXED);
  if ((waited > LATE_NS && waited > worked) || (off > LATE_NS && 2 * off > worked))
    came_late(end);      /* waited for a worker off its core (not a last task), or was off ours */
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
                lib.attndsl_launches.restype = ctypes.c_long
                lib.attndsl_alone.argtypes = [ctypes.c_long]
                lib.attndsl_is_alone.restype = ctypes.c_int
                lib.attndsl_set_threads(config.num_threads())
                _SHIM = lib
            except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
                if config.verbose():
                    print(f"attndsl: TVM's own thread pool for the kernels (OpenMP launcher: {e})")
    return _SHIM or None


def torch_alone() -> int:
    """While the kernels' loops run alone (a worker came late: a core is busy), torch's ops on this
    thread run alone too: torch.set_num_threads(1), and the count to restore after is returned
    (0: nothing changed, as on a quiet machine or without the shim). The count is torch's
    process-wide setting: other threads' torch ops see it meanwhile."""
    lib = _SHIM or None
    if lib is None or not lib.attndsl_is_alone():
        return 0
    import torch
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
        return n
    return 0


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

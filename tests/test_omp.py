"""attndsl/runtime/omp.py: the CPU kernels' parallel loops on torch's OpenMP threads."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import attndsl
from attndsl import config
from attndsl.runtime import omp

from conftest import RTOL, assert_close, shared

pytestmark = pytest.mark.skipif(omp.shim() is None, reason="no C compiler with OpenMP here")


def launches() -> int:
    return omp.shim().attndsl_launches()


@pytest.mark.parametrize("body", ["", "mask = causal", "kernel = elu1; position = toeplitz(max_distance=9)"],
                         ids=["softmax", "softmax-causal", "banded"])
def test_kernels_run_on_the_openmp_launcher_and_match_the_reference(body):
    attn = attndsl.compile(f"attention t {{ {body} }}", heads=2, head_dim=16)
    q, k, v = (torch.randn(2, 2, 300, 16, requires_grad=True) for _ in range(3))
    ref = attn.reference(*(t.double() for t in (q, k, v)))
    before = launches()
    out = attn(q, k, v)
    assert launches() > before                         # a hit, or a miss loaded back from disk
    assert_close("out", ref, out, RTOL[torch.float32])
    before = launches()
    out.sum().backward()                               # the backward's parallel loops too
    assert launches() > before and torch.isfinite(q.grad).all()


def test_one_openmp_runtime_in_the_process():
    """The shim binds to the libgomp torch loaded (same soname), so there is one pool of threads."""
    maps = [line.split()[-1] for line in open("/proc/self/maps") if "gomp" in line]
    assert len(set(maps)) == 1, maps


def test_a_library_without_parallel_loops_keeps_tvm_s_launcher(tmp_path):
    from tvm import te

    from attndsl.runtime.load import load_library
    a = te.placeholder((4,), "float32", "a")
    b = te.compute((4,), lambda i: a[i] + 1, "b")
    import tvm
    so = tmp_path / "plain.so"
    tvm.compile(te.create_prim_func([a, b]).with_attr("global_symbol", "f"), target="llvm").export_library(str(so))
    load_library(so)
    assert omp.adopt(so) is False


def test_attndsl_openmp_0_keeps_tvm_s_pool():
    code = ("import attndsl; from attndsl.runtime import omp; "
            "a = attndsl.compile('attention t { }', heads=1, head_dim=8); print(omp.shim())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "ATTNDSL_OPENMP": "0"})
    assert out.stdout.strip() == "None"
    assert "ATTNDSL_OPENMP" in config.describe()


def _launch(num_task: int = 0, fail: int | None = None, alone: bool = False) -> tuple[int, list]:
    """The launcher run on a loop whose tasks record (task, num_task): its rc and the records.
    alone: told to run loops alone for the next 10 s (else as if no worker had come late before)."""
    seen = []
    omp.shim().attndsl_alone(10 ** 10 if alone else 0)

    @omp._LAMBDA
    def task(i, env, cdata):
        seen.append((i, env.contents.num_task))
        return 7 if i == fail else 0
    return omp.shim().attndsl_parallel_launch(task, None, num_task), sorted(seen)


@pytest.mark.skipif(config.num_threads() < 2, reason="one thread: every loop runs inline")
@pytest.mark.parametrize("num_task", [0, 5])
def test_the_launcher_runs_every_task_once(num_task):
    rc, seen = _launch(num_task)
    tasks = num_task or 2 * config.num_threads()         # SPLIT tasks a thread unless TVM asks
    assert rc == 0 and seen == [(i, tasks) for i in range(tasks)]
    assert _launch(num_task, fail=1)[0] == 7             # a task's error is the loop's


def test_loops_run_alone_when_told_and_kernels_still_match():
    """What a late worker leads to: the loops inline on the calling thread."""
    attn = attndsl.compile("attention t { kernel = elu1; position = toeplitz(max_distance=9); mask = causal }",
                           heads=2, head_dim=16)
    q, k, v = (torch.randn(2, 2, 300, 16) for _ in range(3))
    team = attn(q, k, v)
    try:
        assert _launch(alone=True)[1] == [(0, 1)]
        alone = attn(q, k, v)
    finally:
        omp.shim().attndsl_alone(0)
    assert_close("out", team, alone, 1e-6)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="torch runs one thread: nothing to set")
def test_a_call_runs_torchs_ops_alone_while_the_loops_do(monkeypatch):
    """On a busy core (the loops told to run alone) a module call runs its torch ops with one
    thread, and gives torch its thread count back after, a failed call too."""
    attn = shared("attention t { sampling = kde(buckets=4, block=8, samples=16, seed=0) }", heads=2, head_dim=16)
    seen, real = [], attn._attend
    monkeypatch.setattr(attn, "_attend", lambda *a: (seen.append(torch.get_num_threads()), real(*a))[1])
    q, k, v = (torch.randn(2, 2, 40, 16) for _ in range(3))
    threads = torch.get_num_threads()
    quiet = attn(q, k, v)
    omp.shim().attndsl_alone(10 ** 10)
    try:
        busy = attn(q, k, v)
        with pytest.raises(ValueError, match="key_padding_mask"):
            attn(q, k, v, key_padding_mask=torch.zeros(2, 39, dtype=torch.bool))
    finally:
        omp.shim().attndsl_alone(0)
    assert seen == [threads, 1, 1] and torch.get_num_threads() == threads
    assert_close("out", quiet, busy, 1e-6)

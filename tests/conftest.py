"""Shared fixtures: a private compile cache per run, shared compiled modules, seeded randomness,
tolerances."""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

# float32 kernels vs the float64 reference; float64 kernels vs the same
RTOL = {torch.float32: 2e-5, torch.float64: 1e-11, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def pytest_configure(config):
    """A private compile cache for the run, unless ATTNDSL_CACHE_DIR names one: made before the
    test workers (pytest -n) start, so they all share it (a library one worker built is a load
    for the others)."""
    # plans by flop counts, the same on every CPU (tests/test_calibration.py turns the shipped
    # calibration of this CPU class back on where it tests it)
    os.environ.setdefault("ATTNDSL_UNCALIBRATED", "1")
    if "ATTNDSL_CACHE_DIR" not in os.environ and not hasattr(config, "workerinput"):
        config._attndsl_cache = tempfile.mkdtemp(prefix="attndsl-test-cache-")
        os.environ["ATTNDSL_CACHE_DIR"] = config._attndsl_cache


def pytest_unconfigure(config):
    folder = getattr(config, "_attndsl_cache", None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
        del os.environ["ATTNDSL_CACHE_DIR"]


_SHARED: dict = {}


def shared(text: str, name: str | None = None, init=None, **kw):
    """attndsl.compile(text, name, **kw), once per test process for every test that asks for the
    same spec, arguments and `init`. Nothing is built up front (dtype=None): each dtype's kernels
    build at their first call, so a float64-only use never builds float32. `init(module)`, a
    module-level function, prepares it once (e.g. a position table far from its zero init); no
    caller may mutate it otherwise (build your own module for that)."""
    import attndsl
    key = (text, name, init and f"{init.__module__}.{init.__qualname__}", tuple(sorted(kw.items(), key=str)))
    if key not in _SHARED:
        attn = attndsl.compile(text, name, dtype=None, **kw)
        if init is not None:
            init(attn)
        _SHARED[key] = attn
    return _SHARED[key]


def shared_form(entry: tuple, **kw):
    """shared() of a test table's entry (spec text, plan, the forms the plan at N = 4096 runs),
    checking that it plans those forms."""
    text, plan, forms = entry
    attn = shared(text, plan=plan, **kw)
    assert [d.form for d in attn.planned.decisions] == forms
    return attn


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _launcher_team():
    """The OpenMP launcher (attndsl/runtime/omp.py) loaded before any test runs, so that its team
    is the machine's thread count, not what a test patches config.num_threads to."""
    from attndsl.runtime import omp
    omp.shim()


@pytest.fixture(autouse=True)
def _tvm_threads_kept():
    """A build exports config.num_threads() as TVM_NUM_THREADS (config.export_tvm_threads), which
    num_threads() then reads: a test that patches it leaves its count to no test after it."""
    kept = os.environ.get("TVM_NUM_THREADS")
    yield
    if kept is None:
        os.environ.pop("TVM_NUM_THREADS", None)
    else:
        os.environ["TVM_NUM_THREADS"] = kept


def spy_on(monkeypatch, op: str) -> list:
    """The shapes of the first two inputs (q, k or their features) and the kernels' name of every
    call of kernel op `op`."""
    from attndsl import ops
    seen, real = [], getattr(ops.fast, op)

    def spy(q, k, *rest):
        seen.append((tuple(q.shape), tuple(k.shape), rest[-1]))
        return real(q, k, *rest)
    monkeypatch.setattr(ops.fast, op, spy)
    return seen


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def assert_close(name: str, ref: torch.Tensor, got: torch.Tensor, rtol: float) -> None:
    err = rel_err(got, ref)
    assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol:.0e}"


def assert_matches_reference(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             dtype: torch.dtype) -> torch.Tensor:
    """attn on q, k, v in `dtype` against its reference in float64, forward and dq, dk, dv for one
    random output gradient (RTOL, 20·RTOL); returns the compiled output."""
    q64, k64, v64 = (t.detach().double().clone().requires_grad_() for t in (q, k, v))
    ref = attn.reference(q64, k64, v64)
    qc, kc, vc = (t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v))
    out = attn(qc, kc, vc)
    assert_close("out", ref, out, RTOL[dtype])
    g = torch.randn_like(ref)
    ref.backward(g)
    out.backward(g.to(dtype))
    for name, a, b in (("dq", q64, qc), ("dk", k64, kc), ("dv", v64, vc)):
        assert_close(name, a.grad, b.grad, 20 * RTOL[dtype])
    return out


def assert_masked_matches_reference(attn, q, k, v, mask, dtype):
    """attn on q, k, v with the key padding mask `mask` (or None) in `dtype` against its float64
    reference: forward, and dq, dk, dv and the position table's gradient (where the module learns
    one) for one random output gradient (RTOL, 20·RTOL), every gradient finite; returns the output."""
    q64, k64, v64 = (t.detach().double().clone().requires_grad_() for t in (q, k, v))
    ref = attn.reference(q64, k64, v64, key_padding_mask=mask)
    qc, kc, vc = (t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v))
    out = attn(qc, kc, vc, key_padding_mask=mask)
    assert_close("out", ref, out, RTOL[dtype])
    g = torch.randn_like(ref)
    table = attn.position_table
    wrt = [q64, k64, v64] + ([table] if table is not None else [])
    want = torch.autograd.grad(ref, wrt, g)
    got = torch.autograd.grad(out, [qc, kc, vc] + wrt[3:], g.to(dtype))
    for what, a, b in zip(("dq", "dk", "dv", "dtable"), want, got):
        assert torch.isfinite(b).all(), what
        assert_close(what, a, b, 20 * RTOL[dtype])
    return out


def gradcheck_with_table(attn, q, k, v):
    """float64 gradcheck in q, k, v and the position table (as an input, where the module has one)."""
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    params = {}
    if attn.position_table is not None:
        params["position_table"] = attn.position_table.detach().double().clone().requires_grad_()

    def f(q, k, v, *tab):
        return torch.func.functional_call(attn, dict(zip(params, tab)), (q, k, v))
    assert torch.autograd.gradcheck(f, (q, k, v, *params.values()), eps=1e-6, atol=1e-7, rtol=1e-5)

"""Knob spaces, the meta_schedule database round trip, and a tiny tune through meta_schedule."""
import re

import pytest

from attndsl import pipeline
from attndsl.parse import parse
from attndsl.schedules import knobs


def test_grid_starts_with_the_default_and_covers_every_choice():
    grid = knobs.grid("linear")
    assert grid[0] == knobs.defaults("linear")
    assert len(grid) == len({tuple(sorted(g.items())) for g in grid}) == 9


@pytest.mark.parametrize("bad, match", [({"chunks": 32}, "no knob 'chunks'"), ({"chunk": 48}, "chunk=48")])
def test_resolve_rejects_unknown_knobs_and_choices(bad, match):
    with pytest.raises(ValueError, match=match):
        knobs.resolve("linear", bad)


def test_trace_decisions_round_trip():
    from attndsl.lowering.cpu import linear
    from attndsl.schedules import database
    mod = database.workload(linear.linear_forward("k", 16, 16, "float32", True))
    choice = {"chunk": 64, "tile_regs": 8}
    assert database.choice_of(database.trace_of(mod, "linear", choice), "linear") == choice


# (the linear family: test_cli_tune_writes_a_database_and_chooses_from_it)
@pytest.mark.parametrize("text, plan, family", [
    # its FFT length, a scalar parameter, is specialized per length
    ("attention t { kernel = elu1; position = toeplitz(max_distance=64) }", "toeplitz_fft", "toeplitz"),
    ("attention t { kernel = elu1; position = toeplitz(max_distance=8) }", "banded", "banded"),
    # int32 row orders and sample rows: timed with in-bounds indices (tune._index_buffers)
    ("attention t { sampling = kde(buckets=4, block=16, samples=8, seed=0) }", "auto", "quadratic"),
])
def test_tune_records_and_choose_reads_them(tmp_path, text, plan, family):
    """Two candidates of the family's forward kernel at N = 64 (the CLI test tunes a backward one
    too), timed by meta_schedule's LocalRunner, committed to a JSONDatabase that choose() then
    reads back."""
    import tvm
    from attndsl.lowering import lower, tune
    from attndsl.lowering.build import resolve_target
    from attndsl.schedules import database
    root = pipeline.run(parse(text).block(None), 16, 16, plan_name=plan).root
    forward = [k for k in tune.tunable(root, False) if k.endswith("_fwd")]
    rows = tune.tune(root, "float32", sizes={"BH": 2, "H": 2, "P": 129, "S": 8, "block": 16}, lengths=[64], trials=2,
                     db_folder=tmp_path, repeat=2, progress=lambda s: None, kernels=forward)
    assert rows and all(len(r.times) == 2 and not r.errors for r in rows)
    target = tvm.target.Target(resolve_target("llvm"))
    funcs = lower(root, "float32")
    for r in rows:
        assert r.family == family
        choice = database.choose(database.open_dbs([tmp_path]), funcs[r.kernel], family, target)
        assert choice is not None and knobs.label(choice.knobs) == r.best[0]
    assert "| speed-up |" in tune.summary(rows)


def test_cli_tune_writes_a_database_and_chooses_from_it(tmp_path, capsys):
    """`attndsl tune` times two candidates of the linear kernels and prints the summary; choose()
    reads the best back."""
    import tvm
    from attndsl.cli import main
    from attndsl.lowering import lower
    from attndsl.lowering.build import resolve_target
    from attndsl.schedules import database
    text = "attention t {\n  kernel = relu\n  mask = causal\n}\n"
    spec = tmp_path / "t.attn"
    spec.write_text(text)
    db = tmp_path / "db"
    assert main(["tune", str(spec), "--heads", "2", "--head-dim", "16", "--lengths", "64",
                 "--trials", "2", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "tuning t" in out and "| speed-up |" in out and re.search(r"\| \d+\.\d\dx \|", out)
    assert (db / "database_tuning_record.json").stat().st_size > 0
    funcs = lower(pipeline.run(parse(text).block(None), 16, 16).root, "float32")
    target = tvm.target.Target(resolve_target("llvm"))
    linear = [f for name, f in funcs.items() if name.startswith("linear_attention")]
    assert len(linear) == 2
    for func in linear:
        choice = database.choose(database.open_dbs([db]), func, "linear", target)
        assert choice is not None and choice.knobs in knobs.grid("linear") and choice.speedup >= 1.0


def test_cli_tune_rejects_a_bad_tracker_address(tmp_path, capsys):
    from attndsl.cli import main
    spec = tmp_path / "t.attn"
    spec.write_text("attention t {\n  kernel = relu\n}\n")
    assert main(["tune", str(spec), "--rpc-tracker", "nohostport", "--rpc-key", "k"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err


def _linear_torch(qf, kf, v, causal):
    a = qf @ kf.transpose(1, 2)
    if causal:
        a = a.tril()
    den = a.sum(-1)
    return (a @ v) / den[..., None], den


@pytest.mark.parametrize("choice", knobs.grid("linear"), ids=knobs.label)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_every_linear_knob_choice_computes_the_same_attention(choice, causal):
    """Each choice's forward and backward kernels against the maths in torch (float64, a ragged
    length, so tail chunks are exercised for every chunk size)."""
    import torch

    from attndsl.lowering.cpu import linear
    from attndsl.lowering.build import build, resolve_target
    M = D = 16
    lib = build({"f": linear.linear_forward("f", M, D, "float64", causal, knobs=choice),
                 "b": linear.linear_backward("b", M, D, "float64", causal, knobs=choice)},
                resolve_target("llvm"))
    g = torch.Generator().manual_seed(0)
    qf, kf = (torch.rand(3, 77, M, generator=g, dtype=torch.float64) + 0.1 for _ in range(2))
    v, dout = (torch.randn(3, 77, D, generator=g, dtype=torch.float64) for _ in range(2))
    tab = torch.zeros(1, 1, dtype=torch.float64)
    out, den = torch.empty_like(v), torch.empty(3, 77, dtype=torch.float64)
    lib["f"](qf, kf, v, tab, out, den)
    leaves = [t.clone().requires_grad_() for t in (qf, kf, v)]
    ref_out, ref_den = _linear_torch(*leaves, causal)
    torch.testing.assert_close(out, ref_out.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(den, ref_den.detach(), rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(ref_out, leaves, dout)
    mine = [torch.empty_like(t) for t in (qf, kf, v)]
    lib["b"](qf, kf, v, tab, out, den, dout, *mine)
    for got, want in zip(mine, grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def _positional_kernels_match_torch(lib, M, D, W, N, H, causal, *extra):
    """lib["f"], lib["b"] (a PositionalAttention form's kernels, a learned table clipped at W)
    against the maths in torch, float64: out, the normalizer up to its per-head shift, and the
    gradients of Qf, Kf, V and the table. `extra`: the kernels' trailing scalars (abi.py)."""
    import torch
    g = torch.Generator().manual_seed(1)
    qf, kf = (torch.rand(H, N, M, generator=g, dtype=torch.float64) + 0.1 for _ in range(2))
    v, dout = (torch.randn(H, N, D, generator=g, dtype=torch.float64) for _ in range(2))
    tab = 0.3 * torch.randn(H, 2 * W + 1, generator=g, dtype=torch.float64)
    out, den = torch.empty_like(v), torch.empty(H, N, dtype=torch.float64)
    lib["f"](qf, kf, v, tab, out, den, *extra)

    leaves = [t.clone().requires_grad_() for t in (qf, kf, v, tab)]
    r = torch.arange(N)[:, None] - torch.arange(N)[None, :]
    c = leaves[3][:, (r.clamp(-W, W) + W)].exp()                   # (H, N, N): exp b(i − j)
    a = c * (leaves[0] @ leaves[1].transpose(1, 2))
    if causal:
        a = a * (r >= 0)
    ref_den = a.sum(-1)
    ref = (a @ leaves[2]) / ref_den[..., None]
    torch.testing.assert_close(out, ref.detach(), rtol=1e-9, atol=1e-11)
    # the kernel's normalizer carries c = exp(b − max b), a per-head factor that cancels in out
    ratio = den / ref_den.detach()
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-9, atol=0)
    grads = torch.autograd.grad(ref, leaves, dout)
    mine = [torch.empty_like(t) for t in (qf, kf, v)] + [torch.zeros_like(tab)]
    lib["b"](qf, kf, v, tab, out, den, dout, *mine, *extra)
    for got, want in zip(mine, grads):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("block_kb", knobs.SPACES["toeplitz"][0].choices)
def test_every_toeplitz_block_size_computes_the_same_attention(block_kb):
    """The Toeplitz-FFT scores kernels at each work-buffer block size (here L = 128: 1 KiB takes the
    second level of blocks, the others one) against the maths in torch, forward and backward with
    the table's gradient (float64)."""
    from attndsl.lowering.cpu import toeplitz
    from attndsl.lowering.fft import packed as fftlib
    from attndsl.lowering.build import build, resolve_target
    from attndsl.lowering.costs import fft_length
    fftlib.register()
    M = D = 16
    W, N, H = 8, 45, 2
    pos = parse("attention t {\n kernel = relu\n position = toeplitz(max_distance=8)\n}").block(None).position
    knob = {"block_kb": block_kb}
    lib = build({"f": toeplitz.scores_forward("f", M, D, "float64", False, pos, knob),
                 "b": toeplitz.scores_backward("b", M, D, "float64", False, pos, True, knob)},
                resolve_target("llvm"))
    _positional_kernels_match_torch(lib, M, D, W, N, H, False, fft_length(N))


@pytest.mark.parametrize("chunk", knobs.SPACES["banded"][0].choices)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_every_banded_chunk_computes_the_same_attention(chunk, causal):
    """The banded kernels at each chunk size against the maths in torch (float64, W = 20 < N = 150,
    a ragged length: each chunk size has windows of 1–2 chunks a side, far keys on both sides and
    a tail chunk), forward and backward with the table's gradient."""
    from attndsl.lowering.cpu import banded
    from attndsl.lowering.build import build, resolve_target
    M, D = 16, 8
    knob = {"chunk": chunk}
    lib = build({"f": banded.banded_forward("f", M, D, "float64", causal, knob),
                 "b": banded.banded_backward("b", M, D, "float64", causal, knob)},
                resolve_target("llvm"))
    _positional_kernels_match_torch(lib, M, D, 20, 150, 2, causal)


def _record(db_folder, root, kernel, family, times: dict, n=64, target="llvm", portable=False, P=1):
    """Commit `times` {knob label: seconds} for `kernel` as if measured at length n on `target`
    (this CPU by default); `portable`: of the portable kernels (GPU targets' ones)."""
    import tvm
    from attndsl.lowering import lower, tune
    from attndsl.lowering.build import resolve_target
    from attndsl.lowering.target import resolve
    from attndsl.schedules import database
    func = lower(root, "float32", portable=portable, gpu=resolve(target).gpu)[kernel]
    db = database.open_db(db_folder)
    wl = db.commit_workload(database.workload(func))
    info = tune.arg_shapes(func, {"BH": 2, "H": 2, "P": P, "N": n})
    target = tvm.target.Target(resolve_target(target))
    for choice in knobs.grid(family):
        if knobs.label(choice) in times:
            database.commit(db, wl, family, choice, [times[knobs.label(choice)]] * 2, target, info)


def test_compile_builds_the_recorded_choice_and_a_cache_hit_keeps_it(tmp_path, monkeypatch):
    """A record that makes chunk=16 the best: compile() builds it (same answer as the reference),
    explain() says so, and the next compile is a cache hit under 1 s that still knows the choice."""
    import time
    import torch
    import attndsl
    from attndsl import lowering
    from conftest import RTOL, assert_close
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ATTNDSL_TUNING_DB", str(tmp_path / "db"))
    text = "attention t { kernel = elu1; mask = causal }"
    root = pipeline.run(parse(text).block(None), 16, 16).root
    fwd = next(k for k in lowering.tunable(root) if k.endswith("_fwd"))
    _record(tmp_path / "db", root, fwd, "linear",
            {"chunk=32 tile_regs=16": 2e-3, "chunk=16 tile_regs=16": 1e-3, "chunk=64 tile_regs=4": 4e-3})
    seen = []
    real = lowering.lower
    monkeypatch.setattr(lowering, "lower", lambda *a, **kw: seen.append(a[2] if len(a) > 2 else
                                                                         kw.get("knobs")) or real(*a, **kw))
    attn = attndsl.compile(text, heads=2, head_dim=16)
    assert {fwd: {"chunk": 16, "tile_regs": 16}} in seen
    assert f"{fwd} chunk=16 tile_regs=16  (2.00x the defaults at N=64" in attn.explain()
    q, k, v = (torch.randn(1, 2, 80, 16, dtype=torch.float64) for _ in range(3))
    got = attn(q.float(), k.float(), v.float())
    assert_close("tuned forward", attn.reference(q, k, v), got, 10 * RTOL[torch.float32])

    seen.clear()
    t0 = time.perf_counter()
    again = attndsl.compile(text, heads=2, head_dim=16)
    assert time.perf_counter() - t0 < 1.0 and not seen          # no lowering on a hit
    assert "loaded from cache" in again.explain() and "chunk=16 tile_regs=16  (2.00x" in again.explain()

    monkeypatch.setenv("ATTNDSL_UNTUNED", "1")
    untuned = attndsl.compile(text, heads=2, head_dim=16)
    assert "default knobs (no tuning database" in untuned.explain()


def _free_port() -> int:
    """A TCP port the OS has just handed out on loopback (free unless raced for)."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_tune_through_a_loopback_rpc_tracker_and_server(tmp_path):
    """TVM's own RPC tracker and one server (with the FFT functions registered) on loopback: the
    tuner's RPCRunner gets the server from the tracker by key and times a tiny kernel on it."""
    import time
    from tvm import rpc
    from tvm.rpc import server, tracker
    from attndsl.lowering import tune
    port, port2 = _free_port(), _free_port()         # no fixed ports: another run may hold them
    trk = tracker.Tracker("127.0.0.1", port=port, port_end=port + 1, silent=True)
    srv = server.Server("127.0.0.1", port=port2, port_end=port2 + 1, tracker_addr=("127.0.0.1", trk.port),
                        key="attndsl-test", silent=True, server_init_callback=tune._runner_init)
    try:
        deadline = time.time() + 60                  # the server registers asynchronously: poll
        while "attndsl-test" not in rpc.connect_tracker("127.0.0.1", trk.port).text_summary():
            assert time.time() < deadline, "the server never registered with the tracker"
            time.sleep(0.05)
        root = pipeline.run(parse("attention t { kernel = relu }").block(None), 16, 16).root
        rows = tune.tune(root, "float32", sizes={"BH": 2, "H": 2, "P": 1}, lengths=[64], trials=2,
                         db_folder=tmp_path, repeat=2, rpc=("127.0.0.1", trk.port, "attndsl-test"),
                         progress=lambda s: None, kernels=["linear_attention3_fwd"])
        assert rows and all(len(r.times) == 2 and not r.errors for r in rows), [r.errors for r in rows]
        assert (tmp_path / "database_tuning_record.json").stat().st_size > 0
    finally:
        srv.terminate()
        trk.terminate()


def test_the_shipped_database_still_matches_the_kernels_it_was_tuned_for():
    """schedules/tuned/ keys its records by the kernels' code: an edit of lowering/cpu/linear.py that
    changes them makes the records stale (never applied). Then re-tune: `make tuned-db`."""
    from attndsl import lowering
    from attndsl.lowering.build import resolve_target
    from attndsl.schedules import lookup
    from attndsl.schedules import knobs as knob_spaces
    root = pipeline.run(parse("attention t { kernel = elu1; mask = causal }").block(None), 64, 64).root
    _, chosen = lowering.lower_tuned(root, "float32", [lookup.SHIPPED], resolve_target("llvm"))
    if not chosen and resolve_target("llvm")["mcpu"] not in ("znver3", "znver4"):
        pytest.skip("the shipped records are for znver3 and znver4; this CPU is another class")
    assert set(chosen) == set(lowering.tunable(root)), "schedules/tuned/ is stale: run `make tuned-db`"
    assert all(c.knobs != knob_spaces.defaults("linear") and c.speedup > 1 for c in chosen.values())


@pytest.mark.parametrize("tile", knobs.SPACES["quadratic"][0].choices)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_every_quadratic_tile_computes_the_same_attention(tile, causal):
    """The softmax kernels at each tile size against softmax in torch (float64, a ragged length,
    a learned table), forward with its log-sum-exp and backward with the table's gradient."""
    import torch

    from attndsl.lowering.build import build, resolve_target
    from attndsl.lowering.cpu import quadratic
    from attndsl.padding import KEY_OUT
    D, W, N, H, s = 16, 8, 77, 2, 0.25
    pos = parse("attention t {\n position = toeplitz(max_distance=8)\n}").block(None).position
    knob = {"tile": tile}
    lib = build({"f": quadratic.softmax_forward("f", D, D, "float64", causal, s, pos, knob),
                 "b": quadratic.softmax_backward("b", D, D, "float64", causal, s, pos, True, knob)},
                resolve_target("llvm"))
    g = torch.Generator().manual_seed(2)
    q, k, v, dout = (torch.randn(H, N, D, generator=g, dtype=torch.float64) for _ in range(4))
    tab = 0.3 * torch.randn(H, 2 * W + 1, generator=g, dtype=torch.float64)
    kb = torch.zeros(H, N, dtype=torch.float64)
    kb[0, [3, 40, 76]] = KEY_OUT                  # padded keys (attndsl/padding.py)
    kb[1, 5] = -0.7
    out, lse = torch.empty_like(v), torch.empty(H, N, dtype=torch.float64)
    lib["f"](q, k, v, tab, kb, out, lse)

    leaves = [t.clone().requires_grad_() for t in (q, k, v, tab)]
    r = torch.arange(N)[:, None] - torch.arange(N)[None, :]
    scores = s * leaves[0] @ leaves[1].transpose(1, 2) + leaves[3][:, r.clamp(-W, W) + W] + kb[:, None, :]
    if causal:
        scores = scores.masked_fill(r < 0, float("-inf"))
    ref = torch.softmax(scores, -1) @ leaves[2]
    torch.testing.assert_close(out, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1).detach(), rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(ref, leaves, dout)
    mine = [torch.empty_like(t) for t in (q, k, v)] + [torch.zeros_like(tab)]
    lib["b"](q, k, v, tab, kb, out, lse, dout, *mine)
    for got, want in zip(mine, grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_drop_target_keeps_the_other_cpu_classes_records(tmp_path):
    """`make tuned-db` re-measures one CPU class: drop_target removes that class's records and the
    workloads only they used; another class's records still choose the same knobs."""
    import tvm
    from attndsl import lowering
    from attndsl.lowering import lower
    from attndsl.schedules import database
    root = pipeline.run(parse("attention t { kernel = elu1; mask = causal }").block(None), 16, 16).root
    fwd, bwd = sorted(lowering.tunable(root))[::-1]            # *_fwd, *_bwd
    funcs = lower(root, "float32")
    host, other = {"kind": "llvm", "mcpu": "znver4"}, {"kind": "llvm", "mcpu": "skylake-avx512"}
    db = database.open_db(tmp_path)
    for kernel, targets in ((fwd, (host,)), (bwd, (host, other))):
        wl = db.commit_workload(database.workload(funcs[kernel]))
        for target in targets:
            for choice, secs in ((knobs.defaults("linear"), 2e-3), ({"chunk": 64, "tile_regs": 4}, 1e-3)):
                database.commit(db, wl, "linear", choice, [secs], tvm.target.Target(target),
                                tune_info(funcs[kernel]))
    assert database.drop_target(tmp_path, host) == 4       # 2 choices × 2 kernels
    dbs = database.open_dbs([tmp_path])
    assert database.choose(dbs, funcs[fwd], "linear", tvm.target.Target(host)) is None
    assert database.choose(dbs, funcs[bwd], "linear", tvm.target.Target(host)) is None
    kept = database.choose(dbs, funcs[bwd], "linear", tvm.target.Target(other))
    assert kept.knobs == {"chunk": 64, "tile_regs": 4} and kept.speedup == pytest.approx(2.0)
    assert len((tmp_path / "database_workload.json").read_text().splitlines()) == 1
    assert database.drop_target(tmp_path, host) == 0


def tune_info(func):
    from attndsl.lowering import tune
    return tune.arg_shapes(func, {"BH": 2, "H": 2, "P": 1, "N": 64})

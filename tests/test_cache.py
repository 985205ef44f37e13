"""The on-disk compile cache: hits, keys, damaged entries, no cache, two processes racing, a lock
holder that does not finish, junk in the cache folder."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

tvm = pytest.importorskip("tvm")
from tvm import te  # noqa: E402

from attndsl import cache, config  # noqa: E402
from attndsl.cache import AttndslCacheWarning  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def double_lib():
    """A one-kernel TVM library: double(A, B) sets B = 2·A for any length."""
    n = te.var("n", "int64")
    a = te.placeholder((n,), "float32", name="A")
    b = te.compute((n,), lambda i: a[i] * 2.0, name="B")
    f = te.create_prim_func([a, b]).with_attr("global_symbol", "double")
    return tvm.compile(tvm.IRModule({"double": f}), target={"kind": "llvm"})


def runs_correctly(lib) -> bool:
    x = torch.arange(7, dtype=torch.float32)
    y = torch.empty_like(x)
    lib["double"](x, y)
    return torch.equal(y, 2 * x)


class Counted:
    """A build function that counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return double_lib()


def entry(key: str) -> tuple[Path, Path]:
    folder = config.cache_dir() / key[:2]
    return folder / f"{key}.so", folder / f"{key}.json"


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(d))
    for flag in ("ATTNDSL_NO_CACHE", "ATTNDSL_VERBOSE"):
        monkeypatch.delenv(flag, raising=False)
    return d


def load(key, build, label="double"):
    """load_or_build, failing on any cache warning (the tests that expect one catch it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", AttndslCacheWarning)
        return cache.load_or_build(key, build, label=label)


# --- hits and keys -------------------------------------------------------------------------------

def test_miss_then_hit(cache_dir):
    build, key = Counted(), cache.make_key(spec="double")
    lib, hit = load(key, build)
    assert (hit, build.calls) == (False, 1) and runs_correctly(lib)
    lib, hit = load(key, build)
    assert (hit, build.calls) == (True, 1) and runs_correctly(lib)
    [e] = cache.entries()
    assert e["label"] == "double" and e["ok"] and e["path"] == str(entry(key)[0])


def test_cached_load_is_fast(cache_dir):
    key = cache.make_key(spec="double")
    load(key, double_lib)
    t0 = time.perf_counter()
    _, hit = load(key, double_lib)
    assert hit and time.perf_counter() - t0 < 0.2


BASE = dict(spec="y = softmax(q k) v", shapes=[64, 64], dtype="float32", target={"kind": "llvm"},
            source="def kernel(): ...")
CHANGED = dict(spec="y = exp(q k) v", shapes=[64, 32], dtype="float64",
               target={"kind": "llvm", "mcpu": "znver3"}, source="def kernel(): pass")


@pytest.mark.parametrize("part", list(CHANGED))
def test_key_changes_with_each_part(part):
    assert cache.make_key(**BASE) != cache.make_key(**{**BASE, part: CHANGED[part]})


def test_key_is_stable_and_includes_format(monkeypatch):
    key = cache.make_key(**BASE)
    assert key == cache.make_key(**dict(reversed(BASE.items()))) and len(key) == 64
    monkeypatch.setattr(cache, "CACHE_FORMAT", cache.CACHE_FORMAT + 1)
    assert cache.make_key(**BASE) != key


# --- damaged entries are rebuilt, with a warning naming the file -----------------------------------

def garbage(so, meta):
    so.write_bytes(os.urandom(so.stat().st_size))


def truncated(so, meta):
    so.write_bytes(so.read_bytes()[: so.stat().st_size // 2])


def no_metadata(so, meta):
    meta.unlink()


def no_library(so, meta):
    so.unlink()


def hash_mismatch(so, meta):
    info = json.loads(meta.read_text())
    meta.write_text(json.dumps({**info, "sha256": "0" * 64}))


def unloadable(so, meta):
    """Garbage whose metadata agrees with it: only loading it shows the damage."""
    garbage(so, meta)
    info = json.loads(meta.read_text())
    meta.write_text(json.dumps({**info, "sha256": hashlib.sha256(so.read_bytes()).hexdigest()}))


@pytest.mark.parametrize("damage", [garbage, truncated, no_metadata, no_library, hash_mismatch,
                                    unloadable], ids=lambda f: f.__name__)
def test_damaged_entry_is_rebuilt(cache_dir, damage):
    build, key = Counted(), cache.make_key(spec="double")
    load(key, build)
    so, meta = entry(key)
    damage(so, meta)
    with pytest.warns(AttndslCacheWarning, match=f"{key}.so"):
        lib, hit = cache.load_or_build(key, build, label="double")
    assert (hit, build.calls) == (False, 2) and runs_correctly(lib)
    lib, hit = load(key, build)                          # and the rebuilt entry is whole again
    assert (hit, build.calls) == (True, 2) and runs_correctly(lib)


# --- when the cache cannot or must not be used -----------------------------------------------------

def test_unwritable_cache_dir_still_compiles(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")                 # a folder below a file: unwritable, even as root
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(tmp_path / "a_file" / "cache"))
    build, key = Counted(), cache.make_key(spec="double")
    with pytest.warns(AttndslCacheWarning, match="not usable"):
        lib, hit = cache.load_or_build(key, build, label="double")
    assert not hit and runs_correctly(lib)
    with warnings.catch_warnings():                      # warned once, not at every compile
        warnings.simplefilter("error", AttndslCacheWarning)
        lib, hit = cache.load_or_build(key, build, label="double")
    assert (hit, build.calls) == (False, 2) and runs_correctly(lib)


def test_no_cache_always_builds_and_writes_nothing(cache_dir, monkeypatch):
    monkeypatch.setenv("ATTNDSL_NO_CACHE", "1")
    assert not config.use_cache()
    build, key = Counted(), cache.make_key(spec="double")
    for _ in range(2):
        lib, hit = load(key, build)
        assert not hit and runs_correctly(lib)
    assert build.calls == 2 and not cache_dir.exists()


def test_verbose_reports_compile_and_load(cache_dir, monkeypatch, capsys):
    monkeypatch.setenv("ATTNDSL_VERBOSE", "1")
    key = cache.make_key(spec="double")
    load(key, double_lib, label="spec/float32")
    load(key, double_lib, label="spec/float32")
    err = capsys.readouterr().err
    assert "attndsl: compiling spec/float32 ..." in err
    assert "attndsl: loaded spec/float32 from cache (" in err


def test_clear_removes_every_entry(cache_dir):
    for name in ("a", "b"):
        load(cache.make_key(spec=name), double_lib)
    assert len(cache.entries()) == 2
    assert cache.clear() == 6                            # .so, .json, .lock for each
    assert cache.entries() == [] and list(cache_dir.iterdir()) == []


@pytest.mark.parametrize("env, expected", [({"ATTNDSL_CACHE_DIR": "/x/c"}, "/x/c"),
                                           ({"XDG_CACHE_HOME": "/x/xdg"}, "/x/xdg/attndsl"),
                                           ({"HOME": "/x/home"}, "/x/home/.cache/attndsl")],
                         ids=["explicit", "xdg", "home"])
def test_cache_dir_resolution(monkeypatch, env, expected):
    for name in ("ATTNDSL_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert config.cache_dir() == Path(expected)
    assert "ATTNDSL_CACHE_DIR" in config.describe()


@pytest.mark.parametrize("raw, expected", [(None, "tir"), ("", "tir"), (" Library ", "library"),
                                           ("tir", "tir")], ids=["unset", "empty", "library", "tir"])
def test_fft_impl_flag(monkeypatch, raw, expected):
    monkeypatch.delenv("ATTNDSL_FFT", raising=False)
    if raw is not None:
        monkeypatch.setenv("ATTNDSL_FFT", raw)
    assert config.fft_impl() == expected


def test_fft_impl_flag_rejects_a_typo(monkeypatch):
    monkeypatch.setenv("ATTNDSL_FFT", "pocketfft")
    with pytest.raises(ValueError, match="valid values are tir, library"):
        config.fft_impl()


# --- two processes compiling the same key at the same moment ------------------------------------

CHILD = textwrap.dedent("""
    import sys, time, pathlib
    import torch, tvm
    from tvm import te
    from attndsl import cache

    work, who = pathlib.Path(sys.argv[1]), sys.argv[2]

    def build():
        with open(work / "builds.txt", "a") as f:
            f.write(who + "\\n")
        time.sleep(0.5)                      # hold the lock long enough for the other to arrive
        n = te.var("n", "int64")
        a = te.placeholder((n,), "float32", name="A")
        b = te.compute((n,), lambda i: a[i] * 2.0, name="B")
        f = te.create_prim_func([a, b]).with_attr("global_symbol", "double")
        return tvm.compile(tvm.IRModule({"double": f}), target={"kind": "llvm"})

    key = cache.make_key(spec="race")
    (work / f"ready-{who}").touch()
    deadline = time.monotonic() + 60
    while not (work / "go").exists():        # start line: both past their imports
        assert time.monotonic() < deadline, "never told to go"
        time.sleep(0.001)
    lib, hit = cache.load_or_build(key, build, label="race")
    x = torch.arange(5, dtype=torch.float32); y = torch.empty_like(x)
    lib["double"](x, y)
    assert torch.equal(y, 2 * x)
    print(f"hit={hit}")
""")


def test_two_processes_build_once(tmp_path):
    cache_dir = tmp_path / "cache"
    env = {**os.environ, "ATTNDSL_CACHE_DIR": str(cache_dir),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("ATTNDSL_NO_CACHE", None)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), who], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for who in ("p0", "p1")]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{who}").exists() for who in ("p0", "p1")):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            [p.communicate() for p in procs if p.poll() is not None]
        time.sleep(0.01)
    (tmp_path / "go").touch()
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
    assert sorted(out.strip() for out, _ in results) == ["hit=False", "hit=True"]
    assert (tmp_path / "builds.txt").read_text().count("\n") == 1
    files = sorted(p.name for p in cache_dir.glob("??/*") if p.is_file())   # entries (not omp/, the launcher)
    assert [f for f in files if f.endswith(".so")] == [f"{cache.make_key(spec='race')}.so"]
    assert len(files) == 3                               # .so, .json, .lock: no temporaries left


# --- a lock holder that does not finish -------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time, pathlib
    from attndsl import cache

    work = pathlib.Path(sys.argv[1])

    def build():                             # holds the lock until told to go on
        (work / "holding").touch()
        while not (work / "go").exists():
            time.sleep(0.01)
        from tvm import te
        import tvm
        n = te.var("n", "int64")
        a = te.placeholder((n,), "float32", name="A")
        b = te.compute((n,), lambda i: a[i] * 2.0, name="B")
        f = te.create_prim_func([a, b]).with_attr("global_symbol", "double")
        return tvm.compile(tvm.IRModule({"double": f}), target={"kind": "llvm"})

    cache.load_or_build(cache.make_key(spec="held"), build, label="held")
""")


@pytest.fixture
def holder(cache_dir, tmp_path):
    """A process inside load_or_build for key spec="held", holding the lock until `go` exists."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "holding").exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    yield proc, tmp_path / "go"
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def test_a_stopped_lock_holder_is_named_and_the_library_built_in_memory(holder, monkeypatch):
    proc, _ = holder
    os.kill(proc.pid, signal.SIGSTOP)                    # e.g. Ctrl-Z in another terminal
    monkeypatch.setattr(cache, "LOCK_WAIT_S", 0.2, raising=False)
    build = Counted()
    with pytest.warns(AttndslCacheWarning, match=rf"held by pid {proc.pid} on host .* building held\).*"
                                                 rf"\[stopped\]; building held in memory without caching"):
        lib, hit = cache.load_or_build(cache.make_key(spec="held"), build, label="held")
    assert (hit, build.calls) == (False, 1) and runs_correctly(lib)
    assert not entry(cache.make_key(spec="held"))[0].exists()
    proc.kill()                                          # a dead holder's lock is free again
    proc.wait()
    lib, hit = load(cache.make_key(spec="held"), build, label="held")
    assert (hit, build.calls) == (False, 2) and entry(cache.make_key(spec="held"))[0].exists()


def test_a_running_lock_holder_is_waited_for_with_a_warning(holder, monkeypatch):
    proc, go = holder
    monkeypatch.setattr(cache, "LOCK_WAIT_S", 0.2, raising=False)
    told = []
    real = cache._warn

    def warn(msg, once=False):                           # the holder goes on once we have said so
        told.append(msg)
        go.touch()
        real(msg, once)
    monkeypatch.setattr(cache, "_warn", warn)
    build = Counted()
    with pytest.warns(AttndslCacheWarning, match=rf"waiting for pid {proc.pid} on host"):
        lib, hit = cache.load_or_build(cache.make_key(spec="held"), build, label="held")
    assert (hit, build.calls) == (True, 0) and runs_correctly(lib)      # the holder's entry
    assert len(told) == 1
    assert proc.wait(timeout=120) == 0


# --- what is in the cache folder besides entries ------------------------------------------------------

def test_entries_and_clear_pass_over_junk(cache_dir):
    key = cache.make_key(spec="double")
    load(key, double_lib)
    (cache_dir / "README").write_text("not an entry")
    (cache_dir / "zz").write_text("a file named like a folder")
    junk = cache_dir / "ab"
    junk.mkdir()
    (junk / "list.json").write_text("[1, 2]")
    (junk / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    (junk / "folder.json").mkdir()
    (junk / "dated.json").write_text(json.dumps({"created": 5}))
    found = {Path(e["path"]).stem: e["ok"] for e in cache.entries()}
    assert found == {key: True, "list": False, "binary": False, "folder": False, "dated": False}
    cache.clear()                                        # removes the files, leaves the folder
    assert [Path(e["path"]).stem for e in cache.entries()] == ["folder"]


def test_a_library_without_the_expected_functions_is_rebuilt(cache_dir):
    build, key = Counted(), cache.make_key(spec="double")
    load(key, build)
    with pytest.warns(AttndslCacheWarning, match=rf"{key}.so for double: it does not load \(it lacks "
                                                 r"the kernels triple"):
        lib, hit = cache.load_or_build(key, build, label="double", expect=("double", "triple"))
    assert (hit, build.calls) == (False, 2) and runs_correctly(lib)

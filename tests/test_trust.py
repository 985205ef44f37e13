"""What a compiled module keeps across places and processes: the cache key is what the spec means,
a module pickles and reattaches to its kernels, a planted library or a damaged tuning database is
caught with a warning and never fails a compile."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("tvm")

import attndsl  # noqa: E402
from attndsl import cache, pipeline  # noqa: E402
from attndsl.cache import AttndslCacheWarning  # noqa: E402
from attndsl.driver import canonical  # noqa: E402
from attndsl.parse import parse  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXT = """attention t {
    kernel   = favor(features=8, seed=3)
    position = toeplitz(max_distance=4, init=normal)
}
"""
DIMS = dict(heads=2, head_dim=8)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A compile cache of this module's own (its tests damage and plant entries)."""
    mp = pytest.MonkeyPatch()
    d = tmp_path_factory.mktemp("trust")
    mp.setenv("ATTNDSL_CACHE_DIR", str(d / "cache"))
    for flag in ("ATTNDSL_TUNING_DB", "ATTNDSL_NO_CACHE", "ATTNDSL_UNTUNED"):
        mp.delenv(flag, raising=False)
    yield d
    mp.undo()


@pytest.fixture(scope="module")
def attn(home):
    """The compiled TEXT, its table and features made distinct from their initial values."""
    a = attndsl.compile(TEXT, **DIMS)
    with torch.no_grad():
        a.position_table.copy_(torch.randn_like(a.position_table))
    return a


def qkv(B=2, N=7, requires_grad=False):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(B, 2, N, 8, generator=g, dtype=torch.float32, requires_grad=requires_grad)
            for _ in range(3)]


def hit(a) -> bool:
    return a._build_log[-1].startswith("float32: loaded from cache")


# --- the key: what the spec means, not where it was written ------------------------------------------

def test_the_same_spec_from_a_path_as_text_with_a_comment_or_renamed_is_a_cache_hit(attn, tmp_path):
    path = tmp_path / "t.attn"
    path.write_text(TEXT)
    commented = tmp_path / "elsewhere" / "copy.attn"
    commented.parent.mkdir()
    commented.write_text("# the same block, a comment and a blank line above it\n\n" + TEXT)
    n = len(cache.entries())
    for source in (path, str(path), TEXT, commented, TEXT.replace("attention t", "attention renamed")):
        again = attndsl.compile(source, **DIMS)
        assert hit(again), (source, again._build_log)
    assert len(cache.entries()) == n


def _root(text, head_dim=8):
    return pipeline.run(parse(text, filename="x.attn").block(None), head_dim, head_dim).root


@pytest.mark.parametrize("a, b", [
    ("scale = 0.125", "scale = 0.12500001"),
    ("kernel = favor(features=8)", "kernel = favor(features=16)"),
    ("kernel(x) = exp(x)", "kernel(x) = exp(0.5 * x)"),
    ("mask = causal", "mask = none"),
    ("position = toeplitz(max_distance=4)", "position = toeplitz(max_distance=5)"),
    ("position(r) = -0.02 * abs(r)", "position(r) = -0.0200001 * abs(r)"),
    ("sampling = uniform(samples=16)", "sampling = uniform(samples=32)"),
    ("sampling = kde(samples=16, block=32)", "sampling = kde(samples=16, block=64)"),
], ids=["scale", "features", "expression", "causal", "table", "position_fn", "samples", "block"])
def test_what_changes_the_kernels_changes_the_key(a, b):
    ka, kb = (json.dumps(canonical(_root(f"attention x {{ {s} }}"))) for s in (a, b))
    assert ka != kb


def test_the_key_leaves_out_spans():
    one = _root("attention x { kernel = elu1; mask = causal }")
    two = _root("\n\n# moved\nattention   y {\n  mask = causal\n  kernel = elu1\n}\n")
    assert json.dumps(canonical(one)) == json.dumps(canonical(two))
    assert "x.attn" not in json.dumps(canonical(one))


# --- a library planted under a valid key ------------------------------------------------------------

def test_a_library_of_another_spec_under_this_key_is_rebuilt(home):
    """Two specs with the same kernel names (elu1, relu): the stamp named after the key tells them
    apart at load; the rebuilt entry is then a plain hit."""
    mine, theirs = (attndsl.compile(f"attention p {{ kernel = {k} }}", heads=1, head_dim=4)
                    for k in ("elu1", "relu"))
    paths = {e["key"]: Path(e["path"]) for e in cache.entries()}
    so, planted = paths[mine._library("float32")], paths[theirs._library("float32")]
    so.write_bytes(planted.read_bytes())                 # with metadata that vouches for it
    meta = json.loads(so.with_suffix(".json").read_text())
    meta.update({k: json.loads(planted.with_suffix(".json").read_text())[k] for k in ("size", "sha256")})
    so.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.warns(AttndslCacheWarning, match=rf"rebuilding cached library {so} .*lacks the kernels"):
        again = attndsl.compile("attention p { kernel = elu1 }", heads=1, head_dim=4)
    q, k, v = (t[:, :1, :, :4] for t in qkv())
    torch.testing.assert_close(again(q, k, v), again.reference(q, k, v), rtol=1e-4, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AttndslCacheWarning)
        third = attndsl.compile("attention p { kernel = elu1 }", heads=1, head_dim=4)
    assert hit(third)
    torch.testing.assert_close(third(q, k, v), again(q, k, v), rtol=0, atol=0)


# --- damaged tuning databases -----------------------------------------------------------------------

CAUSAL = "attention c { kernel = elu1; mask = causal }"          # tunable kernels (the linear family)


@pytest.mark.parametrize("where", ["cache", "env"])
def test_a_tuning_database_with_a_garbage_line_is_named_and_skipped(home, tmp_path, monkeypatch, where):
    from attndsl.schedules import lookup
    db = tmp_path / "db"
    if where == "env":
        monkeypatch.setenv("ATTNDSL_TUNING_DB", str(db))
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(tmp_path / "cache"))
    db = lookup.user_db()
    db.mkdir(parents=True)
    shipped = Path(lookup.SHIPPED)
    for name in lookup.FILES:
        (db / name).write_text((shipped / name).read_text())
    with open(db / "database_tuning_record.json", "a") as f:
        f.write("garbage{\n")
    with pytest.warns(AttndslCacheWarning, match=rf"tuning database {db / 'database_tuning_record.json'} "
                                                 r"does not load .*Cannot tokenize"):
        a = attndsl.compile(CAUSAL, **DIMS)
    q, k, v = qkv()
    torch.testing.assert_close(a(q, k, v), a.reference(q, k, v), rtol=1e-4, atol=1e-5)


def test_a_record_measured_at_zero_seconds_is_named_and_skipped(tmp_path):
    import tvm
    from attndsl.lowering import lower, tune
    from attndsl.lowering.build import resolve_target
    from attndsl.schedules import database, knobs
    root = _root(CAUSAL, head_dim=8)
    name, func = next((n, f) for n, f in lower(root, "float32").items() if n.endswith("_fwd"))
    db = database.open_db(tmp_path)
    wl = db.commit_workload(database.workload(func))
    target = tvm.target.Target(resolve_target("llvm"))
    info = tune.arg_shapes(func, {"BH": 2, "H": 2, "P": 1, "N": 64})
    default, other = knobs.grid("linear")[:2]
    database.commit(db, wl, "linear", default, [1e-3], target, info)
    database.commit(db, wl, "linear", other, [0.0], target, info)
    with pytest.warns(AttndslCacheWarning, match=rf"{tmp_path / 'database_tuning_record.json'} has a "
                                                 r"record that cannot be used .*run_secs is \[0.0\]"):
        assert database.choose(database.open_dbs([tmp_path]), func, "linear", target) is None


# --- pickling: torch.save / load in another process, deepcopy, state_dict ---------------------------

LOAD = textwrap.dedent("""
    import sys, torch
    a = torch.load(sys.argv[1], weights_only=False)
    q, k, v = torch.load(sys.argv[2])
    q.requires_grad_(True)
    out = a(q, k, v)
    out.sum().backward()
    ref = a.reference(q.detach(), k, v)
    print(float((out - ref).abs().max()), bool(torch.isfinite(q.grad).all()), a._build_log[-1])
""")


def test_a_saved_module_runs_in_a_fresh_process(attn, tmp_path):
    torch.save(attn, tmp_path / "attn.pt")
    torch.save(qkv(), tmp_path / "qkv.pt")
    script = tmp_path / "load.py"
    script.write_text(LOAD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "attn.pt"), str(tmp_path / "qkv.pt")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    err, finite, log = out.stdout.split(" ", 2)
    assert float(err) < 1e-5 and finite == "True" and log.startswith("float32: loaded from cache")


def test_deepcopy_and_pickle_in_process_and_state_dict_round_trip(attn):
    import pickle
    q, k, v = qkv()
    want = attn(q, k, v)
    for twin in (copy.deepcopy(attn), pickle.loads(pickle.dumps(attn))):
        assert torch.equal(twin(q, k, v), want)
        assert torch.equal(twin.position_table, attn.position_table)
    fresh = attndsl.compile(TEXT, **DIMS)
    assert not torch.equal(fresh(q, k, v), want)         # another table
    fresh.load_state_dict(attn.state_dict())
    assert torch.equal(fresh(q, k, v), want)


class Calls(torch.utils.data.Dataset):
    """Items computed by the module in the worker (a spawned process)."""

    def __init__(self, module, inputs):
        self.module, self.inputs = module, inputs

    def __len__(self):
        return 1

    def __getitem__(self, i):
        with torch.no_grad():
            return self.module(*self.inputs)


def test_a_module_in_a_spawned_dataloader_worker(attn):
    q, k, v = qkv()
    loader = torch.utils.data.DataLoader(Calls(attn, (q, k, v)), batch_size=None, num_workers=1,
                                         multiprocessing_context="spawn")
    [got] = list(loader)
    torch.testing.assert_close(got, attn(q, k, v), rtol=0, atol=0)

"""The runtime-only bundle (attndsl/bundle.py): built here, loaded without TVM's compiler, and the
CUDA kernels compiled ahead for a GPU this machine lacks (attndsl/runtime/cuda.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import attndsl
from attndsl import bundle, cache, cli
from attndsl.runtime import cuda
from attndsl.schedules.cuda import nvcc_path

ROOT = Path(__file__).resolve().parent.parent
TEXT = "attention b { kernel = elu1; mask = causal }"
HAS_GPU = torch.cuda.is_available()
pytestmark = pytest.mark.xdist_group("bundle")      # one worker builds the bundle the tests share

# the first lines of a script run in the bundle's environment: TVM's compiler cannot be imported
NO_COMPILER = f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\nimport no_compiler\n"


@pytest.fixture(scope="session")          # a worker may leave the module and come back
def cpu_bundle(tmp_path_factory):
    """A bundle of TEXT's float64 kernels for this CPU, made by `attndsl bundle`."""
    folder = tmp_path_factory.mktemp("bundle")
    (folder / "b.attn").write_text(TEXT)
    out = folder / "cpu"
    assert cli.main(["bundle", str(folder / "b.attn"), "--heads", "2", "--head-dim", "8", "--dtype", "float64",
                     "--out", str(out)]) == 0
    return out, json.loads((out / "manifest.json").read_text())


def in_bundle(out: Path, script: str) -> subprocess.CompletedProcess:
    """`script` run by this Python in the bundle's environment, with TVM's compiler out of reach."""
    code = NO_COMPILER + textwrap.dedent(script)
    return subprocess.run(["bash", "-c", f'source "{out}/env.sh" && exec "{sys.executable}" -c "$0"', code],
                          capture_output=True, text=True, cwd="/", timeout=300)


def test_a_bundle_ships_its_libraries_and_runtime_in_little_space(cpu_bundle):
    out, manifest = cpu_bundle
    assert sorted(p.name for p in out.iterdir()) == ["bundle.tar.xz", "env.sh", "manifest.json"]
    assert [lib["label"] for lib in manifest["libraries"]] == ["b/float64"] and manifest["libraries"][0]["ok"]
    assert manifest["pythons"] == [f"{sys.version_info.major}.{sys.version_info.minor}"]
    assert manifest["tvm"] == cache._versions()["tvm"]
    assert bundle.size(out) < 8 << 20
    assert (bundle.work(out) / "tvm" / "libtvm_runtime.so").is_file()
    assert not (bundle.work(out) / "site" / "tvm").exists()            # no compiler
    assert not Path(f"{out}.unpacked").exists()                         # until env.sh is sourced


def test_a_bundle_loads_its_kernels_without_the_tvm_compiler(cpu_bundle):
    out, _ = cpu_bundle
    run = in_bundle(out, """
        import torch, attndsl, tvm_ffi
        attn = attndsl.compile("attention b { kernel = elu1; mask = causal }", heads=2, head_dim=8,
                               dtype=torch.float64)
        q, k, v = (torch.randn(1, 2, 50, 8, dtype=torch.float64) for _ in range(3))
        torch.testing.assert_close(attn(q, k, v), attn.reference(q, k, v))
        assert "loaded from cache" in attn.explain()
        assert not any(m == "tvm" or m.startswith("tvm.") for m in sys.modules)
        print(attndsl.__file__, tvm_ffi.__file__)
        try:                         # a spec the bundle lacks: says what to do
            attndsl.compile("attention c { kernel = relu }", heads=2, head_dim=8)
        except RuntimeError as e:
            print(e)
    """)
    assert run.returncode == 0, run.stderr
    paths, error = run.stdout.splitlines()[:2]
    assert all(p.startswith(f"{out}.unpacked/site/") for p in paths.split())
    assert "not in the cache at" in error and "TVM's compiler cannot be imported here" in error
    assert "pip install apache-tvm==0.27.0.post1" in error


def test_bundle_arch_needs_a_cuda_target(capsys):
    assert cli.main(["bundle", str(ROOT / "examples" / "linear_elu.attn"), "--arch", "sm_90", "--out", "x"]) == 2
    assert "--arch compiles CUDA kernels ahead: it needs a CUDA --target" in capsys.readouterr().err


@pytest.mark.skipif(HAS_GPU, reason="checks the message of a machine without a GPU")
def test_gpu_check_stops_at_the_preflight_without_a_gpu(cpu_bundle, tmp_path):
    out, _ = cpu_bundle
    run = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh")], capture_output=True, text=True,
                         env={**os.environ, "BUNDLE": str(out), "OUT": str(tmp_path), "PYTHON": sys.executable}, timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "gpu preflight: STOP: torch sees no CUDA GPU here" in run.stdout
    assert "STOP" in (tmp_path / "gpu_preflight.log").read_text()


def test_gpu_check_without_a_bundle_says_how_to_make_one(tmp_path):
    run = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh")], capture_output=True, text=True,
                         env={**os.environ, "BUNDLE": str(tmp_path / "none"), "OUT": str(tmp_path)}, timeout=60)
    assert run.returncode == 2 and "run 'make gpu-bundle' first" in run.stdout


@pytest.mark.skipif(HAS_GPU, reason="a machine with a GPU loads CUDA libraries instead")
def test_cuda_libraries_are_stored_with_their_kernels_compiled_for_another_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(tmp_path))
    if nvcc_path():
        monkeypatch.setenv("ATTNDSL_CUDA_ARCH", "sm_90")
    sources, compile_source = [], cuda.compile_source
    monkeypatch.setattr(cuda, "compile_source", lambda s, sm=None: sources.append(s) or compile_source(s, sm))
    attn = attndsl.compile("attention s { kernel = elu1 }", heads=2, head_dim=8, target="cuda")
    assert "stored for a machine with a CUDA runtime" in attn.explain()
    assert [e["label"] for e in cache.entries()] == ["s/float32"] and cache.entries()[0]["ok"]
    if not nvcc_path():
        return
    stored = list((tmp_path / "cuda").rglob("*.fatbin"))
    assert len(sources) == len(stored) == 1 and "__global__" in sources[0]
    monkeypatch.setattr(cuda, "_compile", lambda *a: pytest.fail("compiled again"))
    assert compile_source(sources[0]) == stored[0].read_bytes()      # what a GPU machine's load gets


def test_the_cuda_compile_callback_survives_importing_tvm_and_reads_the_store(tmp_path):
    """TVM's `import tvm` registers tvm_callback_cuda_compile itself and fails if the name is taken:
    attndsl's takes it over after that import, and answers from the compiled store."""
    script = textwrap.dedent("""
        import tvm_ffi
        from attndsl.runtime import cuda
        cuda._register()
        import tvm, tvm.support.nvcc                      # TVM's own registration ran first
        path = cuda.store_path("// kernels", "sm_90")
        path.parent.mkdir(parents=True)
        path.write_bytes(b"compiled ahead")
        print(bytes(tvm_ffi.get_global_func("tvm_callback_cuda_compile")("// kernels")).decode())
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ATTNDSL_CACHE_DIR": str(tmp_path), "ATTNDSL_CUDA_ARCH": "sm_90"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "compiled ahead"

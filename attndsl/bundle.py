"""A runtime-only bundle: compiled kernels and what loads them, for a machine without TVM's compiler.

Built where apache-tvm is installed, used where only torch is:

    with bundle.kernels("dist/gpu", arch="sm_90"):          # compile into the bundle's cache
        attndsl.compile("model.attn", heads=8, head_dim=64, target="cuda").build(torch.float32)
    bundle.runtime("dist/gpu", pythons=["3.12"])             # add the runtime; pack it all

and on the other machine `source dist/gpu/env.sh`, then `attndsl.compile(...)` as before: every
library loads from the bundle's cache, and nothing is compiled by TVM. What ships is

    env.sh              unpacks bundle.tar.xz into `out`.unpacked/ (again when it changes); sets
                        PYTHONPATH, ATTNDSL_TVM_RUNTIME and ATTNDSL_CACHE_DIR to its folders:
    bundle.tar.xz         site/    attndsl, lark, tvm_ffi (its Python package, libtvm_ffi.so, a
                                   core extension per Python version of `pythons`)
                          tvm/     libtvm_runtime.so, libtvm_runtime_cuda.so, versions.json
                          cache/   the kernel cache: a library per spec, dims, dtype and target,
                                   for CUDA with its kernels compiled for `arch`
                                   (attndsl/runtime/cuda.py), and the tuning records they used
    manifest.json       versions, Python versions, libraries (label, key, size)

`dist/gpu.work/` beside it is what the bundle is packed from (its cache stays for the next
build). Cache keys depend on the IR, dims, dtype, target, kernel source and TVM versions, and for
CPU kernels on this CPU's model: CPU libraries load only on the same CPU model, CUDA libraries on
any x86-64 host with a GPU of `arch`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from . import cache
from .runtime import load

RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_runtime_cuda.so")
SOURCES = ("pyproject.toml", "README.md", "attndsl", "lowering", "schedules", "grammar")   # what pip installs
# tvm_ffi's parts a loader never touches: C++ headers and sources (for building extensions), stub tools
TVM_FFI_LEFT_OUT = ("include", "3rdparty", "src", "share", "stub", "CMakeLists.txt")

ENV_SH = """\
# source this file: attndsl from this bundle, kernels from its cache, TVM's runtime without its compiler
here="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" && pwd)"
dest="$here.unpacked"                              # beside the bundle, which stays as shipped
stamp="$(sha256sum "$here/bundle.tar.xz" | cut -c1-64)"
if [ "$(cat "$dest/.from" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$dest" && mkdir -p "$dest" && tar -xJf "$here/bundle.tar.xz" -C "$dest" && echo "$stamp" > "$dest/.from"
fi
export PYTHONPATH="$dest/site${PYTHONPATH:+:$PYTHONPATH}"
export ATTNDSL_TVM_RUNTIME="$dest/tvm"
export ATTNDSL_CACHE_DIR="$dest/cache"
# tvm_ffi's optional torch extension is built from C++ headers the bundle leaves out
export TVM_FFI_DISABLE_TORCH_C_DLPACK=1
"""


@contextlib.contextmanager
def kernels(out: str | os.PathLike, arch: str | None = None):
    """Inside, every compile() builds into the bundle's cache, `out`.work/cache (and reads it
    first); CUDA libraries get their kernels compiled for `arch` (e.g. "sm_90") where nvcc is
    installed. The user's tuning records are copied in, so the other machine reads the same."""
    cache_dir = work(out) / "cache"
    user_db = _user_tuning_db()
    if user_db is not None:
        shutil.copytree(user_db, cache_dir / "tuning", dirs_exist_ok=True)
    env = {"ATTNDSL_CACHE_DIR": str(cache_dir), "ATTNDSL_TUNING_DB": None,
           "ATTNDSL_CUDA_ARCH": arch}
    saved = {name: os.environ.get(name) for name in env}
    try:
        for name, value in env.items():
            _setenv(name, value)
        yield cache_dir
    finally:
        for name, value in saved.items():
            _setenv(name, value)


def runtime(out: str | os.PathLike, pythons: list[str] | None = None, wheels: str | os.PathLike | None = None,
            progress=print) -> dict:
    """Add what loads the kernels to the bundle at `out` (whose cache `kernels` filled): attndsl,
    lark, tvm_ffi for each Python version of `pythons` (default: this one; others are fetched as
    wheels into `wheels`, default `out`/../wheels), TVM's runtime libraries; pack them with the
    cache into bundle.tar.xz. Returns the manifest (also written to manifest.json)."""
    out, staged = Path(out), work(out)
    pythons = pythons or [_this_python()]
    site, tvm_dir = staged / "site", staged / "tvm"
    for folder in (site, tvm_dir):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    progress(f"bundle: attndsl, lark, tvm_ffi (Python {', '.join(pythons)}) -> {site}")
    _install_attndsl(site)
    _copy_package("lark", "lark", site)
    _copy_tvm_ffi(site, pythons, Path(wheels) if wheels else out.parent / "wheels")
    progress(f"bundle: TVM's runtime -> {tvm_dir}")
    src = load.runtime_dir()
    if src is None:
        raise RuntimeError("apache-tvm is not installed here: a bundle takes its runtime libraries")
    for name in RUNTIME_LIBS:
        shutil.copy2(src / name, tvm_dir / name)
    versions = cache._versions()
    (tvm_dir / "versions.json").write_text(json.dumps(versions) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "env.sh").write_text(ENV_SH)
    progress(f"bundle: packing site/, tvm/ and cache/ -> {out / 'bundle.tar.xz'}")
    libraries = _pack(staged, out / "bundle.tar.xz")
    manifest = {**versions, "pythons": pythons, "libraries": libraries,
                "fatbins": sum(1 for _ in (staged / "cache" / "cuda").rglob("*.fatbin"))}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def size(out: str | os.PathLike) -> int:
    """Bytes a bundle ships: env.sh, bundle.tar.xz and manifest.json."""
    return sum((Path(out) / name).stat().st_size for name in ("env.sh", "bundle.tar.xz", "manifest.json"))


def work(out: str | os.PathLike) -> Path:
    """The staging folder beside the bundle `out`: its cache (kept between builds), site/, tvm/."""
    out = Path(out)
    return out.with_name(out.name + ".work")


# --- the parts -------------------------------------------------------------------------------------

def _setenv(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _user_tuning_db() -> Path | None:
    from .schedules import lookup
    db = lookup.user_db()
    return db if db in lookup.tuning_dirs() else None


def _this_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _install_attndsl(site: Path) -> None:
    """attndsl as pip installs it (pyproject.toml maps lowering/, schedules/ and grammar/ into
    it), from a source checkout; else the installed package as it is."""
    pkg = Path(__file__).parent
    root = pkg.parent
    if (root / "pyproject.toml").is_file() and (root / "lowering").is_dir():
        with tempfile.TemporaryDirectory(prefix="attndsl-src-") as tmp:   # setuptools builds in the tree
            for name in SOURCES:
                src = root / name
                if src.is_dir():
                    shutil.copytree(src, Path(tmp) / name, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy2(src, Path(tmp) / name)
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                            "--no-compile", "--no-cache-dir", "--target", str(site), tmp], check=True)
        for junk in site.glob("*.dist-info"):
            shutil.rmtree(junk)
    else:
        shutil.copytree(pkg, site / "attndsl", ignore=shutil.ignore_patterns("__pycache__"))


def _copy_package(module: str, dist: str, site: Path, left_out=()) -> Path:
    """The installed package `module` less `left_out` (and its distribution's metadata) into `site`."""
    src = Path(__import__(module).__file__).parent
    shutil.copytree(src, site / module, ignore=shutil.ignore_patterns("__pycache__", *left_out))
    files = metadata.distribution(dist).files or []
    for info in {f.parts[0] for f in files if f.parts[0].endswith(".dist-info")}:
        meta = Path(metadata.distribution(dist).locate_file(info))
        shutil.copytree(meta, site / info, ignore=shutil.ignore_patterns("RECORD"))
    return site / module


def _copy_tvm_ffi(site: Path, pythons: list[str], wheels: Path) -> None:
    """tvm_ffi without its headers and sources, with the core extension of each Python version."""
    pkg = _copy_package("tvm_ffi", "apache-tvm-ffi", site, TVM_FFI_LEFT_OUT)
    have = {p.name.split(".")[1] for p in pkg.glob("core.cpython-*.so")}     # {"cpython-311-x86_64-linux-gnu"}
    version = metadata.version("apache-tvm-ffi")
    for py in pythons:
        if any(h.startswith("cpython-" + py.replace(".", "") + "-") for h in have):
            continue
        wheel = _wheel("apache-tvm-ffi", version, py, wheels)
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name.startswith("tvm_ffi/core.cpython-") and name.endswith(".so"):
                    (pkg / Path(name).name).write_bytes(z.read(name))


def _wheel(dist: str, version: str, py: str, folder: Path) -> Path:
    """The manylinux x86-64 wheel of `dist`==`version` for CPython `py`, downloaded once into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    pattern = f"{dist.replace('-', '_')}-{version}-cp{py.replace('.', '')}-*.whl"
    found = sorted(folder.glob(pattern))
    if not found:
        platforms = [a for n in (28, 27, 24, 17) for a in ("--platform", f"manylinux_2_{n}_x86_64")]
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", py, "--implementation", "cp", *platforms, "-d", str(folder),
                        f"{dist}=={version}"], check=True)
        found = sorted(folder.glob(pattern))
    if not found:
        raise RuntimeError(f"no {dist} {version} wheel for Python {py} in {folder}")
    return found[-1]


def _pack(staged: Path, archive: Path) -> list[dict]:
    """site/, tvm/ and cache/ (its libraries, metadata, compiled CUDA and tuning records; no locks
    or temporaries) of `staged` into `archive`; the libraries' label, key and size."""
    cache_dir = staged / "cache"
    with tarfile.open(archive, "w:xz", preset=6) as tar:
        tar.add(staged / "site", arcname="site")
        tar.add(staged / "tvm", arcname="tvm")
        for p in sorted(cache_dir.rglob("*")):
            if p.is_file() and p.suffix in (".so", ".json", ".fatbin") and not p.name.startswith("."):
                tar.add(p, arcname=str(Path("cache") / p.relative_to(cache_dir)))
    return [{"label": e.get("label"), "key": e.get("key"), "bytes": e.get("size"), "ok": e["ok"]}
            for e in cache.entries(cache_dir)]

"""On-disk cache of compiled TVM libraries, keyed by everything that decides the code.

    <cache_dir>/<key[:2]>/<key>.so      the library (`export_library`)
    <cache_dir>/<key[:2]>/<key>.json    {key, label, created, tvm, tvm_ffi, format, size, sha256,
                                         notes (what the build chose, e.g. tuned knobs)}
    <cache_dir>/<key[:2]>/<key>.lock    held while one process checks, builds and writes the entry

Both files are written to temporaries in the same folder and moved into place with `os.replace`,
under the lock, so a reader sees either no entry or a whole one, and two processes compiling the
same key build it once. An entry that fails its check (missing metadata, wrong size or hash, a
library that will not load) is rebuilt with an `AttndslCacheWarning`. The cache never fails a
compile: if it cannot be written the library is built in memory and used from there.

TVM is imported only when something is built or loaded, so the front end imports without it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import filelock

from . import config

CACHE_FORMAT = 1            # bump when the layout or the meaning of a key changes
LOCK_TIMEOUT_S = 30 * 60    # a build longer than this in another process: build our own copy

_warned: set[str] = set()   # messages already given once in this process


class AttndslCacheWarning(UserWarning):
    """The compile cache could not be used as is (damaged entry, unwritable folder)."""


def _versions() -> dict[str, str]:
    try:
        return {"tvm": metadata.version("apache-tvm"), "tvm_ffi": metadata.version("apache-tvm-ffi")}
    except metadata.PackageNotFoundError:    # TVM built from source: ask it
        import tvm
        return {"tvm": tvm.__version__, "tvm_ffi": "?"}


def make_key(**parts: Any) -> str:
    """sha256 hex of the JSON of `parts` plus the TVM versions and CACHE_FORMAT."""
    payload = {"parts": parts, "format": CACHE_FORMAT, **_versions()}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _log(level: int, msg: str) -> None:
    if config.verbose() >= level:
        print(f"attndsl: {msg}", file=sys.stderr, flush=True)


def _warn(msg: str, once: bool = False) -> None:
    if once and msg in _warned:
        return
    _warned.add(msg)
    warnings.warn(msg, AttndslCacheWarning, stacklevel=3)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _paths(key: str) -> tuple[Path, Path, Path]:
    folder = config.cache_dir() / key[:2]
    return folder / f"{key}.so", folder / f"{key}.json", folder / f"{key}.lock"


def _problem(key: str, so: Path, meta: Path) -> str | None:
    """Why the entry cannot be trusted; None when it can; "" when there is simply no entry."""
    if not so.exists():
        return "" if not meta.exists() else "its metadata exists but the library is missing"
    try:
        info = json.loads(meta.read_text())
    except FileNotFoundError:
        return "its metadata file is missing"
    except (OSError, ValueError) as e:
        return f"its metadata is unreadable ({e})"
    if not isinstance(info, dict) or info.get("key") != key or info.get("format") != CACHE_FORMAT:
        return "its metadata belongs to another key or cache format"
    try:
        size, digest = so.stat().st_size, _sha256(so)
    except OSError as e:
        return f"it cannot be read ({e})"
    if size != info.get("size"):
        return f"it is {size} bytes, the metadata says {info.get('size')} (truncated?)"
    if digest != info.get("sha256"):
        return "its sha256 does not match the metadata (corrupt)"
    return None


def _load(so: Path, label: str, t0: float):
    from .lowering.runtime import load_library
    lib = load_library(so)
    _log(1, f"loaded {label} from cache ({(time.perf_counter() - t0) * 1e3:.1f} ms)")
    return lib


def _load_copy(so: Path, label: str, t0: float):
    """The entry just written, loaded from a copy (removed at once): the process never maps the
    entry's own file, so a later load of that path sees the file as it is then (the loader hands
    back an already-loaded library by name) and damage to it cannot reach code already running."""
    tmp = so.with_name(f".{so.stem}.{os.getpid()}.load.so")
    shutil.copyfile(so, tmp)
    try:
        return _load(tmp, label, t0)
    finally:
        tmp.unlink(missing_ok=True)


def _build(build: Callable, label: str):
    _log(1, f"compiling {label} ...")
    t0 = time.perf_counter()
    lib = build()
    _log(1, f"compiled {label} in {time.perf_counter() - t0:.2f} s")
    return lib


def replace_atomically(dst: Path, write: Callable[[str], None]) -> None:
    """write(tmp) into a temporary beside dst, then rename it over dst (atomic on one filesystem)."""
    # the suffix stays last: export_library picks the output format from it
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.stem}.", suffix=".tmp" + dst.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)                 # mkstemp makes 0600; an entry is plain readable data
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _store(key: str, lib, label: str, so: Path, meta: Path, notes: dict) -> None:
    replace_atomically(so, lib.export_library)
    info = {"key": key, "label": label, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **_versions(), "format": CACHE_FORMAT, "size": so.stat().st_size, "sha256": _sha256(so),
            "notes": notes}
    replace_atomically(meta, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=1) + "\n"))
    _log(2, f"cached {label} at {so}")


def _read_notes(meta: Path, notes: dict) -> None:
    notes.clear()
    notes.update(json.loads(meta.read_text()).get("notes") or {})


def load_or_build(key: str, build: Callable[[], Any], *, label: str,
                  notes: dict | None = None, cacheable: bool = True) -> tuple[Any, bool]:
    """(library, hit): the cached library for `key`, or build() stored under `key`.

    A hit returns a `tvm.runtime.Module` loaded from disk; a miss returns what build() made.
    `notes`: a dict build() may fill (JSON values); stored with the entry, and refilled from it on
    a hit, so what a build decided is known without building. `cacheable=False`: only build (a
    library this machine could not load back, e.g. CUDA kernels where there is no CUDA runtime).
    """
    if notes is None:
        notes = {}
    if not config.use_cache() or not cacheable:
        return _build(build, label), False
    so, meta, lock = _paths(key)
    t0 = time.perf_counter()
    if _problem(key, so, meta) is None:                     # fast path: a whole entry, no lock
        try:
            lib = _load(so, label, t0)
            _read_notes(meta, notes)
            return lib, True
        except Exception:
            pass                                            # looked again under the lock below
    try:
        so.parent.mkdir(parents=True, exist_ok=True)
        guard = filelock.FileLock(str(lock), timeout=LOCK_TIMEOUT_S)
        guard.acquire()
    except (OSError, filelock.Timeout) as e:
        _warn(f"attndsl: compile cache at {so.parent} is not usable ({e}); "
              f"building in memory (set ATTNDSL_CACHE_DIR to a writable folder)", once=True)
        return _build(build, label), False
    try:
        # another process may have written the entry while we waited for the lock
        problem = _problem(key, so, meta)
        if problem is None:
            try:
                lib = _load(so, label, t0)
                _read_notes(meta, notes)
                return lib, True
            except Exception as e:
                problem = f"it does not load ({str(e).strip().splitlines()[-1]})"
        if problem:
            _warn(f"attndsl: rebuilding cached library {so} for {label}: {problem}")
        lib = _build(build, label)
        try:
            _store(key, lib, label, so, meta, notes)
        except Exception as e:                              # disk full, no linker: still compiled
            _warn(f"attndsl: could not write {so} ({e}); using the library from memory", once=True)
            return lib, False
        try:                # what later processes will load (and, on a CPU, on torch's threads)
            return _load_copy(so, label, t0), False
        except Exception:
            return lib, False
    finally:
        guard.release()


def _files() -> list[Path]:
    root = config.cache_dir()
    if not root.is_dir():
        return []
    return [p for d in root.glob("??") if d.is_dir() for p in d.iterdir()
            if p.suffix in (".so", ".json", ".lock")]


def clear() -> int:
    """Remove every cache file; returns how many were removed."""
    removed = 0
    for p in _files():
        try:
            p.unlink()
            removed += 1
        except OSError:
            pass
    for d in config.cache_dir().glob("??"):
        try:
            d.rmdir()                                           # only if empty
        except OSError:
            pass
    return removed


def entries() -> list[dict]:
    """The metadata of every entry, oldest first, with `path` and `ok` (passes its checks)."""
    out = []
    for meta in (p for p in _files() if p.suffix == ".json" and not p.name.startswith(".")):
        try:
            info = json.loads(meta.read_text())
        except (OSError, ValueError):
            info = {"key": meta.stem}
        so = meta.with_suffix(".so")
        out.append({**info, "path": str(so), "ok": _problem(meta.stem, so, meta) is None})
    return sorted(out, key=lambda e: e.get("created", ""))

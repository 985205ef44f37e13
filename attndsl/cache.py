"""On-disk cache of compiled TVM libraries, keyed by everything that decides the code.

    <cache_dir>/<key[:2]>/<key>.so      the library (`export_library`)
    <cache_dir>/<key[:2]>/<key>.json    {key, label, created, tvm, tvm_ffi, format, size, sha256,
                                         notes (what the build chose, e.g. tuned knobs)}
    <cache_dir>/<key[:2]>/<key>.lock    held while one process checks, builds and writes the entry
    <cache_dir>/<key[:2]>/<key>.owner   who holds the lock: {pid, host, started, label}

Both files are written to temporaries in the same folder and moved into place with `os.replace`,
under the lock, so a reader sees either no entry or a whole one, and two processes compiling the
same key build it once. An entry that fails its check (missing metadata, wrong size or hash, a
library that will not load, or one without the kernels the caller expects) is rebuilt with an
`AttndslCacheWarning`. The cache never fails a compile: if it cannot be written the library is
built in memory and used from there. A process waiting for another's lock waits LOCK_WAIT_S, then
looks at the holder (the .owner file): one that is running on this host is waited for (with a
warning naming it, up to LOCK_TIMEOUT_S); one that is stopped, gone, elsewhere or unknown is named
in a warning, and the library is built in memory without caching.

TVM is imported only when something is built or loaded, so the front end imports without it.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import socket
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

CACHE_FORMAT = 2            # bump when the layout or the meaning of a key changes
LOCK_WAIT_S = 10.0          # then look at who holds the lock
LOCK_TIMEOUT_S = 30 * 60    # a running build longer than this in another process: build our own copy

_warned: set[str] = set()   # messages already given once in this process
_rejected: set[str] = set()  # entry paths this process loaded and found wanting (see _load)
_copies = itertools.count()


class AttndslCacheWarning(UserWarning):
    """The compile cache could not be used as is (damaged entry, unwritable folder)."""


def _versions() -> dict[str, str]:
    """The TVM versions, part of every key: the installed packages', else a runtime-only TVM's
    versions.json (attndsl/bundle.py), else (TVM built from source) what it says."""
    runtime = config.tvm_runtime_dir()
    if runtime is not None:
        try:
            info = json.loads((runtime / "versions.json").read_text())
            return {"tvm": str(info["tvm"]), "tvm_ffi": str(info["tvm_ffi"])}
        except (OSError, ValueError, KeyError, TypeError):
            pass
    try:
        return {"tvm": metadata.version("apache-tvm"), "tvm_ffi": metadata.version("apache-tvm-ffi")}
    except metadata.PackageNotFoundError:
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


def _import_tvm_ffi() -> None:
    """Import tvm_ffi, which a load needs, without ml_dtypes: tvm_ffi imports it only to map its
    numpy dtypes (bfloat16, float8, ...; no kernel here takes them), and its import alone costs
    ~0.8 s here (numpy 2 ufunc registration), most of a cache hit. A later `import tvm` (a build)
    imports ml_dtypes for itself."""
    if "tvm_ffi" in sys.modules or "ml_dtypes" in sys.modules:
        return
    sys.modules["ml_dtypes"] = None          # `import ml_dtypes` raises ImportError, which tvm_ffi skips
    try:
        import tvm_ffi  # noqa: F401
    finally:
        if "ml_dtypes" in sys.modules and sys.modules["ml_dtypes"] is None:
            del sys.modules["ml_dtypes"]


def _has(lib, name: str) -> bool:
    try:
        lib[name]
        return True
    except (AttributeError, KeyError):
        return False


def _open(path: Path, label: str, t0: float, expect: tuple[str, ...]):
    from .runtime.load import load_library
    _import_tvm_ffi()
    lib = load_library(path)
    missing = [name for name in expect if not _has(lib, name)]
    if missing:
        raise LookupError(f"it lacks the kernels {', '.join(missing[:4])}"
                          f"{' ...' if len(missing) > 4 else ''} (a library of another spec?)")
    _log(1, f"loaded {label} from cache ({(time.perf_counter() - t0) * 1e3:.1f} ms)")
    return lib


def _load(so: Path, label: str, t0: float, expect: tuple[str, ...] = ()):
    """The library at `so`; raises if it lacks a function named in `expect`. A path this process
    has loaded and found wanting is loaded through a copy: the loader would hand back the library
    it mapped first, by name."""
    if str(so) in _rejected:
        return _load_copy(so, label, t0, expect)
    try:
        return _open(so, label, t0, expect)
    except Exception:
        _rejected.add(str(so))
        raise


def _load_copy(so: Path, label: str, t0: float, expect: tuple[str, ...] = ()):
    """The entry, loaded from a copy (removed at once) under a name of its own: the process never
    maps the entry's own file, so a later load of that path sees the file as it is then and
    damage to it cannot reach code already running."""
    tmp = so.with_name(f".{so.stem}.{os.getpid()}.{next(_copies)}.load.so")
    shutil.copyfile(so, tmp)
    try:
        return _open(tmp, label, t0, expect)
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


def _paths(key: str) -> tuple[Path, Path, Path]:
    folder = config.cache_dir() / key[:2]
    return folder / f"{key}.so", folder / f"{key}.json", folder / f"{key}.lock"


def _write_owner(owner: Path, label: str) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "label": label,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        replace_atomically(owner, lambda tmp: Path(tmp).write_text(json.dumps(info)))
    except OSError:
        pass                                     # only for messages


def _read_owner(owner: Path) -> dict:
    try:
        info = json.loads(owner.read_text())
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _holder_state(info: dict) -> str:
    """"running", "stopped", "gone" or "unknown" (no record, another host, no /proc)."""
    pid = info.get("pid")
    if not isinstance(pid, int) or info.get("host") != socket.gethostname():
        return "unknown"
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "gone"
    except OSError:
        return "unknown"
    state = stat.rsplit(")", 1)[-1].split()[0]     # the field after "(comm)"
    return {"T": "stopped", "t": "stopped", "Z": "gone", "X": "gone"}.get(state, "running")


def _describe_holder(info: dict) -> str:
    if not info:
        return "an unknown process (no owner record)"
    return (f"pid {info.get('pid')} on host {info.get('host')} (since {info.get('started')}, "
            f"building {info.get('label')})")


def _acquire(guard: filelock.FileLock, owner: Path, so: Path, label: str) -> bool:
    """Take `guard`; False when its holder is not worth waiting for (stopped, gone, unknown) or
    has held it past LOCK_TIMEOUT_S: then the caller builds in memory."""
    t0, warned = time.monotonic(), False
    while True:
        try:
            guard.acquire(timeout=LOCK_WAIT_S)
            return True
        except filelock.Timeout:
            pass
        info = _read_owner(owner)
        state = _holder_state(info)
        waited = time.monotonic() - t0
        if state != "running" or waited >= LOCK_TIMEOUT_S:
            why = f"{state}" if state != "running" else f"still building after {waited:.0f} s"
            _warn(f"attndsl: the cache lock {so.with_suffix('.lock')} is held by {_describe_holder(info)}"
                  f" [{why}]; building {label} in memory without caching (end that process, or "
                  f"remove the lock file if it is gone, to cache again)")
            return False
        if not warned:
            _warn(f"attndsl: waiting for {_describe_holder(info)}, which holds the cache lock "
                  f"{so.with_suffix('.lock')}")
            warned = True


def load_or_build(key: str, build: Callable[[], Any], *, label: str, notes: dict | None = None,
                  loadable: bool = True, expect: tuple[str, ...] = ()) -> tuple[Any, bool]:
    """(library, hit): the cached library for `key`, or build() stored under `key`.

    A hit returns a `tvm.runtime.Module` loaded from disk; a miss returns what build() made.
    `notes`: a dict build() may fill (JSON values); stored with the entry, and refilled from it on
    a hit, so what a build decided is known without building. `loadable=False`: a library this
    machine cannot load (CUDA kernels where there is no CUDA runtime): built and stored, for a
    machine that can (`stored` tells whether it is there already).
    `expect`: function names a loaded entry must have (else it is rebuilt, with a warning).
    """
    if notes is None:
        notes = {}
    if not config.use_cache():
        return _build(build, label), False
    so, meta, lock = _paths(key)
    owner = lock.with_suffix(".owner")
    if not loadable:
        lib = _build(build, label)
        try:
            so.parent.mkdir(parents=True, exist_ok=True)
            with filelock.FileLock(str(lock), timeout=LOCK_TIMEOUT_S):
                _store(key, lib, label, so, meta, notes)
        except Exception as e:                              # kept for later only: never fatal
            _warn(f"attndsl: could not store {so} for {label} ({e})", once=True)
        return lib, False
    t0 = time.perf_counter()
    if _problem(key, so, meta) is None:                     # fast path: a whole entry, no lock
        try:
            lib = _load(so, label, t0, expect)
            _read_notes(meta, notes)
            return lib, True
        except Exception:
            pass                                            # looked again under the lock below
    try:
        so.parent.mkdir(parents=True, exist_ok=True)
        guard = filelock.FileLock(str(lock))
        if not _acquire(guard, owner, so, label):
            return _build(build, label), False
    except OSError as e:
        _warn(f"attndsl: compile cache at {so.parent} is not usable ({e}); "
              f"building in memory (set ATTNDSL_CACHE_DIR to a writable folder)", once=True)
        return _build(build, label), False
    try:
        _write_owner(owner, label)
        # another process may have written the entry while we waited for the lock
        problem = _problem(key, so, meta)
        if problem is None:
            try:
                lib = _load(so, label, t0, expect)
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
        owner.unlink(missing_ok=True)
        guard.release()


def stored(key: str) -> dict | None:
    """The notes of a whole entry for `key`, without loading it; None where there is none."""
    so, meta, _ = _paths(key)
    if not config.use_cache() or _problem(key, so, meta) is not None:
        return None
    try:
        return json.loads(meta.read_text()).get("notes") or {}
    except (OSError, ValueError):
        return None


def _files(root: Path | None = None) -> list[Path]:
    root = config.cache_dir() if root is None else root
    out = []
    try:
        for d in root.glob("??"):
            if d.is_dir():
                out += [p for p in d.iterdir() if p.suffix in (".so", ".json", ".lock", ".owner")]
    except OSError:                  # an unreadable folder: what could be listed
        pass
    return out


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


def entries(root: Path | None = None) -> list[dict]:
    """The metadata of every entry of the cache at `root` (default: this process's), oldest first,
    with `path` and `ok` (passes its checks); a file that is not an entry's metadata shows as `ok`
    False."""
    out = []
    for meta in (p for p in _files(root) if p.suffix == ".json" and not p.name.startswith(".")):
        try:
            info = json.loads(meta.read_text())
        except (OSError, ValueError):
            info = None
        if not isinstance(info, dict):
            info = {"key": meta.stem}
        so = meta.with_suffix(".so")
        out.append({**info, "path": str(so), "ok": _problem(meta.stem, so, meta) is None})
    return sorted(out, key=lambda e: str(e.get("created", "")))

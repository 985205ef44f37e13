"""Which tuning databases compile() reads, and their fingerprint: cheap, and without TVM.

Searched in order (the first holding a kernel's records decides its knobs):
    1. the user's database: $ATTNDSL_TUNING_DB, else <cache dir>/tuning (where `attndsl tune` writes)
    2. the database shipped in schedules/tuned/, tuned on the CPU class named in its records' target
None when ATTNDSL_UNTUNED is set. The fingerprint (a hash of the databases' record files) is part
of the compile-cache key, so a cache hit needs no lowering, and a new tuning run rebuilds.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from attndsl import config

SHIPPED = Path(__file__).parent / "tuned"
FILES = ("database_workload.json", "database_tuning_record.json")     # meta_schedule JSONDatabase


def user_db() -> Path:
    """Where `attndsl tune` writes (without --db) and what compile() reads first."""
    return config.tuning_db() or config.cache_dir() / "tuning"


def tuning_dirs() -> list[Path]:
    """The databases compile() consults, in order, those that hold records."""
    if not config.use_tuned():
        return []
    return [d for d in (user_db(), SHIPPED) if (d / FILES[1]).is_file() and (d / FILES[1]).stat().st_size]


_FINGERPRINTS: dict[tuple, str] = {}     # (path, size, mtime, inode) of each file -> fingerprint


def fingerprint(dirs: list[Path]) -> str | None:
    """sha256 (16 hex) of the record files of `dirs`; None when there are none. Files unchanged
    (size and mtime) since the last call in this process are not read again."""
    if not dirs:
        return None
    stamp = []
    for d in dirs:
        for name in FILES:
            try:
                st = (d / name).stat()
                stamp.append((str(d / name), st.st_size, st.st_mtime_ns, st.st_ino))
            except OSError:
                stamp.append((str(d / name), None, None, None))
    stamp = tuple(stamp)
    if stamp not in _FINGERPRINTS:
        h = hashlib.sha256()
        for d in dirs:
            for name in FILES:
                p = d / name
                try:
                    data = p.read_bytes()
                except OSError:
                    data = b""
                h.update(name.encode() + b"\0" + data)
        _FINGERPRINTS[stamp] = h.hexdigest()[:16]
    return _FINGERPRINTS[stamp]

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


def fingerprint(dirs: list[Path]) -> str | None:
    """sha256 (16 hex) of the record files of `dirs`; None when there are none."""
    if not dirs:
        return None
    h = hashlib.sha256()
    for d in dirs:
        for name in FILES:
            p = d / name
            h.update(name.encode() + b"\0" + (p.read_bytes() if p.is_file() else b""))
    return h.hexdigest()[:16]

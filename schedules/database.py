"""Tuning records: meta_schedule JSON databases of measured knob choices, and the choice a build uses.

A record (meta_schedule's TuningRecord, in its JSONDatabase files database_workload.json and
database_tuning_record.json):
    workload  the kernel built with the default knobs, global symbol "main" (so a kernel shared
              by two specs shares records, and any edit of the kernel's code makes a new workload:
              stale records are never applied)
    trace     one `sample_categorical` per knob of the family (schedules/knobs.py), its decision
              the index of the choice measured
    run_secs  measured at concrete shapes; args_info holds them (N = args_info[0].shape[1])
    target    the TVM target it was measured on (a record is used only for that target)

Where: `attndsl tune` writes to --db, else $ATTNDSL_TUNING_DB, else <cache dir>/tuning; compile()
reads that one, then the database shipped in schedules/tuned/ (schedules/lookup.py).

Choosing (`choose`, given the folders to search in order): the first database holding the
kernel's workload with records for the target; among its measured choices, the one with the
smallest geometric mean, over the tuned lengths, of time / best time at that length. The
default is among the candidates, so a choice is never one that measured slower than the default
at every length.

A damaged database never fails a compile: a folder whose files do not load, or whose records
cannot be read, is skipped with an `AttndslCacheWarning` naming its record file; a record whose
time is not a positive number is ignored with one.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import tvm
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms

from attndsl.cache import AttndslCacheWarning

from . import knobs as knob_spaces

RECORDS = "database_tuning_record.json"
_warned: set[str] = set()


def _warn(folder, problem: str) -> None:
    msg = (f"attndsl: tuning database {Path(folder) / RECORDS} {problem}; using the default knobs "
           f"for what it holds (delete or repair the file, or run `attndsl tune` again)")
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, AttndslCacheWarning, stacklevel=3)


def _reason(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


def open_db(folder) -> ms.database.JSONDatabase:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(folder), module_equality="structural")


def workload(func) -> tvm.IRModule:
    """The database's key of a kernel: its default-knob build, named "main"."""
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def trace_of(mod: tvm.IRModule, family: str, choice: dict) -> "tvm.s_tir.schedule.Trace":
    """A trace whose sample_categorical decisions spell `choice` (knob -> value)."""
    sch = Schedule(mod)
    for knob in knob_spaces.SPACES[family]:
        n = len(knob.choices)
        sch.sample_categorical(list(knob.choices), [1.0 / n] * n,
                               decision=knob.choices.index(choice[knob.name]))
    return sch.trace


def choice_of(trace, family: str) -> dict:
    """The inverse of trace_of: knob -> value from the record's decisions."""
    insts = [i for i in trace.insts if i.kind.name == "SampleCategorical"]
    space = knob_spaces.SPACES[family]
    if len(insts) != len(space):
        raise ValueError(f"a {family} record has {len(insts)} decisions, the family {len(space)} knobs")
    out = {}
    for knob, inst in zip(space, insts):
        candidates = [int(c) for c in inst.attrs[0]]
        out[knob.name] = candidates[int(trace.decisions[inst])]
    return out


def commit(db, wl, family: str, choice: dict, run_secs: list[float], target, args_info) -> None:
    """One measured choice of the workload `wl` (db.commit_workload of a workload())."""
    db.commit_tuning_record(ms.database.TuningRecord(
        trace_of(wl.mod, family, choice), wl, [float(s) for s in run_secs], target, args_info))


@dataclass(frozen=True)
class Choice:
    knobs: dict            # knob -> value
    speedup: float         # geometric mean over lengths of default time / chosen time
    lengths: tuple         # the sequence lengths it was measured at
    folder: str            # the database it came from


def mean_secs(secs) -> float:
    vals = [float(s) for s in secs]
    return sum(vals) / len(vals)


def measured(db, mod, family: str, target) -> dict:
    """{N: {knob choice (a sorted tuple of items): mean seconds}} of the workload's records on
    `target`; empty when the database does not hold the workload."""
    if not db.has_workload(mod):
        return {}
    wl = db.commit_workload(mod)        # the existing workload (nothing is written)
    out: dict = {}
    for rec in db.get_top_k(wl, 1 << 30):
        if rec.target is None or str(rec.target) != str(target) or not rec.run_secs:
            continue
        secs = mean_secs(rec.run_secs)
        if not (0 < secs < math.inf):
            raise ValueError(f"a record's run_secs is {[float(t) for t in rec.run_secs]}")
        n = int(rec.args_info[0].shape[1])
        key = tuple(sorted(choice_of(rec.trace, family).items()))
        out.setdefault(n, {})[key] = min(secs, out.get(n, {}).get(key, math.inf))
    return out


def open_dbs(dirs) -> list[tuple[str, ms.database.JSONDatabase]]:
    """(folder, database) of each folder that loads, in order: what choose() searches."""
    out = []
    for d in dirs:
        try:
            out.append((str(d), open_db(d)))
        except Exception as e:           # a line that is not JSON, a record TVM cannot read
            _warn(d, f"does not load ({_reason(e)})")
    return out


def choose(dbs: list, func, family: str, target) -> Choice | None:
    """The knob choice for a default-knob kernel `func` on `target` (a tvm Target), searching the
    open_dbs() in order; None: no record, build the defaults."""
    mod = workload(func)
    default = tuple(sorted(knob_spaces.defaults(family).items()))
    for folder, db in dbs:
        try:
            times = measured(db, mod, family, target)
        except Exception as e:
            _warn(folder, f"has a record that cannot be used ({_reason(e)})")
            continue
        # only lengths where the default was measured too, so the speed-up is a real comparison
        times = {n: t for n, t in times.items() if default in t}
        if not times:
            continue
        candidates = set.intersection(*(set(t) for t in times.values()))

        def score(c):
            return math.exp(sum(math.log(t[c] / min(t.values())) for t in times.values()) / len(times))
        best = min(sorted(candidates), key=score)
        speedup = math.exp(sum(math.log(t[default] / t[best]) for t in times.values()) / len(times))
        return Choice(dict(best), speedup, tuple(sorted(times)), folder)
    return None


def drop_target(folder, target: dict) -> int:
    """Remove the records measured on `target` (a target dict: its "kind" and "mcpu" are compared)
    from the database in `folder`, with the workloads no record uses any more; the other targets'
    records stay (how `make tuned-db` re-measures one CPU class of the shipped database). Plain
    JSON, rewritten atomically; returns the number of records removed."""
    folder = Path(folder)
    wl_path, rec_path = folder / "database_workload.json", folder / "database_tuning_record.json"
    if not rec_path.is_file():
        return 0

    def same(t: dict) -> bool:
        return all(t.get(k) == target.get(k) for k in ("kind", "mcpu"))
    lines = [ln for ln in rec_path.read_text().splitlines() if ln.strip()]
    kept = [(rec[0], ln) for ln in lines for rec in [json.loads(ln)] if not same(rec[1][2])]
    workloads = [ln for ln in wl_path.read_text().splitlines() if ln.strip()]
    used = sorted({i for i, _ in kept})
    index = {old: new for new, old in enumerate(used)}
    # a record line is [workload index, record]: only the index is rewritten
    for path, out in ((wl_path, [workloads[i] for i in used]),
                      (rec_path, [f"[{index[i]}," + ln.split(",", 1)[1] for i, ln in kept])):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in out))
        os.replace(tmp, path)
    return len(lines) - len(kept)


"""The cost model, calibrated on this machine: each form's measured seconds per estimated flop.

The planner's costs are flop counts (lowering/costs.py, each form's record). Forms reach very
different flop rates (register-tiled GEMMs, FFT butterflies, scans), so the lengths where flop
counts cross are not where the kernels do. `attndsl calibrate` times each form's forward kernels
on a representative site (B·H = 8, Dk = Dv = 64, float32) at LENGTHS and stores, per form, the
median seconds per flop in <tuning database>/calibration.json, with the CPU model it ran on. The
planner multiplies each form's flops by that rate when a file matches this CPU: the user's (where
`attndsl tune` writes), else the one shipped in schedules/tuned/. ATTNDSL_UNCALIBRATED=1 plans by
flops alone.
"""
from __future__ import annotations

import json
import statistics
import time
import warnings
from pathlib import Path

from . import config

FILE = "calibration.json"
LENGTHS = (512, 2048)
BH, DIM = 8, 64


def sites() -> dict[str, str]:
    """{form: the spec body its record's `probe` names}: what `measure` times (plan= forces it).
    Forms without one are not calibrated: they have no rival on their site, or are estimates
    the spec asks for."""
    from .lowering.registry import FORMS
    return {name: f.probe for name, f in FORMS.items() if f.probe}


def cpu_model() -> str:
    """The CPU a calibration is valid for: its model name, family and model (/proc/cpuinfo), e.g.
    "AMD EPYC (family 25, model 17)"; elsewhere what the platform module says."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():
                break                                # the first processor's block is enough
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" in fields:
        return f"{fields['model name']} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"
    import platform
    return platform.processor() or platform.machine()


_RATES: dict[tuple, dict[str, float] | None] = {}


def rates() -> dict[str, float] | None:
    """{form: seconds per flop} of the first calibration file that matches this CPU, or None (then
    the planner compares flops). A damaged file is warned about and skipped."""
    if not config.use_calibration():
        return None
    from .schedules.lookup import SHIPPED, user_db
    key = tuple((p, p.stat().st_mtime_ns if p.is_file() else None) for p in (user_db() / FILE, SHIPPED / FILE))
    if key not in _RATES:
        _RATES[key] = None
        for path, _ in key:
            if not path.is_file():
                continue
            try:
                data = json.loads(path.read_text())
                found = {str(f): float(r) for f, r in data["rates"].items() if float(r) > 0}
                cpu = data["cpu"]
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                warnings.warn(f"attndsl: ignoring the damaged calibration file {path} ({e}); "
                              f"`attndsl calibrate` writes a new one", stacklevel=2)
                continue
            if cpu == cpu_model():
                _RATES[key] = found
                break
    return _RATES[key]


def weight(form: str) -> float:
    """What the planner multiplies `form`'s flops by: its seconds per flop relative to the median
    form's, 1 without a calibration (or for a form it did not measure)."""
    r = rates()
    if not r or form not in r:
        return 1.0
    return r[form] / statistics.median(r.values())


def measure(progress=print, lengths=LENGTHS, rounds: int = 5) -> dict:
    """Time each form of sites() (forward, median of `rounds`) at `lengths`: {"cpu", "threads",
    "rates": {form: s/flop}, "measured": {form: {N: (seconds, flops)}}}."""
    import torch

    import attndsl
    from .passes.plan import cost_of
    out: dict = {"cpu": cpu_model(), "threads": config.num_threads(), "rates": {}, "measured": {}}
    for form, body in sites().items():
        attn = attndsl.compile(f"attention calibrate {{ {body} }}", heads=BH, head_dim=DIM, plan=form)
        decision = attn.planned.decisions[0]
        per = {}
        for n in lengths:
            q, k, v = (torch.randn(1, BH, n, DIM) for _ in range(3))
            with torch.no_grad():
                attn(q, k, v)
                times = []
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    attn(q, k, v)
                    times.append(time.perf_counter() - t0)
            per[n] = (statistics.median(times), BH * cost_of(form, decision.site, n, calibrated=False))
        out["measured"][form] = per
        out["rates"][form] = statistics.median(t / f for t, f in per.values())
        progress(f"  {form:13s} " + "  ".join(f"N={n}: {1e3 * t:.2f} ms ({f / t / 1e9:.1f} GFLOP/s)"
                                              for n, (t, f) in per.items()))
    return out


def save(result: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    return path

"""The cost model, calibrated on this machine: each form's time as a fixed cost plus seconds per flop.

The planner's costs are flop counts (lowering/costs.py, each form's record). Forms reach very
different flop rates (register-tiled GEMMs, FFT butterflies, scans), and their fixed costs per
call (parallel regions, passes over the rows) differ too, so the lengths where flop counts cross
are not where the kernels do. `attndsl calibrate` times each form's forward kernels on a
representative site (B·H = 8, Dk = Dv = 64, float32) at LENGTHS (256, 512, 2048) and stores, per
form, the median seconds per flop and the measurements in <tuning database>/calibration.json,
with the CPU model it ran on. From the measurements at two lengths or more, each form's time is fitted as
t = a + r·flops (least squares of the relative error, a ≥ 0); the planner's cost of a form is then
(a/BH + r·flops)/r₀ per batch·head, r₀ the median form's r: flops at the median rate, plus the
fixed cost spread over the calibration's B·H rows. A file with rates only (or a fit with r ≤ 0)
gives a = 0, r = the rate. Files are read where they match this CPU: the user's (where `attndsl
tune` writes), else the one shipped in schedules/tuned/. ATTNDSL_UNCALIBRATED=1 plans by flops
alone.
"""
from __future__ import annotations

import json
import statistics
import time
import warnings
from pathlib import Path

from . import config

FILE = "calibration.json"
LENGTHS = (256, 512, 2048)
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


_RATES: dict[tuple, tuple[dict[str, float], dict[str, tuple[float, float]]] | None] = {}


def fit(measured: dict) -> tuple[float, float] | None:
    """(a seconds, r seconds per flop) of t = a + r·f over {N: (t, f)}, a ≥ 0, by least squares of
    the relative error (weights 1/t², so that the short lengths count as much as the long ones);
    None with fewer than two distinct flop counts or r ≤ 0."""
    pts = [(float(f), float(t)) for t, f in measured.values()]
    if len({f for f, _ in pts}) < 2 or min(t for _, t in pts) <= 0:
        return None
    w = [1 / t ** 2 for _, t in pts]
    sw, sf, sff = sum(w), sum(x * f for x, (f, _) in zip(w, pts)), sum(x * f * f for x, (f, _) in zip(w, pts))
    st, sft = sum(x * t for x, (_, t) in zip(w, pts)), sum(x * f * t for x, (f, t) in zip(w, pts))
    det = sw * sff - sf * sf
    a, r = (sff * st - sf * sft) / det, (sw * sft - sf * st) / det
    if a < 0:                                   # through the origin
        a, r = 0.0, sft / sff
    return (a, r) if r > 0 else None


def _load(path: Path) -> tuple[str, dict[str, float], dict[str, tuple[float, float]]]:
    """(cpu, rates, {form: (a, r)}) of a calibration file; raises on a damaged one."""
    data = json.loads(path.read_text())
    found = {str(f): float(r) for f, r in data["rates"].items() if float(r) > 0}
    affine = {}
    for form, rate in found.items():
        per = data.get("measured", {}).get(form)
        line = fit(per) if isinstance(per, dict) else None
        affine[form] = line if line is not None else (0.0, rate)
    return data["cpu"], found, affine


def _calibration() -> tuple[dict[str, float], dict[str, tuple[float, float]]] | None:
    """(rates, affine fits) of the first calibration file that matches this CPU, or None (then the
    planner compares flops). A damaged file is warned about and skipped."""
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
                cpu, found, affine = _load(path)
            except (OSError, ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError) as e:
                warnings.warn(f"attndsl: ignoring the damaged calibration file {path} ({e}); "
                              f"`attndsl calibrate` writes a new one", stacklevel=3)
                continue
            if cpu == cpu_model():
                _RATES[key] = (found, affine)
                break
    return _RATES[key]


def rates() -> dict[str, float] | None:
    """{form: median seconds per flop} of the calibration that matches this CPU, or None."""
    c = _calibration()
    return c[0] if c else None


def cost(form: str, flops: float) -> float:
    """The planner's cost of `form` doing `flops` per batch·head: (a/BH + r·flops)/r₀ with the
    form's fit and the median form's r₀; `flops` without a calibration (or for a form it did not
    measure)."""
    c = _calibration()
    if not c or form not in c[1]:
        return flops
    a, r = c[1][form]
    return (a / BH + r * flops) / statistics.median(rr for _, rr in c[1].values())


def measure(progress=print, lengths=LENGTHS, rounds: int = 7) -> dict:
    """Time each form of sites() (forward) at `lengths`, the forms and lengths interleaved in each
    of `rounds` rounds (a busy moment of a shared machine hits one sample of each, not one form),
    medians: {"cpu", "threads", "rates": {form: s/flop}, "measured": {form: {N: (seconds, flops)}}}."""
    import torch

    import attndsl
    from .passes.plan import cost_of
    out: dict = {"cpu": cpu_model(), "threads": config.num_threads(), "rates": {}, "measured": {}}
    runs, flops = {}, {}
    for form, body in sites().items():
        attn = attndsl.compile(f"attention calibrate {{ {body} }}", heads=BH, head_dim=DIM, plan=form)
        site = attn.planned.decisions[0].site
        for n in lengths:
            q, k, v = (torch.randn(1, BH, n, DIM) for _ in range(3))
            runs[form, n] = (attn, q, k, v)
            flops[form, n] = BH * cost_of(form, site, n, calibrated=False)
    times: dict = {key: [] for key in runs}
    with torch.no_grad():
        for attn, q, k, v in runs.values():
            attn(q, k, v)                                          # warm: build, first-call checks
        for _ in range(rounds):
            for key, (attn, q, k, v) in runs.items():
                t0 = time.perf_counter()
                attn(q, k, v)
                times[key].append(time.perf_counter() - t0)
    for form in sites():
        per = {n: (statistics.median(times[form, n]), flops[form, n]) for n in lengths}
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

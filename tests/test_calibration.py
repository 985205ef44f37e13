"""The calibrated cost model: measured rates and fixed costs move the planner's crossovers; a file
for another CPU or a damaged one is ignored (the damaged one with a warning), never a failed
compile."""
import json

import pytest

from attndsl import calibration, pipeline
from attndsl.parse import parse

SMOOTH = parse("attention t { kernel = elu1; position(r) = -0.02 * abs(r) + 0.5 * cos(r / 16) }").block(None)


def crossover(lo=16, hi=65536) -> int:
    """The first N at which the plan leaves the pairwise form."""
    def form(n):
        return pipeline.run(SMOOTH, 64, 64, n=n).forms[0]
    assert form(lo) == "pairwise"
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if form(mid) == "pairwise" else (lo, mid)
    return hi


@pytest.fixture
def db(tmp_path, monkeypatch):
    monkeypatch.delenv("ATTNDSL_UNCALIBRATED", raising=False)      # conftest turns it off
    monkeypatch.setenv("ATTNDSL_TUNING_DB", str(tmp_path))
    monkeypatch.setattr(calibration, "_RATES", {})
    monkeypatch.setattr("attndsl.schedules.lookup.SHIPPED", tmp_path / "none")
    return tmp_path


def write(folder, rates, cpu=None, measured=None):
    data = {"cpu": cpu or calibration.cpu_model(), "rates": rates}
    if measured:
        data["measured"] = measured
    (folder / calibration.FILE).write_text(json.dumps(data))


def test_the_fit_is_a_fixed_cost_plus_a_rate():
    assert calibration.fit({"512": [2e-3, 1e8], "2048": [5e-3, 4e8]}) == pytest.approx((1e-3, 1e-11))
    a, r = calibration.fit({"512": [1e-3, 1e8], "2048": [5e-3, 4e8]})      # a < 0: through the origin
    w = (1 / 1e-3 ** 2, 1 / 5e-3 ** 2)                                       # relative errors
    assert a == 0 and r == pytest.approx((w[0] * 1e8 * 1e-3 + w[1] * 4e8 * 5e-3) / (w[0] * 1e16 + w[1] * 16e16))
    assert calibration.fit({"512": [1e-3, 1e8]}) is None


def test_a_fixed_cost_keeps_the_cheaper_form_longer(db):
    """The same rate for both forms; a fixed cost of the FFT form's (its passes and parallel
    regions) moves the crossover up; the file's rates alone (no measurements) do not."""
    write(db, {"pairwise": 1e-11, "toeplitz_fft": 1e-11})
    calibration._RATES.clear()
    without = crossover()
    line = lambda a: {"512": [a + 1e-11 * 1e8, 1e8], "2048": [a + 1e-11 * 4e8, 4e8]}
    write(db, {"pairwise": 1e-11, "toeplitz_fft": 1e-11},
          measured={"pairwise": line(0.0), "toeplitz_fft": line(0.5)})
    calibration._RATES.clear()
    assert crossover() > 1.3 * without


def test_measured_rates_move_the_crossover(db):
    by_flops = crossover()
    write(db, {"pairwise": 1e-11, "toeplitz_fft": 4e-11})      # the FFT's flops run 4x slower
    calibration._RATES.clear()
    assert crossover() > 2 * by_flops
    write(db, {"pairwise": 4e-11, "toeplitz_fft": 1e-11})
    calibration._RATES.clear()
    assert crossover() < by_flops / 2


def test_another_cpu_s_or_no_calibration_plans_by_flops(db, monkeypatch):
    by_flops = crossover()
    write(db, {"pairwise": 1e-11, "toeplitz_fft": 4e-11}, cpu="some other CPU")
    calibration._RATES.clear()
    assert crossover() == by_flops
    write(db, {"pairwise": 1e-11, "toeplitz_fft": 4e-11})
    monkeypatch.setenv("ATTNDSL_UNCALIBRATED", "1")
    assert crossover() == by_flops


@pytest.mark.parametrize("text", ["{not json", '{"cpu": 3}', '{"rates": {"pairwise": "fast"}, "cpu": "x"}'])
def test_a_damaged_calibration_file_is_warned_about_and_ignored(db, text):
    by_flops = crossover()
    (db / calibration.FILE).write_text(text)
    calibration._RATES.clear()
    with pytest.warns(UserWarning, match="damaged calibration file"):
        assert crossover() == by_flops


def test_cli_calibrate_times_the_forms_and_writes_the_file(db, monkeypatch, capsys):
    from attndsl.cli import main
    every = calibration.sites()
    monkeypatch.setattr(calibration, "sites", lambda: {f: every[f] for f in ("prefix_sum", "pairwise")})
    monkeypatch.setattr(calibration, "DIM", 8)
    assert main(["calibrate", "--lengths", "64,128", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "prefix_sum" in out and "pairwise" in out and "x the fastest form's time per flop" in out
    data = json.loads((db / calibration.FILE).read_text())
    assert data["cpu"] == calibration.cpu_model() and set(data["rates"]) == {"prefix_sum", "pairwise"}
    assert all(len(per) == 2 for per in data["measured"].values())
    calibration._RATES.clear()
    assert calibration.rates() == data["rates"]

"""Knob spaces, the meta_schedule database round trip, and a tiny tune through meta_schedule."""
import pytest

from attndsl import pipeline
from attndsl.parse import parse
from attndsl.schedules import knobs


def test_grid_starts_with_the_default_and_covers_every_choice():
    grid = knobs.grid("linear")
    assert grid[0] == knobs.defaults("linear")
    assert len(grid) == len({tuple(sorted(g.items())) for g in grid}) == 9


@pytest.mark.parametrize("bad, match", [({"chunks": 32}, "no knob 'chunks'"), ({"chunk": 48}, "chunk=48")])
def test_resolve_rejects_unknown_knobs_and_choices(bad, match):
    with pytest.raises(ValueError, match=match):
        knobs.resolve("linear", bad)


def test_trace_decisions_round_trip():
    from attndsl.lowering import linear
    from attndsl.schedules import database
    mod = database.workload(linear.linear_forward("k", 16, 16, "float32", True))
    choice = {"chunk": 64, "tile_regs": 8}
    assert database.choice_of(database.trace_of(mod, "linear", choice), "linear") == choice


def test_tune_records_and_choose_reads_them(tmp_path):
    """Two candidates of a causal linear kernel at N = 64, timed by meta_schedule's LocalRunner,
    committed to a JSONDatabase that choose() then reads back."""
    import tvm
    from attndsl.lowering import lower, tune
    from attndsl.lowering.build import resolve_target
    from attndsl.schedules import database
    root = pipeline.run(parse("attention t { kernel = elu1; mask = causal }").block(None), 16, 16).root
    rows = tune.tune(root, "float32", sizes={"BH": 2, "H": 2, "P": 1}, lengths=[64], trials=2,
                     db_folder=tmp_path, repeat=2, progress=lambda s: None)
    assert rows and all(len(r.times) == 2 and not r.errors for r in rows)
    target = tvm.target.Target(resolve_target("llvm"))
    funcs = lower(root, "float32")
    for r in rows:
        choice = database.choose([tmp_path], funcs[r.kernel], "linear", target)
        assert choice is not None and knobs.label(choice.knobs) == r.best[0]
    assert "| speed-up |" in tune.summary(rows)


def test_cli_tune_writes_a_database_and_prints_the_summary(tmp_path, capsys):
    from attndsl.cli import main
    spec = tmp_path / "t.attn"
    spec.write_text("attention t {\n  kernel = relu\n  mask = causal\n}\n")
    db = tmp_path / "db"
    assert main(["tune", str(spec), "--heads", "2", "--head-dim", "16", "--lengths", "64",
                 "--trials", "1", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "tuning t" in out and "| speed-up |" in out and "1.00x" in out
    assert (db / "database_tuning_record.json").stat().st_size > 0


def test_cli_tune_rejects_a_bad_tracker_address(tmp_path, capsys):
    from attndsl.cli import main
    spec = tmp_path / "t.attn"
    spec.write_text("attention t {\n  kernel = relu\n}\n")
    assert main(["tune", str(spec), "--rpc-tracker", "nohostport", "--rpc-key", "k"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err

"""Bad arguments outside the spec text get a clear one-line error, never a TVM or Python traceback:
compile()'s Python arguments, spec files too large or unreadable, the command line, and sampled
calls that would draw more samples than memory holds. (Mistakes inside a spec: bad_specs/.)"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import attndsl
from attndsl import SpecError, cli, sampling
from attndsl.ast import Choice

OK = "attention a { kernel = relu }"


def test_head_dim_beyond_the_bound_is_refused_before_compiling():
    with pytest.raises(ValueError, match=r"head_dim must be a positive int at most 1024 .*got 1000000"):
        attndsl.compile(OK, heads=1, head_dim=10**6)
    with pytest.raises(ValueError, match="value_dim must be a positive int at most 1024"):
        attndsl.compile(OK, heads=1, head_dim=8, value_dim=4096)
    with pytest.raises(TypeError, match="head_dim must be a positive int, got float 8.0"):
        attndsl.compile(OK, heads=1, head_dim=8.0)


def test_spec_as_bytes_is_its_text():
    spec = attndsl.parse(OK.encode()).block()
    with pytest.raises(SpecError, match="holds no attention block"):
        attndsl.compile(b"# nothing\n", heads=1, head_dim=8)
    assert attndsl.read_spec(OK.encode()) == (OK.encode(), "<spec>")
    assert spec.kernel.name == "relu"


@pytest.mark.parametrize("value", [42, None, ["attention a { }"]], ids=["int", "none", "list"])
def test_spec_of_another_type_is_a_type_error(value):
    with pytest.raises(TypeError, match="a spec is given as its text"):
        attndsl.compile(value, heads=1, head_dim=8)


def test_a_2_gib_spec_file_is_refused_without_reading_it(tmp_path, monkeypatch):
    path = tmp_path / "huge.attn"
    with path.open("wb") as f:               # sparse: nothing is written
        f.truncate(2 * 2**30)

    def no_reading(*_, **__):
        raise AssertionError("the file was opened")
    monkeypatch.setattr(Path, "open", no_reading)
    with pytest.raises(SpecError, match=r"huge.attn is 2.0 GiB: a spec is at most 1 MiB") as e:
        attndsl.compile(path, heads=1, head_dim=8)
    assert "Traceback" not in str(e.value)


def test_a_long_spec_text_is_refused():
    with pytest.raises(SpecError, match=r"<spec> is 1.5 MiB: a spec is at most 1 MiB"):
        attndsl.parse(OK + "\n" + "#" * (3 << 19))


def test_an_unreadable_spec_file(tmp_path, monkeypatch, capsys):
    path = tmp_path / "locked.attn"
    path.write_text(OK)
    real_open = Path.open

    def locked(self, *args, **kwargs):
        if self.name == "locked.attn":
            raise PermissionError(13, "Permission denied")
        return real_open(self, *args, **kwargs)
    monkeypatch.setattr(Path, "open", locked)
    with pytest.raises(SpecError, match="cannot read the spec file .*locked.attn.*: Permission denied"):
        attndsl.compile(str(path), heads=1, head_dim=8)
    assert cli.main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Permission denied" in err and "Traceback" not in err


def test_cli_missing_file_is_one_line(capsys):
    assert cli.main(["check", "no/such/file.attn"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no spec file" in err


@pytest.mark.parametrize("argv, message", [
    (["run", "F", "--heads", "-1"], "argument --heads: must be an integer >= 1, got -1"),
    (["run", "F", "--seq", "0"], "argument --seq: must be an integer >= 1, got 0"),
    (["run", "F", "--batch", "0"], "argument --batch: must be an integer >= 1, got 0"),
    (["run", "F", "--repeat", "0"], "argument --repeat: must be an integer >= 1, got 0"),
    (["run", "F", "--head-dim", "1000000"], "argument --head-dim: must be an integer in [1, 1024]"),
    (["emit", "F", "--value-dim", "x"], "argument --value-dim: expected an integer, got 'x'"),
    (["tune", "F", "--lengths", "1024,0"], "argument --lengths: must be an integer >= 1, got 0"),
    (["tune", "F", "--trials", "0"], "argument --trials: must be an integer >= 1, got 0"),
], ids=["heads", "seq", "batch", "repeat", "head-dim", "value-dim", "lengths", "trials"])
def test_cli_bad_numbers_are_one_line_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_too_many_samples_for_a_call_are_refused_before_allocating():
    choice = Choice("uniform", (("samples", 65536), ("seed", 0)))
    q = torch.randn(600, 4, 8)                    # B·H = 600 rows × 65536 samples = 39M > 2^25
    with pytest.raises(ValueError, match=r"draws 65536 keys for each of the B·H = 600 rows"):
        sampling.draw(q, q, q, choice, None, 0)
    small = sampling.draw(q[:2], q[:2], q[:2], choice, None, 0)   # 2 rows: fine
    assert small.si.shape == (2, 65536)


def test_position_check_is_quick_and_uses_the_documented_reach():
    from attndsl.check import POSITION_REACH
    assert POSITION_REACH == 65536
    attndsl.parse("attention a { position(r) = log(1 + abs(r)) - 1 / (1 + abs(r)) }")
    with pytest.raises(SpecError, match="not finite at r = 65536"):
        attndsl.parse("attention a { position(r) = 1 / (65536 - abs(r)) }")
    attndsl.parse("attention a { position(r) = 1 / (65537 - abs(r)) }")     # beyond the reach

"""Every mistake is a located SpecError: the corpus in bad_specs/ holds one mistake per file.

Each file starts with `# expect: <part of the message>` and `# at: LINE:COL` (the culprit,
counting these comment lines). The diagnostic must name file:LINE:COL, show the line with a caret
under that column, and never leak Lark or Python internals.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from attndsl.diagnostics import SpecError
from attndsl.parse import parse

CORPUS = sorted((Path(__file__).parent / "bad_specs").glob("*.attn"))
LEAKS = ("Traceback", "lark", "Token(", "Tree(")


def header(text: str) -> tuple[str, int, int]:
    expect = re.search(r"^# expect: (.+)$", text, re.M).group(1)
    line, col = re.search(r"^# at: (\d+):(\d+)$", text, re.M).groups()
    return expect, int(line), int(col)


def assert_located(err: SpecError, text: str, filename: str, line: int, col: int) -> None:
    shown = str(err)
    assert f"{filename}:{line}:{col}" in shown, shown
    assert text.splitlines()[line - 1].expandtabs(1) in shown, shown
    assert f" | {' ' * (col - 1)}^" in shown, shown      # the caret sits under the culprit
    assert not any(leak in shown for leak in LEAKS), shown


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 35


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_bad_spec(path: Path):
    data = path.read_bytes()
    text = data.decode("utf-8", "replace")
    expect, line, col = header(text)
    with pytest.raises(SpecError) as info:
        parse(data, filename=str(path))
    err = info.value
    assert isinstance(err, ValueError)
    assert expect in err.message, str(err)
    assert_located(err, text, str(path), line, col)


def test_misspelled_kernel_suggests_favor():
    with pytest.raises(SpecError) as info:
        parse("attention a {\n    kernel = favour\n}\n")
    assert "did you mean 'favor'" in info.value.help
    assert "did you mean 'favor'" in str(info.value)


def nested(depth: int) -> str:
    return "attention deep {\n    kernel(x) = " + "(" * depth + "x" + ")" * depth + "\n}\n"


@pytest.mark.parametrize("text, expect, line, col", [
    (nested(3000), "parentheses nested more than 100 deep", 2, 117),
    ("attention deep {\n    kernel(x) = " + "exp(" * 3000 + "x" + ")" * 3000 + "\n}\n",
     "parentheses nested more than 100 deep", 2, 420),
    ("attention deep {\n    kernel(x) = " + "-" * 3000 + "x\n}\n", "nested more than 200 levels", 2, None),
    ("attention deep {\n    kernel(x) = " + " + ".join(["x"] * 3000) + "\n}\n",
     "nested more than 200 levels", 2, None),
], ids=["parens-3000", "calls-3000", "minus-3000", "sum-3000"])
def test_deep_nesting_is_a_spec_error(text, expect, line, col):
    with pytest.raises(SpecError) as info:
        parse(text, filename="deep.attn")
    assert expect in info.value.message
    assert f"deep.attn:{line}:" in str(info.value)
    if col is not None:
        assert_located(info.value, text, "deep.attn", line, col)


def test_99_nested_calls_are_fine():
    # abs, not exp: 99 nested exp pass the parser but are refused as too many calls to compile
    text = "attention ok {\n    kernel(x) = " + "abs(" * 99 + "x" + ")" * 99 + "\n}\n"
    assert parse(text).block().kernel.name == "user"


@pytest.mark.parametrize("data, line, col", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", 1, 1),
    (b"attention a {\n    kernel = relu\n}\n\xff\xfe\x00", 4, 1),
], ids=["png-header", "junk-after-block"])
def test_binary_junk(data, line, col):
    with pytest.raises(SpecError) as info:
        parse(data, filename="junk.attn")
    assert "is not UTF-8 text" in info.value.message
    assert_located(info.value, data.decode("utf-8", "replace"), "junk.attn", line, col)


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing here\n"], ids=["empty", "blank", "comment"])
def test_no_blocks(text):
    with pytest.raises(SpecError, match="holds no attention block"):
        parse(text, filename="empty.attn")


def test_nul_character_is_located():
    text = "attention a {\n    kernel = relu\x00\n}\n"
    with pytest.raises(SpecError, match="unexpected character") as info:
        parse(text, filename="nul.attn")
    assert "nul.attn:2:18" in str(info.value)


def test_non_text_input_is_a_type_error():
    with pytest.raises(TypeError):
        parse(42)

"""Property tests of the command line's argument parsing: any argv either parses to exactly the values given or
exits with status 2 and one line on stderr that names the offending option or value — never a traceback, never
a silently different value. (Parsing only: no command runs.)"""
from __future__ import annotations

import contextlib
import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from python_api.app.cli import build_parser

# option -> (commands that take it, kind of value)
POSITIVE_INT = {"--steps": ("demo", "alloc", "profile"), "--r": ("alloc", "train"), "--r-init": ("alloc", "train"),
                "--batch-size": ("train",), "--max-length": ("train",), "--repeats": ("profile",)}
POSITIVE_FLOAT = {"--beta": ("alloc", "train"), "--lr": ("train",)}
CHOICES = {"--method": {"alloc": ("shaplora", "adalora", "alphalora")},
           "--task": {"train": ("classify", "causal-lm")}}
REQUIRED = {"alloc": ["--method", "shaplora"],
            "train": ["--model", "m", "--data", "d.csv", "--method", "lora", "--out", "o"]}

texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)


def _parse(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return build_parser().parse_args(argv), None
        except SystemExit as e:
            return None, (e.code, err.getvalue())


def _command_and_base(draw, command):
    return [command, *REQUIRED.get(command, [])]


@st.composite
def numeric_case(draw):
    opt, cmds = draw(st.sampled_from(sorted({**POSITIVE_INT, **POSITIVE_FLOAT}.items())))
    command = draw(st.sampled_from(cmds))
    is_int = opt in POSITIVE_INT
    value = draw(st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True), texts))
    return command, opt, value, is_int


@given(numeric_case())
def test_numeric_options_parse_exactly_or_exit_2_naming_the_option(case):
    command, opt, value, is_int = case
    raw = str(value)
    ns, err = _parse([*_command_and_base(None, command), opt, raw])
    dest = opt.lstrip("-").replace("-", "_")
    if ns is not None:
        got = getattr(ns, dest)
        if is_int:
            assert float(got) == float(raw.strip()) and got >= 1 and isinstance(got, int)
        else:
            assert got == float(raw) and 0 < got < float("inf")
    else:
        code, text = err
        assert code == 2 and text.count("\n") == 1 and "Traceback" not in text
        assert opt in text or repr(raw) in text or raw in text, text


@given(st.sampled_from(sorted(CHOICES)), texts)
def test_choice_options_accept_only_their_choices(opt, value):
    command, choices = next(iter(CHOICES[opt].items()))
    base = [c for c in _command_and_base(None, command)]
    if opt in base:   # replace the required value
        i = base.index(opt)
        base = base[:i] + base[i + 2:]
    ns, err = _parse([*base, opt, value])
    if value in choices:
        assert ns is not None and getattr(ns, opt.lstrip("-")) == value
    else:
        assert ns is None and err[0] == 2 and err[1].count("\n") == 1 and opt in err[1]


@given(st.lists(texts, max_size=4))
def test_any_argv_parses_or_exits_2_with_one_line(argv):
    ns, err = _parse(argv)
    if ns is None:
        code, text = err
        assert code in (0, 2)          # 0: --help / -h printed usage
        if code == 2:
            assert text.count("\n") == 1 and "Traceback" not in text and "error:" in text
    else:
        assert ns.command in ("demo", "alloc", "train", "bench", "profile", "info")


@pytest.mark.parametrize("argv, words", [
    (["--bogus"], "--bogus"), (["train", "--model", "m"], "required"), (["alloc"], "--method"),
    (["demo", "--steps", "0"], "positive integer"), (["train", *REQUIRED["train"], "--steps", "3", "--epochs", "1"],
                                                     "not allowed with"),
])
def test_examples(argv, words):
    ns, err = _parse(argv)
    assert ns is None and err[0] == 2 and words in err[1]

"""The README says what the program does today: every `plumb` command in it parses, and
its printed sample is what `plumb train` prints now (numbers within 5%: the words, codes
and fixes exactly)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from plumb.cli import main, make_parser

README = Path(__file__).resolve().parent.parent / "README.md"
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def _blocks(text: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)


def _commands(text: str) -> list[list[str]]:
    out = []
    for block in _blocks(text):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("plumb ") and not line.split()[1].endswith(":"):  # not output
                out.append(shlex.split(line, comments=True)[1:])
    return out


def test_every_readme_command_parses():
    cmds = _commands(README.read_text())
    assert len(cmds) > 20
    parser = make_parser()
    for argv in cmds:
        try:
            parser.parse_args(argv)
        except SystemExit as e:  # argparse's way of refusing
            pytest.fail(f"README command `plumb {' '.join(argv)}` does not parse ({e})")


def _masked(line: str) -> tuple[str, list[float]]:
    return NUMBER.sub("#", line), [float(x) for x in NUMBER.findall(line)]


def test_the_readme_sample_is_what_train_prints(tmp_path, capsys):
    text = README.read_text()
    sample = next(b for b in _blocks(text) if b.startswith("doctor: "))
    argv = "train --preset lecture-mlp:original --steps 300 --threads 1 --no-progress --samples 0"
    assert main([*argv.split(), "--out", str(tmp_path / "r"), "--no-report"]) == 0
    out = capsys.readouterr().out
    printed = out[out.index("doctor: ") :].splitlines()[: len(sample.splitlines())]
    _same(sample.splitlines(), printed)


def _same(sample: list[str], printed: list[str]) -> None:
    for want, got in zip(sample, printed, strict=True):
        (w, wn), (g, gn) = _masked(want), _masked(got)
        assert w == g, f"docs: {want}\nprints: {got}"
        for a, b in zip(wn, gn, strict=True):
            assert b == pytest.approx(a, rel=0.05, abs=0.01), f"docs: {want}\nprints: {got}"


def test_the_doctor_sample_in_the_docs_is_current(capsys):
    """docs/doctor.md's `plumb doctor --preset lecture-mlp:original` is today's output."""
    text = (README.parent / "docs" / "doctor.md").read_text()
    start = "$ plumb doctor --preset lecture-mlp:original; echo $?\n"
    block = text[text.index(start) + len(start) :]
    sample = block[: block.index("```")].rstrip("\n").splitlines()
    assert sample[-1] == "1"  # the exit code
    assert main(["doctor", "--preset", "lecture-mlp:original"]) == 1
    _same(sample[:-1], capsys.readouterr().out.rstrip("\n").splitlines())

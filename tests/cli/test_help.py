"""Every command's --help renders at 80 and 110 columns: it fits, lists every option, and the command
list shows each summary whole (Typer shows a docstring's first paragraph there, line breaks and all)."""

from __future__ import annotations

import inspect

import pytest
import typer
from typer.testing import CliRunner

from maskseg.cli import app

GROUP = typer.main.get_command(app)
COMMANDS = list(GROUP.commands)  # type: ignore[attr-defined]
BOX = str.maketrans("", "", "│╭╮╰╯─")


def render(args: list[str], columns: int) -> str:
    r = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": str(columns)}, prog_name="maskseg")
    assert r.exit_code == 0, (r.output, r.exception)
    return r.output


def flat(text: str) -> str:
    """The words of ``text`` without the panels' box drawing, one space apart."""
    return " ".join(text.translate(BOX).split())


def summary(name: str) -> str:
    return inspect.cleandoc(GROUP.commands[name].callback.__doc__).split("\n\n")[0]  # type: ignore[attr-defined]


def test_every_command_is_registered():
    assert COMMANDS == ["predict", "writers", "models", "eval", "train", "inspect", "export", "merge"]


@pytest.mark.parametrize("columns", [80, 110])
@pytest.mark.parametrize("name", COMMANDS)
def test_command_help_fits_and_lists_every_option(name, columns):
    text = render([name], columns)
    assert max(len(line) for line in text.splitlines()) <= columns
    assert f"Usage: maskseg {name}" in text
    assert flat(summary(name)) in flat(text)
    for param in GROUP.commands[name].params:
        for opt in (*param.opts, *param.secondary_opts):
            if opt.startswith("-"):
                assert opt in text, (name, opt)
    assert "-h" in text and "--help" in text


@pytest.mark.parametrize("columns", [80, 110])
def test_top_level_help_lists_each_summary_whole(columns):
    text = render([], columns)
    assert max(len(line) for line in text.splitlines()) <= columns
    for name in COMMANDS:
        assert f"│ {name} " in text, name
        assert flat(summary(name)) in flat(text), name


@pytest.mark.parametrize("name", COMMANDS)
def test_summaries_are_one_line_sentences(name):
    """A summary is one full sentence on one docstring line, so at any width nothing breaks it mid-way
    (a line break inside the first paragraph shows up as a break in `maskseg --help`)."""
    line = summary(name)
    assert "\n" not in line and line.endswith("."), line
    wide = render([], 200)
    assert any(line in row for row in wide.splitlines()), line

"""The README stays short, and its command table matches the CLI in both directions."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from glasslab.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
MAX_LINES = 300


def table_commands(text: str) -> list[str]:
    """The first cell of each row of the table whose header starts with `| command |`, backticks removed."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"\|\s*command\s*\|", line))
    commands = []
    for line in lines[start + 2 :]:  # skip the header and the |---| row
        if not line.startswith("|"):
            break
        commands.append(line.split("|")[1].strip().strip("`"))
    return commands


def registered_commands() -> set[str]:
    return set(typer.main.get_command(app).commands)


def test_readme_is_short() -> None:
    n = len(README.read_text().splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines; at most {MAX_LINES} (move details to docs/)"


def test_command_table_matches_the_cli() -> None:
    names = table_commands(README.read_text())
    assert len(names) == len(set(names)), f"a command is listed twice: {names}"
    assert set(names) == registered_commands()


@pytest.mark.parametrize("command", table_commands(README.read_text()))
def test_each_listed_command_has_help(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output

"""The CLI skeleton: every command answers --help, and startup stays light."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from orchestrator.cli import COMMANDS, cli

HEAVY = ("torch", "ray", "deepspeed", "diffusers", "transformers", "mlflow")


def _command_paths(group: click.Group, ctx: click.Context, prefix: tuple[str, ...] = ()):
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from _command_paths(command, ctx, (*prefix, name))


def _all_paths() -> list[tuple[str, ...]]:
    with click.Context(cli) as ctx:
        return [(), *_command_paths(cli, ctx)]


@pytest.mark.parametrize("path", _all_paths(), ids=lambda p: " ".join(p) or "m2d")
def test_help_of_every_command(path):
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_every_registered_command_is_listed():
    result = CliRunner().invoke(cli, ["--help"])
    for name, (_, short_help) in COMMANDS.items():
        assert name in result.output and short_help in result.output


@pytest.mark.parametrize("argv", [["--help"], ["cluster", "list"], ["cluster", "validate"]])
def test_startup_imports_no_heavy_framework(argv):
    probe = (
        "import sys, json\n"
        "from orchestrator.cli import cli\n"
        f"try:\n    cli.main({argv!r}, standalone_mode=False)\n"
        "except SystemExit:\n    pass\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_unknown_command_is_a_usage_error():
    result = CliRunner().invoke(cli, ["lunch"])
    assert result.exit_code == 2
    assert "No such command 'lunch'" in result.output

"""`facereward --help` lists the commands in groups; each command's help opens with an example that parses."""

from __future__ import annotations

import shlex

import typer
from typer.testing import CliRunner

from facereward.cli import HELP_GROUPS, app


def test_every_command_has_a_group_and_an_example_whose_options_exist():
    command = typer.main.get_command(app)
    assert set(command.commands) == set(HELP_GROUPS)
    for name, (panel, example) in HELP_GROUPS.items():
        sub = command.commands[name]
        assert sub.help.startswith(f"Example: facereward {name} "), name
        options = {o for p in sub.params for o in [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]}
        unknown = [t for t in shlex.split(example) if t.startswith("--") and t.split("=")[0] not in options]
        assert not unknown, f"{name}: {unknown}"


def test_help_shows_the_groups_in_order():
    out = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "120"}).output
    positions = [out.index(panel) for panel in ("Data", "Training", "Restoring and evaluating", "Tools")]
    assert positions == sorted(positions)

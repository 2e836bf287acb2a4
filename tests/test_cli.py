"""The `openzaya` command's flag set is frozen: every subcommand's flags (with their defaults) must equal
tests/assets/cli_flags.json, so an accidental rename, removal or default change fails here (torchtitan keeps the same
kind of test). A deliberate change regenerates the asset:

    OPENZAYA_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_cli.py

Run: .venv/bin/python -m pytest tests/test_cli.py"""

import argparse
import json
import os
from pathlib import Path

from openzaya.cli import build_parser

ASSET = Path(__file__).parent / "assets" / "cli_flags.json"


def _jsonable(v):
    return v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)


def flag_table(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, dict]:
    """{"subcommand [subsubcommand]": {"--flag": default, "positional": "<positional>"}} over the whole tree."""
    table: dict[str, dict] = {}
    own: dict[str, object] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                table.update(flag_table(sub, f"{prefix} {name}".strip()))
        elif isinstance(action, argparse._HelpAction):
            continue
        elif action.option_strings:
            own[" ".join(sorted(action.option_strings))] = _jsonable(action.default)
        else:
            own[action.dest] = "<positional>"
    if prefix:
        table[prefix] = dict(sorted(own.items()))
    return table


def test_cli_flags_are_frozen():
    table = flag_table(build_parser())
    if os.environ.get("OPENZAYA_UPDATE_GOLDEN"):
        ASSET.parent.mkdir(parents=True, exist_ok=True)
        ASSET.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    frozen = json.loads(ASSET.read_text())
    assert sorted(table) == sorted(frozen), "subcommands changed (regenerate the asset if on purpose)"
    for cmd in frozen:
        added = sorted(set(table[cmd]) - set(frozen[cmd]))
        removed = sorted(set(frozen[cmd]) - set(table[cmd]))
        assert not added and not removed, f"`openzaya {cmd}`: flags added {added}, removed {removed}"
        changed = {k: (frozen[cmd][k], table[cmd][k]) for k in frozen[cmd] if frozen[cmd][k] != table[cmd][k]}
        assert not changed, f"`openzaya {cmd}`: defaults changed (frozen, now): {changed}"


def test_flag_table_sees_a_rename():
    """The freeze would notice: a parser with one flag renamed differs from the original's table."""
    a, b = argparse.ArgumentParser(), argparse.ArgumentParser()
    for p, flag in ((a, "--population"), (b, "--populaton")):
        sub = p.add_subparsers(dest="command")
        sub.add_parser("solve").add_argument(flag, type=int, default=16)
    assert flag_table(a) != flag_table(b)
    assert flag_table(a) == {"solve": {"--population": 16}}

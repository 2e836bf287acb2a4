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


# ---------------------------------------------------------------------------------------------------------------------
# errors: one line `openzaya <cmd>: error: <message>`, exit status 2; --debug / OPENZAYA_DEBUG=1 keep the traceback

def one_line_error(capsys, argv, env_debug=False):
    """Run `openzaya argv` in process; return (exit status, the stderr error line), checking that stderr holds
    exactly one line that starts with `openzaya <cmd>: error:`."""
    import pytest

    from openzaya.cli import main

    try:
        rc = main(argv)
    except SystemExit as e:      # argparse exits by itself
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith("openzaya.envs: loader")]   # optional packages' notes
    assert len(err) == 1, err
    assert err[0].startswith("openzaya ") and ": error: " in err[0], err
    if rc != 2:
        pytest.fail(f"exit status {rc}, not 2: {err}")
    return err[0]


def test_bad_flag_is_one_line(capsys):
    line = one_line_error(capsys, ["solve", "q", "--model", "m", "--populaton", "2"])
    assert line.startswith("openzaya solve: error: unrecognized arguments: --populaton 2")
    assert "`openzaya solve --help`" in line


def test_unknown_names_list_the_known_ones(capsys):
    line = one_line_error(capsys, ["envs", "list", "--source", "nosuch"])
    assert line.startswith("openzaya envs list: error: unknown source 'nosuch'; sources: ") and "openzaya" in line
    line = one_line_error(capsys, ["pretrain", "--preset", "huge", "--data", "d", "--tokenizer", "t"])
    assert line == "openzaya pretrain: error: unknown --preset 'huge'; presets: nano_pretrain, nano_sft"
    line = one_line_error(capsys, ["sft", "--model-preset", "huge", "--data", "d", "--tokenizer", "t"])
    assert "unknown --model-preset 'huge'; model presets: nano, mini, micro, zaya1_8b" in line
    line = one_line_error(capsys, ["rl", "--envs", "nosuch,gcdd", "--init", "x"])
    assert "unknown environments 'nosuch', 'gcdd'; did you mean" in line and "gcd" in line
    line = one_line_error(capsys, ["envs", "sample", "nosuch"])
    assert line.startswith("openzaya envs sample: error: unknown environment 'nosuch'")


def test_rl_needs_init_as_an_error_not_an_assert(capsys, tmp_path):
    line = one_line_error(capsys, ["rl", "--cascade", "--out", str(tmp_path)])
    assert line == ("openzaya rl: error: --cascade needs --init (an SFT checkpoint directory, e.g. "
                    "runs/nano/sft/model)")
    line = one_line_error(capsys, ["rl", "--stage", "warmup", "--out", str(tmp_path), "--envs", "gcd"])
    assert "rl needs a policy: --init" in line


def test_serve_checks_device_and_port_before_loading(capsys, monkeypatch, tmp_path):
    import socket

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = one_line_error(capsys, ["serve", "--model", str(tmp_path / "no-model"), "--device", "cuda"])
    assert "--device cuda: torch" in line and "sees no CUDA device" in line and "--device cpu" in line
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_line_error(capsys, ["serve", "--model", str(tmp_path / "no-model"), "--port", str(port)])
    assert f"cannot listen on 127.0.0.1:{port}" in line and "pick another --port" in line


def test_debug_shows_the_traceback_and_bugs_keep_theirs(capsys, monkeypatch):
    import pytest

    from openzaya import cli

    argv = ["pretrain", "--preset", "huge", "--data", "d", "--tokenizer", "t"]
    with pytest.raises(ValueError, match="unknown --preset"):
        cli.main(argv + ["--debug"])
    with pytest.raises(ValueError, match="unknown --preset"):
        cli.main(["--debug"] + argv)
    monkeypatch.setenv("OPENZAYA_DEBUG", "1")
    with pytest.raises(ValueError, match="unknown --preset"):
        cli.main(argv)
    monkeypatch.delenv("OPENZAYA_DEBUG")

    def bug(a):
        raise ZeroDivisionError("a bug")
    parser = cli.build_parser()
    args = parser.parse_args(["envs", "list"])
    args.func = bug
    monkeypatch.setattr(cli, "build_parser", lambda: type("P", (), {"parse_args": lambda self, argv: args})())
    with pytest.raises(ZeroDivisionError):   # not an expected error: the traceback stays
        cli.main([])
    assert not cli.expected_error(ZeroDivisionError()) and cli.expected_error(FileNotFoundError("x"))


def test_console_script_prints_one_line_and_exits_2(tmp_path):
    """Through the real entry point (a subprocess): a malformed benchmark file names its line, exit status 2."""
    import subprocess
    import sys

    bench = tmp_path / "bench.jsonl"
    bench.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?", "answer": 4,}\n')
    r = subprocess.run([sys.executable, "-m", "openzaya.cli", "eval", "--benchmark", str(bench), "--model", "m",
                        "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [f"openzaya eval: error: {bench} line 2: not valid JSON (Expecting "
                                             "property name enclosed in double quotes, column 33); each line must "
                                             'be one JSON object such as {"problem": "...", "answer": "..."}'], r.stderr


def test_help_shows_effective_ttc_defaults(capsys):
    import pytest

    from openzaya.cli import main
    from openzaya.ttc import TTCConfig

    with pytest.raises(SystemExit):
        main(["solve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag, field in [("--population POPULATION", "population"), ("--budget-tokens BUDGET_TOKENS", "budget_tokens"),
                        ("--tail-tokens TAIL_TOKENS", "tail_tokens"), ("--rounds ROUNDS", "rounds")]:
        assert f"(default: {getattr(TTCConfig, field)}, ttc.TTCConfig" in out.split(flag)[-1].split(" --", 1)[0]
    assert "--temperature TEMPERATURE sampling temperature (0 = greedy) (default: 1.0)" in out

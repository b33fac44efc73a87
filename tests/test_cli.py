"""Every command: its --help is what the reference says, and a bad command line is one line, exit 2."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import VENV_BIN
from slurm_netacct.cli import docs
from slurm_netacct.cli.common import Command

COMMANDS = {cmd.prog: cmd for cmd in docs.COMMANDS}


def test_the_documented_reference_is_what_the_parsers_say() -> None:
    assert docs.stale() == [], "run: python -m slurm_netacct.cli.docs"


def test_every_console_script_is_documented() -> None:
    import tomllib

    scripts = tomllib.loads((docs.ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) - {"netacct-prolog", "netacct-epilog"} == set(COMMANDS)


def _run(prog: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / prog), *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **env))


@pytest.mark.parametrize("prog", sorted(COMMANDS))
def test_help_prints_the_reference_and_exits_0(prog: str) -> None:
    cmd: Command = COMMANDS[prog]
    r = _run(prog, "--help", COLUMNS=docs.WIDTH)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == docs.help_text(cmd)
    for action in cmd.parser()._actions:  # every option is in the reference
        for flag in action.option_strings:
            assert flag in docs.REFERENCE.read_text().split(f"## {prog}\n")[1].split("\n## ")[0]


REQUIRED = {"netacct-exec": ["--job", "1"], "netacct-routes": ["show"], "netacct-exporter": ["--textfile", "/x"]}


@pytest.mark.parametrize("prog", sorted(COMMANDS))
def test_an_unknown_option_is_one_line_and_exit_2(prog: str) -> None:
    r = _run(prog, *REQUIRED.get(prog, []), "--no-such-option\nx")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"{prog}: ")
    assert "--no-such-option\\nx" in r.stderr  # what was typed, escaped: still one line


@pytest.mark.parametrize("args", [["--workers", "0"], ["--workers", "x"], ["--max-jobs", "-1"]])
def test_the_daemon_refuses_bad_numbers_on_one_line(args: list[str]) -> None:
    r = _run("netacct-daemon", *args, "--socket", "/nonexistent/sock")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("netacct-daemon: argument ")

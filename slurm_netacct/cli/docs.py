"""The command reference, generated from the commands' own parsers (README and doc/commands.md).

    python -m slurm_netacct.cli.docs           # rewrite both from the parsers
    python -m slurm_netacct.cli.docs --check   # exit 1 (and say which) if either is stale

The test suite runs the check, so the documented options cannot drift from the code.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import daemon, doctor, exec, exporter, reconcile, report, routes, sacct, sample, ship
from .common import Command

COMMANDS: list[Command] = [exec.COMMAND, routes.COMMAND, daemon.COMMAND, reconcile.COMMAND, sample.COMMAND,
                           ship.COMMAND, exporter.COMMAND, report.COMMAND,
                           sacct.COMMAND, doctor.COMMAND]
ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
REFERENCE = ROOT / "doc" / "commands.md"
BEGIN = "<!-- commands: generated from the parsers by `python -m slurm_netacct.cli.docs`; do not edit -->"
END = "<!-- end of commands -->"
WIDTH = "100"  # argparse wraps at $COLUMNS: the same text on every terminal


def _fixed_width(fn):  # type: ignore[no-untyped-def]
    def wrapped(*args):  # type: ignore[no-untyped-def]
        old = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = WIDTH
        try:
            return fn(*args)
        finally:
            if old is None:
                del os.environ["COLUMNS"]
            else:
                os.environ["COLUMNS"] = old
    return wrapped


@_fixed_width
def synopsis(cmd: Command) -> str:
    """The command's usage line(s), without "usage: "."""
    return " ".join(cmd.parser().format_usage().removeprefix("usage: ").split())


@_fixed_width
def help_text(cmd: Command) -> str:
    return cmd.parser().format_help()


def readme_block() -> str:
    """The README's list of commands: each one's synopsis and what it is for."""
    lines = [BEGIN, "- `prolog`, `epilog` (or `netacct-prolog`, `netacct-epilog`): run by slurmd with the SLURM",
             "  environment (`SLURM_JOB_ID`, `SLURM_JOB_USER`, `SLURM_JOB_UID`, `SLURMD_NODENAME`,",
             "  `SLURM_JOB_ACCOUNT`, `SLURM_JOB_PARTITION`, `SLURM_JOB_RESTART_COUNT`). Idempotent."]
    for cmd in COMMANDS:
        lines.append(f"- `{synopsis(cmd)}`: {cmd.summary[0].lower()}{cmd.summary[1:]}.")
    lines += ["", "Every option of every command: [doc/commands.md](doc/commands.md) (their `--help`).", END]
    return "\n".join(lines)


def reference() -> str:
    parts = ["# Command reference", "",
             "Generated from the commands' parsers by `python -m slurm_netacct.cli.docs` (the test",
             "suite checks it is current): what `--help` prints.", ""]
    for cmd in COMMANDS:
        parts += [f"## {cmd.prog}", "", "```", help_text(cmd).rstrip(), "```", ""]
    return "\n".join(parts)


def _with_block(readme: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"{README}: the markers of the command list are missing")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + readme_block() + tail


def stale() -> list[Path]:
    """The generated files that differ from what the parsers say now."""
    out = []
    if _with_block(README.read_text()) != README.read_text():
        out.append(README)
    if not REFERENCE.exists() or REFERENCE.read_text() != reference():
        out.append(REFERENCE)
    return out


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        bad = stale()
        for path in bad:
            print(f"{path} is out of date: run python -m slurm_netacct.cli.docs", file=sys.stderr)
        return 1 if bad else 0
    if argv:
        print("usage: python -m slurm_netacct.cli.docs [--check]", file=sys.stderr)
        return 2
    README.write_text(_with_block(README.read_text()))
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(reference())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

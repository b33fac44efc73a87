"""What every command shares: its parser, one-line errors with documented exit codes, --node.

A command is a parser and a body: the body turns the parsed arguments into one library call
and prints its result. Library code raises the project's exceptions, never prints and never
names a command; `Command.main` prints an error as one line, prefixed with the command's
name, and exits with the exception's code (README, "Commands and exit codes").
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from .. import naming
from ..errors import EXIT_CODES, NetacctError, UsageError


class Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2) instead of printing usage."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        raise UsageError(message)

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        """As argparse, but `--opt=--` is an error (Python 3.11's argparse stores [] for it)."""
        ns, extras = super().parse_known_args(args, namespace)
        for action in self._actions:
            if not action.option_strings or action.nargs is not None:
                continue
            value = getattr(ns, action.dest, None)
            values = value if isinstance(action, argparse._AppendAction) and isinstance(value, list) else [value]
            if any(isinstance(v, list) for v in values):
                self.error(f"argument {'/'.join(action.option_strings)}: expected one argument")
        return ns, extras


def exit_codes(extra: dict[int, str] | None = None) -> str:
    """The exit code table every --help ends with."""
    codes = {**EXIT_CODES, **(extra or {})}
    return "exit codes:\n" + "\n".join(f"  {c:>3}  {m}" for c, m in codes.items())


def one_line(text: str) -> str:
    """`text` with line breaks and other unprintable characters escaped (\\n, \\x1b, \\u2028, ...)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class Command:
    """One command: its name, what --help says, its arguments and its body.

    `body(args)` returns the exit code (None: 0); a NetacctError it raises becomes one line on
    stderr and that error's exit code; a closed pipe (`netacct-report | head`) ends quietly."""

    def __init__(self, prog: str, description: str, arguments: Callable[[Parser], None],
                 body: Callable[[argparse.Namespace], int | None], extra_codes: dict[int, str] | None = None,
                 summary: str | None = None) -> None:
        self.prog = prog
        self.description = description
        # One line for the README's list of commands: the description's first sentence.
        self.summary = summary or " ".join(description.split(". ")[0].split()).rstrip(".")
        self.arguments = arguments
        self.body = body
        self.extra_codes = extra_codes

    def parser(self) -> Parser:
        p = Parser(prog=self.prog, description=self.description, epilog=exit_codes(self.extra_codes),
                   formatter_class=argparse.RawDescriptionHelpFormatter)
        self.arguments(p)
        return p

    def run(self, argv: Sequence[str] | None = None) -> int:
        """The command's exit code for argv (None: sys.argv[1:]); errors printed on stderr."""
        try:
            return self.body(self.parser().parse_args(argv)) or 0
        except NetacctError as exc:
            self.complain(str(exc))
            return exc.exit_code
        except BrokenPipeError:  # the reader went away: nothing more to say to it
            sys.stderr.close()
            return 0

    def main(self, argv: Sequence[str] | None = None) -> NoReturn:
        """The console script's entry point."""
        sys.exit(self.run(argv))

    def complain(self, message: str) -> None:
        """One line on stderr, prefixed with the command's name."""
        print(f"{self.prog}: {one_line(message)}", file=sys.stderr)


NODE_HELP = "the SLURM node name (default: $SLURMD_NODENAME, else this host's short name)"
NODE_HELP_ASK = ("the SLURM node name (default: $SLURMD_NODENAME; else, if `db` has %%n, the node SLURM lists "
                 "with this host's name or address; else this host's short name)")


def node_name(value: str | None, db_pattern: str | None = None) -> str:
    """--node, or the default node name; UsageError unless it is a valid node name. With
    `db_pattern` (the config's `db`) the default is asked of SLURM if the path has %n."""
    if value:
        node = value
    elif db_pattern is not None:
        from ..node.identity import this_node

        node = this_node(db_pattern)
    else:
        node = naming.default_node()
    if not naming.valid_host_name(node):
        raise UsageError(f"--node {node[:64]!r} is not a valid node name")
    return node


def name_addrs(items: list[str], flag: str) -> dict[str, str]:
    """NAME=ADDR values of a repeatable flag (netacct-routes --node, netacct-doctor
    --cluster-node), in order; UsageError naming the flag for one without both parts."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, addr = item.partition("=")
        if not sep or not name or not addr:
            raise UsageError(f"{flag} {item!r}: expected NAME=ADDR")
        out[name] = addr
    return out


def job_ids(values: list[str] | None, flag: str) -> set[int] | None:
    """The job ids of a repeatable, comma-separated flag; JobIdError naming the flag."""
    from ..errors import JobIdError

    if not values:
        return None
    ids: set[int] = set()
    for value in values:
        for part in value.split(","):
            try:
                ids.add(naming.parse_job_id(part.strip()))
            except ValueError as exc:
                raise JobIdError(f"{flag}: {exc}") from None
    return ids

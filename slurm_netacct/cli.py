"""Command-line entry points: netacct-exec and netacct-report (thin layers over the library)."""

from __future__ import annotations

import argparse
import json
import os
import pwd
import sys
from collections.abc import Sequence
from pathlib import Path

from . import config as config_mod
from . import naming, netns, report
from .errors import EXIT_CODES, JobIdError, NetacctError, NoNamespaceError, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2) instead of printing usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _epilog() -> str:
    return "exit codes:\n" + "\n".join(f"  {c}  {m}" for c, m in EXIT_CODES.items())


def _fail(prog: str, exc: NetacctError) -> int:
    msg = str(exc)
    if not msg.startswith(prog):
        msg = f"{prog}: {msg}"
    print(msg, file=sys.stderr)
    return exc.exit_code


# --------------------------------------------------------------------------- netacct-exec

def exec_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="netacct-exec",
                description="Run a command inside a job's accounted network namespace.",
                epilog=_epilog() + "\n  126  the command could not be executed\n  127  the command was not found",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", required=True, metavar="ID", help="SLURM job id")
    p.add_argument("--user", metavar="NAME", help="run as this user (uid, gid and groups)")
    p.add_argument("--host", metavar="NAME",
                   help="the host name for a netns_prefix with %%h (default: this host's short name)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    return p


def drop_privileges(name: str) -> None:
    """Become user `name`: supplementary groups, gid, then uid (cannot be undone)."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise UsageError(f"netacct-exec: no such user {name!r}") from None
    os.initgroups(pw.pw_name, pw.pw_gid)
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    os.environ.update(USER=pw.pw_name, LOGNAME=pw.pw_name, HOME=pw.pw_dir)


def exec_main(argv: Sequence[str] | None = None) -> None:
    prog = "netacct-exec"
    try:
        args = exec_parser().parse_args(argv)
        cmd = list(args.command)
        if cmd and cmd[0] == "--":
            cmd = cmd[1:]
        if not cmd:
            raise UsageError(f"{prog}: no command given (usage: netacct-exec --job ID [--user NAME] -- CMD ...)")
        try:
            job_id = naming.parse_job_id(args.job)
        except ValueError as exc:
            raise JobIdError(f"--job: {exc}") from None
        cfg = config_mod.load()
        try:
            path = cfg.netns_dir / naming.netns_name(cfg.netns_prefix, job_id, args.host)
        except ValueError as exc:
            raise UsageError(f"{prog}: {exc}") from None
        if not netns.is_netns(path):
            raise NoNamespaceError(f"job {job_id} has no network namespace on this node ({path})")
        if args.user is not None:  # resolve before joining: NSS may need the node's network
            try:
                pwd.getpwnam(args.user)
            except KeyError:
                raise UsageError(f"{prog}: no such user {args.user!r}") from None
        netns.setns(path)
        if args.user is not None:
            drop_privileges(args.user)
    except NetacctError as exc:
        sys.exit(_fail(prog, exc))
    try:
        os.execvp(cmd[0], cmd)
    except FileNotFoundError:
        print(f"{prog}: {cmd[0]}: command not found", file=sys.stderr)
        sys.exit(127)
    except OSError as exc:
        print(f"{prog}: {cmd[0]}: {exc.strerror}", file=sys.stderr)
        sys.exit(126)


# --------------------------------------------------------------------------- netacct-report

def report_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="netacct-report",
                description="Per-job network traffic (bytes and packets, in and out, per class) "
                            "from slurm-netacct node databases.",
                epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-j", "--jobs", metavar="ID[,ID...]", action="append",
                   help="only these job ids (repeatable, comma-separated)")
    p.add_argument("--db", metavar="PATH", action="append", type=Path,
                   help="node database to read (repeatable); default: the configured db")
    p.add_argument("--json", action="store_true", help="print a JSON array, one object per job")
    p.add_argument("--per-node", action="store_true", help="with --json: add a per-node breakdown")
    return p


def parse_job_list(values: list[str] | None) -> set[int] | None:
    if not values:
        return None
    ids: set[int] = set()
    for value in values:
        for part in value.split(","):
            try:
                ids.add(naming.parse_job_id(part.strip()))
            except ValueError as exc:
                raise JobIdError(f"-j/--jobs: {exc}") from None
    return ids


def report_main(argv: Sequence[str] | None = None) -> None:
    prog = "netacct-report"
    try:
        args = report_parser().parse_args(argv)
        job_ids = parse_job_list(args.jobs)
        cfg = config_mod.load()
        paths = args.db or [cfg.db]
        records = report.load(paths, job_ids)
        classes = list(cfg.class_names)
        for r in records:
            for k in r.traffic:
                if k not in classes:
                    classes.append(k)
            for k in classes:
                r.traffic.setdefault(k, {f: 0 for f in report.FIELDS})
        if args.json:
            json.dump([r.as_json(args.per_node) for r in records], sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            print(report.table(records, classes))
    except NetacctError as exc:
        sys.exit(_fail(prog, exc))


# --------------------------------------------------------------------------- netacct-routes

def routes_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="netacct-routes",
                description="Routed mode: install, remove or show the routes to every node's job "
                            "prefix on this host (compute node, controller or login host). Routes "
                            "carry protocol 222, and only those are ever changed.",
                epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["install", "remove", "show"])
    p.add_argument("--node", action="append", metavar="NAME=ADDR",
                   help="a node and its address (repeatable); default: ask `scontrol show nodes`")
    p.add_argument("--self", dest="self_node", metavar="NAME",
                   help="this host's node name, skipped (default: $SLURMD_NODENAME, else none)")
    return p


def routes_main(argv: Sequence[str] | None = None) -> None:
    from . import routes

    prog = "netacct-routes"
    try:
        args = routes_parser().parse_args(argv)
        if args.action == "remove":
            print(f"removed {routes.remove()} routes")
            return
        if args.action == "show":
            for prefix, via in routes.installed():
                print(f"{prefix} via {via}")
            return
        cfg = config_mod.load()
        if args.node:
            nodes = {}
            for item in args.node:
                name, sep, addr = item.partition("=")
                if not sep or not name or not addr:
                    raise UsageError(f"{prog}: --node {item!r}: expected NAME=ADDR")
                nodes[name] = addr
        else:
            nodes = routes.slurm_nodes()
        self_node = args.self_node or os.environ.get("SLURMD_NODENAME")
        planned = routes.plan(cfg, nodes, self_node)
        added, removed = routes.install(planned)
        for r in planned:
            print(f"{r.prefix} via {r.via} ({r.node})")
        print(f"installed {added} routes, removed {removed} stale ones")
    except NetacctError as exc:
        sys.exit(_fail(prog, exc))

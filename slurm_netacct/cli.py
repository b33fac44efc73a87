"""Command-line entry points: netacct-exec and netacct-report (thin layers over the library)."""

from __future__ import annotations

import argparse
import json
import os
import pwd
import sys
from collections.abc import Iterator, Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path

from . import config as config_mod
from . import naming, netns, report
from .errors import EXIT_CODES, JobIdError, NetacctError, NoNamespaceError, NotAllowedError, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2) instead of printing usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")

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


def _epilog() -> str:
    return "exit codes:\n" + "\n".join(f"  {c}  {m}" for c, m in EXIT_CODES.items())


def one_line(text: str) -> str:
    """`text` with line breaks and other unprintable characters escaped (\\n, \\x1b, \\u2028, ...)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _fail(prog: str, exc: NetacctError) -> int:
    """Print the error as one line on stderr (whatever the user typed); return its exit code."""
    msg = one_line(str(exc))
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

STATE_ALIASES = {"r": "running", "running": "running", "cd": "completed", "completed": "completed",
                 "lost": "lost", "reconciled": "reconciled"}


def report_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="netacct-report",
                description="Per-job network traffic (bytes and packets, in and out, per class) "
                            "from slurm-netacct node databases. Selection flags mean what they "
                            "mean in sacct(1).",
                epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    sel = p.add_argument_group("selection (as in sacct)")
    sel.add_argument("-j", "--jobs", metavar="ID[,ID...]", action="append",
                     help="only these job ids")
    sel.add_argument("-u", "--user", metavar="USER[,USER...]", action="append", help="only these users' jobs")
    sel.add_argument("-A", "--accounts", metavar="ACCT[,ACCT...]", action="append", help="only these accounts")
    sel.add_argument("-r", "--partition", metavar="PART[,PART...]", action="append", help="only these partitions")
    sel.add_argument("-N", "--nodelist", metavar="NODE[,NODE...]", action="append",
                     help="only jobs that ran on any of these nodes")
    sel.add_argument("-S", "--starttime", metavar="TIME",
                     help="start of the window: jobs running at or after TIME (default: 00:00 today; "
                          "with -s: now; with -j: the epoch)")
    sel.add_argument("-E", "--endtime", metavar="TIME",
                     help="end of the window: jobs that started at or before TIME (default: now; with -s: -S)")
    sel.add_argument("-s", "--state", metavar="STATE[,STATE...]", action="append",
                     help="jobs in these states during the window: running (R) = ran in it; completed "
                          "(CD), lost, reconciled = ended in it in that state")
    sel.add_argument("-a", "--allusers", action="store_true",
                     help="every user's jobs (the default for root and report admins)")
    out = p.add_argument_group("output")
    out.add_argument("-o", "--format", metavar="FIELD[%%WIDTH],...",
                     help="columns to show; --helpformat lists them")
    out.add_argument("--helpformat", action="store_true", help="list the fields -o accepts")
    out.add_argument("-p", "--parsable", action="store_true", help="'|'-separated, with a trailing '|'")
    out.add_argument("-P", "--parsable2", action="store_true", help="'|'-separated, no trailing '|'")
    out.add_argument("-n", "--noheader", action="store_true", help="no header line")
    out.add_argument("--json", action="store_true", help="a JSON array, one object per job or group")
    out.add_argument("--csv", action="store_true", help="comma-separated values with a header")
    out.add_argument("--units", metavar="[KMGTP]", choices=list("KMGTP"),
                     help="bytes in this unit (powers of 1024); default: human-readable in the "
                          "table, exact bytes in -p/-P/--csv; not with --json (always exact bytes)")
    out.add_argument("--per-node", action="store_true", help="with --json: each job's traffic per node")
    agg = p.add_argument_group("aggregation and billing",
                               "With --group-by or --rates a job is billed in the period it ended: -S/-E "
                               "select the jobs that ended between them, and running jobs are left out.")
    agg.add_argument("--group-by", metavar="KEY[,KEY...]",
                     help="totals per user, account, partition, node, day or month (of the job's "
                          "end, UTC); several keys, e.g. account,month")
    agg.add_argument("--rates", metavar="FILE", type=Path, help="TOML prices per GB: adds a Cost column and a total")
    src = p.add_argument_group("sources")
    src.add_argument("--db", metavar="PATH", action="append", type=Path,
                     help="a node database (repeatable); default: the configured db")
    src.add_argument("--db-dir", metavar="DIR", action="append", type=Path,
                     help="every *.db in DIR (node databases on a shared filesystem)")
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


def _names(values: list[str] | None, flag: str) -> frozenset[str] | None:
    """The comma-separated names of a repeatable flag; UsageError for undecodable bytes."""
    if not values:
        return None
    names = frozenset(v.strip() for value in values for v in value.split(",") if v.strip())
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8 (argv's surrogate escapes): never in a database
            raise UsageError(f"netacct-report: {flag}: {name!r} is not valid UTF-8") from None
    return names


def _utc(text: str, flag: str, now: datetime) -> str:
    """A -S/-E time (local) as the databases' UTC ISO string; UsageError if invalid or out of range."""
    from . import timeparse

    try:
        return _iso_utc(timeparse.parse(text, now))
    except (ValueError, OverflowError) as exc:  # astimezone: "year 0 is out of range" and the like
        raise UsageError(f"netacct-report: {flag}: {exc}") from None


def _iso_utc(local: datetime) -> str:
    """A naive local time as the databases' UTC ISO string (4-digit years: sorts as text)."""
    from datetime import timezone

    return local.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def viewer() -> tuple[str | None, bool]:
    """(who asks, whether they are root): the sudo caller when run through sudo."""
    if os.geteuid() == 0:
        sudo_user, sudo_uid = os.environ.get("SUDO_USER"), os.environ.get("SUDO_UID")
        if sudo_user and sudo_uid and sudo_uid != "0":
            return sudo_user, False
        return "root", True
    try:
        return pwd.getpwuid(os.getuid()).pw_name, False
    except KeyError:
        return None, False


def is_report_admin(cfg: config_mod.Config, user: str | None) -> bool:
    import grp

    if user is None:
        return False
    for entry in cfg.report_admins:
        if entry.startswith("%"):
            try:
                g = grp.getgrnam(entry[1:])
            except KeyError:
                continue
            if user in g.gr_mem or pwd.getpwnam(user).pw_gid == g.gr_gid:
                return True
        elif entry == user:
            return True
    return False


def private_viewer(cfg: config_mod.Config) -> str | None:
    """The caller's user name if private data limits the report to their own jobs (config
    [report] private, not root, not a report admin); None if they may see every job."""
    who, root = viewer()
    if not cfg.report_private or root or is_report_admin(cfg, who):
        return None
    if who is None:
        raise NotAllowedError("netacct-report: you may see only your own jobs, and your user id has no name "
                              "(config [report] private = true)")
    return who


def check_private_jobs(cfg: config_mod.Config, query: report.Query, sources: list[Path]) -> None:
    """Under private data, -j naming a job a database holds for another user is refused."""
    who = private_viewer(cfg)
    if who is None or query.job_ids is None:
        return
    others = report.others_jobs(sources, query.job_ids, who)
    if others:
        raise NotAllowedError(f"netacct-report: job {others[0]} is another user's: {who} may see only "
                              "their own jobs (config [report] private = true)")


def build_query(args: argparse.Namespace, cfg: config_mod.Config, billing: bool = False) -> report.Query:
    job_ids = parse_job_list(args.jobs)
    users = _names(args.user, "-u/--user")
    states = None
    if args.state:
        states = set()
        for s_ in _names(args.state, "-s/--state") or ():
            if s_.lower() not in STATE_ALIASES:
                raise UsageError(f"netacct-report: -s/--state: unknown state {s_!r} "
                                 "(running, completed, lost, reconciled)")
            states.add(STATE_ALIASES[s_.lower()])
    who = private_viewer(cfg)
    if who is not None:
        if users is not None and users != {who}:
            raise NotAllowedError(f"netacct-report: {who} may see only their own jobs "
                                  "(config [report] private = true)")
        if args.allusers:
            raise NotAllowedError("netacct-report: -a/--allusers is for root and report admins")
        users = frozenset({who})  # every result is limited to the caller's jobs (-A, -r, ... filter them)
    # The default window, as sacct's (SLURM src/common/slurmdb_defs.c,
    # slurmdb_job_cond_def_start_end): with -s, -S defaults to now (to the epoch with -j) and
    # -E to -S; without -s, -S defaults to 00:00 today (the epoch with -j); -E to now.
    now = datetime.now().replace(microsecond=0)
    start = _utc(args.starttime, "-S/--starttime", now) if args.starttime else None
    end = _utc(args.endtime, "-E/--endtime", now) if args.endtime else None
    if states is not None:
        if start is None and job_ids is None:
            start = _iso_utc(now)
        if end is None and start is not None:
            end = start
    elif start is None and job_ids is None:
        start = _iso_utc(now.replace(hour=0, minute=0, second=0))
    if start is not None and end is not None and start > end:  # as sacct, which refuses it too
        raise UsageError(f"netacct-report: -S/--starttime ({start}) is after -E/--endtime ({end})"
                         + (" (with -s, -S defaults to now)" if states is not None and not args.starttime else ""))
    return report.Query(job_ids=frozenset(job_ids) if job_ids else None, users=users,
                        accounts=_names(args.accounts, "-A/--accounts"),
                        partitions=_names(args.partition, "-r/--partition"),
                        nodes=_names(args.nodelist, "-N/--nodelist"), states=frozenset(states) if states else None,
                        start=start, end=end, billing=billing)


def _live_overlay(cfg: config_mod.Config, records: Iterator[report.JobRecord]) -> Iterator[report.JobRecord]:
    """Running jobs of this node get their current counters instead of the last sample."""
    node = naming.default_node()
    live: dict[int, dict[str, dict[str, int]]] | None = None
    for rec in records:
        if rec.state == "running" and node in rec.nodes and os.geteuid() == 0:
            if live is None:
                try:
                    from . import sample
                    live = sample.live_traffic(cfg, node)
                except (ImportError, NetacctError):
                    live = {}
            if rec.job_id in live:
                report.overlay_live(rec, node, live[rec.job_id])
        yield rec


def _is_local_only(cfg: config_mod.Config, sources: list[Path]) -> bool:
    """True if the report reads this node's own database (whose running jobs get live counters)."""
    node = naming.default_node()
    local = cfg.db_for(node)
    return os.geteuid() == 0 and any(p.exists() and local.exists() and os.path.samefile(p, local) for p in sources)


def report_main(argv: Sequence[str] | None = None) -> None:
    from . import render

    prog = "netacct-report"
    try:
        args = report_parser().parse_args(argv)
        modes = [m for m in ("parsable", "parsable2", "json", "csv") if getattr(args, m)]
        if len(modes) > 1:
            raise UsageError(f"{prog}: choose one of -p, -P, --json, --csv")
        if args.json and args.units:
            raise UsageError(f"{prog}: --units cannot be used with --json (JSON always has exact byte counts)")
        group_by: tuple[str, ...] | None = None
        if args.group_by:
            group_by = tuple(k.strip().lower() for k in args.group_by.split(","))
            bad = [k for k in group_by if k not in report.GROUP_BY]
            if bad or len(set(group_by)) != len(group_by):
                raise UsageError(f"{prog}: --group-by: {args.group_by!r}: keys are {', '.join(report.GROUP_BY)}, each once")
        cfg = config_mod.load()
        paths = list(args.db or [])
        for d in args.db_dir or []:
            paths += report.databases_in(d)
        if not paths:
            paths = [cfg.db_for(naming.default_node())]
        query = build_query(args, cfg, billing=bool(group_by) or args.rates is not None)
        sources = report.unique_sources(paths)
        check_private_jobs(cfg, query, sources)
        classes = report.classes_in(sources)
        for k in cfg.class_names:
            if k not in classes:
                classes.append(k)
        rates = None
        if args.rates is not None:
            from . import rates as rates_mod
            rates = rates_mod.load(args.rates, classes)
        if args.helpformat:
            print(" ".join(render.available(classes, group_by, rates)))
            return
        cols = render.columns(args.format, classes, group_by, rates)
        notes = report.Notes()
        records = _live_overlay(cfg, report.iter_jobs(sources, query, classes, notes))
        decimals = rates.decimals if rates else 2
        total = None
        rows: Iterator[object]
        if group_by:
            if _is_local_only(cfg, sources):
                groups = report.aggregate(records, group_by, rates)
            else:  # node databases elsewhere: no live counters to add, so split the work
                groups = report.aggregate_parallel(sources, query, classes, group_by, rates, notes=notes)
            if rates is not None:
                total = sum((g.cost for g in groups), Decimal(0))
            rows = iter(groups)
        else:
            if rates is not None:
                def priced(recs: Iterator[report.JobRecord]) -> Iterator[report.JobRecord]:
                    for r in recs:
                        r.cost = rates.cost(r.traffic)
                        yield r
                records = priced(records)
            rows = records
        out = sys.stdout
        if args.json:
            if group_by:
                render.write_json(out, ({"group_by": list(group_by), "key": list(g.key), "jobs": g.jobs,
                                         "traffic": g.traffic,
                                         **({"cost": str(g.cost)} if rates else {})} for g in rows))  # type: ignore[attr-defined]
            else:
                render.write_json(out, (r.as_json(args.per_node) for r in rows))  # type: ignore[attr-defined]
        elif args.parsable or args.parsable2:
            render.write_parsable(out, rows, cols, not args.noheader, args.units, decimals, args.parsable)
        elif args.csv:
            render.write_csv(out, rows, cols, not args.noheader, args.units, decimals)
        else:
            if rates is not None and total is None:
                rows_list = list(rows)
                total = sum((r.cost for r in rows_list), Decimal(0))  # type: ignore[attr-defined]
                rows = iter(rows_list)
            render.write_table(out, rows, cols, not args.noheader, args.units, decimals, total)
        out.flush()
        for line in notes.lines():  # never on stdout: scripts parse it
            print(f"{prog}: {line}", file=sys.stderr)
    except NetacctError as exc:
        sys.exit(_fail(prog, exc))
    except BrokenPipeError:  # `netacct-report ... | head`
        sys.stderr.close()
        sys.exit(0)


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


# --------------------------------------------------------------------------- node-local commands

NODE_HELP = "the SLURM node name (default: $SLURMD_NODENAME, else this host's short name)"


def _node(prog: str, value: str | None) -> str:
    """--node, or the default node name; UsageError unless it is a valid node name."""
    node = value or naming.default_node()
    if not naming.valid_host_name(node):
        raise UsageError(f"{prog}: --node {node[:64]!r} is not a valid node name")
    return node


# --------------------------------------------------------------------------- netacct-reconcile

def reconcile_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="netacct-reconcile",
                description="Find what slurm-netacct left on this node for jobs that are no longer "
                            "here (crashes, reboots), store the counters that still exist (state "
                            "\"reconciled\") and remove the rest. Asks SLURM (squeue) which jobs are "
                            "active on the node; if SLURM cannot answer, touches nothing.",
                epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--node", metavar="NAME", help=NODE_HELP)
    p.add_argument("--active", metavar="ID[,ID...]",
                   help="the jobs active on this node, instead of asking squeue ('' for none)")
    p.add_argument("--dry-run", action="store_true", help="only list what would be reconciled")
    return p


def reconcile_main(argv: Sequence[str] | None = None) -> None:
    from . import hooks, reaper
    from .log import setup as setup_log

    prog = "netacct-reconcile"
    try:
        args = reconcile_parser().parse_args(argv)
        os.environ.setdefault("PATH", hooks.SAFE_PATH)
        os.umask(0o077)
        cfg = config_mod.load()
        setup_log(cfg.log_file, prog)
        node = _node(prog, args.node)
        if args.active is not None:
            active = parse_job_list([args.active]) if args.active.strip() else set()
        else:
            active = reaper.slurm_active_jobs(node)
        result = reaper.reconcile(cfg, node, active, dry_run=args.dry_run)
        if active is None:
            print(f"{prog}: SLURM cannot be asked which jobs run on {node}: nothing touched "
                  f"({len(result.found)} jobs with leftovers)", file=sys.stderr)
            return
        for job, what in sorted(result.found.items()):
            if job in result.kept:
                continue
            done = result.reconciled.get(job) or (f"FAILED: {result.failed[job]}" if job in result.failed
                                                  else "would be reconciled")
            print(f"job {job}: {'; '.join(what)} -> {done}")
        if result.failed:
            sys.exit(7)
    except NetacctError as exc:
        sys.exit(_fail(prog, exc))

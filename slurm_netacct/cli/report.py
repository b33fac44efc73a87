"""netacct-report: per-job traffic from node databases, with sacct's selection flags."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

from .. import config as config_mod
from ..errors import ConfigError, NetacctError, NotAllowedError, UsageError
from ..report import access, render, statement, timeparse
from ..report.aggregate import GROUP_BY, Group, aggregate, aggregate_parallel
from ..report.rates import Rates
from ..report.rates import load as load_rates
from ..report.records import JobRecord, Notes, Query, iter_jobs, overlay_live
from ..states import ALIASES, State
from ..store import read
from ..traffic import Traffic
from .common import Command, Parser, job_ids

DESCRIPTION = ("Per-job network traffic (bytes and packets, in and out, per class) from slurm-netacct "
               "node databases. Selection flags mean what they mean in sacct(1).")


def _arguments(p: Parser) -> None:
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
    out.add_argument("-o", "--format", metavar="FIELD[%WIDTH],...",
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
    agg.add_argument("--statement", metavar="FILE", action="append", type=Path,
                     help="write a billing statement of the window to FILE instead of printing rows (needs "
                          "--rates): per account, then per user, the traffic per class and direction, costs and "
                          "totals; FILE.html: a self-contained page with charts, FILE.csv: for a finance system; "
                          "repeatable (both from one selection)")
    agg.add_argument("--overwrite", action="store_true", help="--statement may replace an existing FILE")
    src = p.add_argument_group("sources")
    src.add_argument("--db", metavar="PATH", action="append", type=Path,
                     help="a node database (repeatable); default: the configured db")
    src.add_argument("--db-dir", metavar="DIR", action="append", type=Path,
                     help="every *.db in DIR (node databases on a shared filesystem)")
    src.add_argument("--ledger", action="store_true",
                     help="the cluster ledger of the config's [ledger] (its report account); "
                          "selection and aggregation are done by the database server")
    src.add_argument("-M", "--clusters", metavar="CLUSTER",
                     help="with --ledger: this SLURM cluster's jobs (default: [ledger] cluster); one at a time")


def _names(values: list[str] | None, flag: str) -> frozenset[str] | None:
    """The comma-separated names of a repeatable flag; UsageError for undecodable bytes."""
    if not values:
        return None
    names = frozenset(v.strip() for value in values for v in value.split(",") if v.strip())
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8 (argv's surrogate escapes): never in a database
            raise UsageError(f"{flag}: {name!r} is not valid UTF-8") from None
    return names


def _utc(text: str, flag: str, now: datetime) -> str:
    """A -S/-E time (local) as the databases' UTC ISO string; UsageError if invalid or out of range."""
    try:
        return _iso_utc(timeparse.parse(text, now))
    except (ValueError, OverflowError) as exc:  # astimezone: "year 0 is out of range" and the like
        raise UsageError(f"{flag}: {exc}") from None


def _iso_utc(local: datetime) -> str:
    """A naive local time as the databases' UTC ISO string (4-digit years: sorts as text)."""
    return local.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _states(values: list[str] | None) -> frozenset[str] | None:
    if not values:
        return None
    states = set()
    for s_ in _names(values, "-s/--state") or ():
        if s_.lower() not in ALIASES:
            raise UsageError(f"-s/--state: unknown state {s_!r} (running, completed, lost, reconciled)")
        states.add(ALIASES[s_.lower()].value)
    return frozenset(states)


def build_query(args: argparse.Namespace, who: str | None, billing: bool = False) -> Query:
    """The Query for the selection flags; `who`: the caller, if private data limits them."""
    jobs = job_ids(args.jobs, "-j/--jobs")
    users = _names(args.user, "-u/--user")
    states = _states(args.state)
    if who is not None:
        if users is not None and users != {who}:
            raise NotAllowedError(f"{who} may see only their own jobs (config [report] private = true)")
        if args.allusers:
            raise NotAllowedError("-a/--allusers is for root and report admins")
        users = frozenset({who})  # every result is limited to the caller's jobs (-A, -r, ... filter them)
    # The default window, as sacct's (SLURM src/common/slurmdb_defs.c,
    # slurmdb_job_cond_def_start_end): with -s, -S defaults to now (to the epoch with -j) and
    # -E to -S; without -s, -S defaults to 00:00 today (the epoch with -j); -E to now.
    now = datetime.now().replace(microsecond=0)
    start = _utc(args.starttime, "-S/--starttime", now) if args.starttime else None
    end = _utc(args.endtime, "-E/--endtime", now) if args.endtime else None
    if states is not None:
        if start is None and jobs is None:
            start = _iso_utc(now)
        if end is None and start is not None:
            end = start
    elif start is None and jobs is None:
        start = _iso_utc(now.replace(hour=0, minute=0, second=0))
    if start is not None and end is not None and start > end:  # as sacct, which refuses it too
        raise UsageError(f"-S/--starttime ({start}) is after -E/--endtime ({end})"
                         + (" (with -s, -S defaults to now)" if states is not None and not args.starttime else ""))
    return Query(job_ids=frozenset(jobs) if jobs else None, users=users,
                 accounts=_names(args.accounts, "-A/--accounts"), partitions=_names(args.partition, "-r/--partition"),
                 nodes=_names(args.nodelist, "-N/--nodelist"), states=states, start=start, end=end, billing=billing)


def _this_node(cfg: config_mod.Config) -> str:
    """This node's SLURM name (without $SLURMD_NODENAME: asked of SLURM if `db` has %n)."""
    return _node_for(str(cfg.db))


@functools.cache
def _node_for(db_pattern: str) -> str:
    from ..node.identity import this_node

    return this_node(db_pattern)


def _live_overlay(cfg: config_mod.Config, records: Iterator[JobRecord]) -> Iterator[JobRecord]:
    """Running jobs of this node get their current counters instead of the last sample."""
    node = _this_node(cfg)
    live: dict[int, Traffic] | None = None
    for rec in records:
        if rec.state == State.RUNNING and node in rec.nodes and os.geteuid() == 0:
            if live is None:
                try:
                    from ..node import sample
                    live = sample.live_traffic(cfg, node)
                except (ImportError, NetacctError) as exc:
                    COMMAND.complain(f"note: live counters of this node cannot be read ({exc}); "
                                     "running jobs show their last sample")
                    live = {}
            if rec.job_id in live:
                overlay_live(rec, node, live[rec.job_id])
        yield rec


def _is_local_only(cfg: config_mod.Config, sources: list[Path]) -> bool:
    """True if the report reads this node's own database (whose running jobs get live counters)."""
    local = cfg.db_for(_this_node(cfg))
    return os.geteuid() == 0 and any(p.exists() and local.exists() and os.path.samefile(p, local) for p in sources)


def _group_by(text: str | None) -> tuple[str, ...] | None:
    if not text:
        return None
    keys = tuple(k.strip().lower() for k in text.split(","))
    if any(k not in GROUP_BY for k in keys) or len(set(keys)) != len(keys):
        raise UsageError(f"--group-by: {text!r}: keys are {', '.join(GROUP_BY)}, each once")
    return keys


def _sources(args: argparse.Namespace, cfg: config_mod.Config) -> list[Path]:
    paths = list(args.db or [])
    for d in args.db_dir or []:
        paths += read.databases_in(d)
    return read.unique_sources(paths or [cfg.db_for(_this_node(cfg))])


_NOT_WITH_STATEMENT = (("parsable", "-p"), ("parsable2", "-P"), ("json", "--json"), ("csv", "--csv"),
                       ("format", "-o/--format"), ("helpformat", "--helpformat"), ("noheader", "-n/--noheader"),
                       ("units", "--units"), ("per_node", "--per-node"), ("group_by", "--group-by"))


def _statement_files(args: argparse.Namespace) -> list[tuple[Path, str]]:
    """--statement's files and their kinds ("html", "csv"); UsageError before any work is done
    for a flag it cannot be used with, a suffix it does not know, or a file it cannot write."""
    for dest, flag in _NOT_WITH_STATEMENT:
        if getattr(args, dest):
            raise UsageError(f"--statement writes its own format: not with {flag}")
    if args.rates is None:
        raise UsageError("--statement needs --rates FILE (a statement prices the traffic)")
    files: list[tuple[Path, str]] = []
    for path in args.statement:
        kind = {".html": "html", ".htm": "html", ".csv": "csv"}.get(path.suffix.lower())
        if kind is None:
            raise UsageError(f"--statement {path}: the name must end in .html or .csv (the format)")
        if any(os.path.abspath(path) == os.path.abspath(p) for p, _ in files):
            raise UsageError(f"--statement {path}: given twice")
        _check_writable(path, args.overwrite)
        files.append((path, kind))
    return files


def _check_writable(path: Path, overwrite: bool) -> None:
    """UsageError unless `path` can be written: its directory exists and is writable, and it does
    not exist (or, with --overwrite, is a regular file)."""
    parent = path.parent
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise UsageError(f"--statement {path}: the file exists (give --overwrite to replace it)")
        if not path.is_file():
            raise UsageError(f"--statement {path}: not a regular file")
    if not parent.is_dir():
        raise UsageError(f"--statement {path}: no such directory {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--statement {path}: the directory {parent} is not writable")


def _write_whole(path: Path, text: str, overwrite: bool) -> None:
    """Write `text` to `path` whole or not at all: a temporary file in the same directory, then
    renamed over it (--overwrite) or linked to the name, which fails if the name was taken since."""
    parent = path.parent
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as an ordinary new file (mkstemp makes it 0600)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    except FileExistsError:
        raise UsageError(f"--statement {path}: the file exists (give --overwrite to replace it)") from None
    except OSError as exc:
        raise UsageError(f"--statement {path}: cannot write it ({exc.strerror})") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _body(args: argparse.Namespace) -> None:
    if args.overwrite and not args.statement:
        raise UsageError("--overwrite is for --statement")
    files = _statement_files(args) if args.statement else None
    if len([m for m in ("parsable", "parsable2", "json", "csv") if getattr(args, m)]) > 1:
        raise UsageError("choose one of -p, -P, --json, --csv")
    if args.json and args.units:
        raise UsageError("--units cannot be used with --json (JSON always has exact byte counts)")
    group_by = _group_by(args.group_by)
    cfg = config_mod.load()
    who = access.private_viewer(cfg)
    query = build_query(args, who, billing=bool(group_by) or args.rates is not None)
    if args.ledger or args.clusters is not None:
        _from_ledger(args, cfg, who, query, group_by, files)
        return
    sources = _sources(args, cfg)
    access.check_jobs(who, query.job_ids, sources)
    classes = read.classes_in(sources)
    shape = _output_shape(args, cfg, classes, group_by)
    if shape is None:
        return
    classes, rates, cols = shape
    notes = Notes()
    if files is not None:  # one pass: the groups and the dearest jobs (ended jobs: no live counters)
        assert rates is not None
        top = statement.TopJobs(rates)
        fine = aggregate(top.watch(iter_jobs(sources, query, classes, notes)), statement.KEYS)
        _statement(files, args.overwrite, query, rates, classes,
                   _sources_text(sources), notes, fine, top)
        return
    records = _live_overlay(cfg, iter_jobs(sources, query, classes, notes))
    if group_by:
        if _is_local_only(cfg, sources):
            groups = aggregate(records, group_by, rates)
        else:  # node databases elsewhere: no live counters to add, so split the work
            groups = aggregate_parallel(sources, query, classes, group_by, rates, notes=notes)
        _write_groups(args, groups, group_by, cols, rates)
    else:
        _write_jobs(args, records, cols, rates)
    sys.stdout.flush()
    for line in notes.lines():  # never on stdout: scripts parse it
        COMMAND.complain(line)


def _from_ledger(args: argparse.Namespace, cfg: config_mod.Config, who: str | None, query: Query,
                 group_by: tuple[str, ...] | None, files: list[tuple[Path, str]] | None = None) -> None:
    """The report from the cluster ledger: same flags, same output, the server selects and sums."""
    from ..report.ledger import LedgerSource
    from ..store import ledger

    if not args.ledger:
        raise UsageError("-M/--clusters reads the ledger: give --ledger too")
    if args.db or args.db_dir:
        raise UsageError("--ledger reads the cluster ledger: not with --db or --db-dir")
    if cfg.ledger is None:
        raise ConfigError("--ledger: no [ledger] in the configuration")
    cluster = cfg.ledger.cluster
    if args.clusters is not None:
        names = _names([args.clusters], "-M/--clusters") or frozenset()
        if len(names) != 1:
            raise UsageError("-M/--clusters: one cluster at a time")
        cluster = next(iter(names))
    with ledger.connect(cfg.ledger, report=True) as led:
        src = LedgerSource(led, cluster)
        if who is not None and query.job_ids is not None:
            others = src.others_jobs(query.job_ids, who)
            if others:
                raise NotAllowedError(f"job {others[0]} is another user's: {who} may see only "
                                      "their own jobs (config [report] private = true)")
        shape = _output_shape(args, cfg, src.classes(), group_by)
        if shape is None:
            return
        classes, rates, cols = shape
        notes = Notes()
        if files is not None:  # the server sums; the dearest jobs come from its per-job rows
            assert rates is not None
            fine = src.aggregate(query, classes, statement.KEYS, None, notes)
            top = statement.TopJobs(rates)
            for _ in top.watch(src.iter_jobs(query, classes, Notes())):
                pass
            _statement(files, args.overwrite, query, rates, classes, f"the cluster ledger, cluster {cluster}", notes,
                       fine, top)
            return
        if group_by:
            _write_groups(args, src.aggregate(query, classes, group_by, rates, notes), group_by, cols, rates)
        else:
            _write_jobs(args, src.iter_jobs(query, classes, notes), cols, rates)
        sys.stdout.flush()
    for line in notes.lines():
        COMMAND.complain(line)


def _output_shape(args: argparse.Namespace, cfg: config_mod.Config, classes: list[str],
                  group_by: tuple[str, ...] | None) -> tuple[list[str], Rates | None, list[render.Column]] | None:
    """The classes of the report (those recorded, then the configured ones), its rates and
    columns; None once --helpformat has printed the column names instead."""
    classes = classes + [k for k in cfg.class_names if k not in classes]
    rates = load_rates(args.rates, classes) if args.rates is not None else None
    if args.helpformat:
        print(" ".join(render.available(classes, group_by, rates)))
        return None
    return classes, rates, render.columns(args.format, classes, group_by, rates)


def _sources_text(sources: list[Path]) -> str:
    """The node databases a statement was made from, for its reader (the first and last of many)."""
    names = [p.name for p in sources]
    if len(names) > 4:
        return f"{len(names)} node databases ({names[0]} ... {names[-1]})"
    return f"node database{'s' if len(names) > 1 else ''} {', '.join(names)}"


def _statement(files: list[tuple[Path, str]], overwrite: bool, query: Query, rates: Rates, classes: list[str],
               source: str, notes: Notes, fine: list[Group], top: statement.TopJobs) -> None:
    """Build the statement and write its files: all or, should one fail, none of the new ones (a
    file replaced with --overwrite before the failure stays replaced)."""
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    st = statement.build(fine, top.jobs, rates, classes, query.start, query.end, generated, source)
    st.notes = notes.lines()
    texts = [(path, statement.to_html(st) if kind == "html" else statement.to_csv(st)) for path, kind in files]
    written: list[Path] = []
    try:
        for path, text in texts:
            _write_whole(path, text, overwrite)
            written.append(path)
    except UsageError:
        if not overwrite:  # all or none: remove the new files of this run
            for path in written:
                path.unlink(missing_ok=True)
        raise
    for line in notes.lines():
        COMMAND.complain(line)


def _write_groups(args: argparse.Namespace, groups: list[Group], group_by: tuple[str, ...],
                  cols: list[render.Column], rates: Rates | None) -> None:
    out = sys.stdout
    decimals = rates.decimals if rates else 2
    if args.json:
        render.write_json(out, ({"group_by": list(group_by), "key": list(g.key), "jobs": g.jobs,
                                 "traffic": g.traffic, **({"cost": str(g.cost)} if rates else {})}
                                for g in groups))
    elif args.parsable or args.parsable2:
        render.write_parsable(out, groups, cols, not args.noheader, args.units, decimals, args.parsable)
    elif args.csv:
        render.write_csv(out, groups, cols, not args.noheader, args.units, decimals)
    else:
        total = sum((g.cost for g in groups), Decimal(0)) if rates is not None else None
        render.write_table(out, groups, cols, not args.noheader, args.units, decimals, total)


def _write_jobs(args: argparse.Namespace, records: Iterator[JobRecord], cols: list[render.Column],
                rates: Rates | None) -> None:
    out = sys.stdout
    decimals = rates.decimals if rates else 2
    if rates is not None:
        records = _priced(records, rates)
    if args.json:
        render.write_json(out, (r.as_json(args.per_node) for r in records))
    elif args.parsable or args.parsable2:
        render.write_parsable(out, records, cols, not args.noheader, args.units, decimals, args.parsable)
    elif args.csv:
        render.write_csv(out, records, cols, not args.noheader, args.units, decimals)
    else:
        rows = list(records)  # the table sizes its columns: it holds the rows anyway
        total = sum((r.cost or Decimal(0) for r in rows), Decimal(0)) if rates is not None else None
        render.write_table(out, rows, cols, not args.noheader, args.units, decimals, total)


def _priced(records: Iterator[JobRecord], rates: Rates) -> Iterator[JobRecord]:
    for r in records:
        r.cost = rates.cost(r.traffic)
        yield r


COMMAND = Command("netacct-report", DESCRIPTION, _arguments, _body)
main = COMMAND.main

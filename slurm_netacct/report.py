"""Reading node databases and merging their rows into one record per job (streamed)."""

from __future__ import annotations

import heapq
import operator
import os
import sqlite3
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from .errors import StoreError

FIELDS = ("in_bytes", "out_bytes", "in_packets", "out_packets")
# When a job's node rows disagree, the most important state wins.
_STATE_RANK = {"running": 0, "lost": 1, "reconciled": 2, "completed": 3}
STATES = tuple(_STATE_RANK)


class JobRecord:
    """One job, summed over its nodes (and over restarts of a requeued job).

    Traffic is kept as a flat vector, 4 numbers per class in `classes` order (in_bytes,
    out_bytes, in_packets, out_packets): summing a million jobs stays cheap. `traffic` and
    `per_node` give the usual {class: {field: n}} view.
    """

    __slots__ = ("job_id", "classes", "user", "account", "partition", "nodes", "start", "end",
                 "state", "vec", "node_vecs", "as_of", "live", "cost")

    def __init__(self, job_id: int, classes: list[str], state: str = "completed") -> None:
        self.job_id = job_id
        self.classes = classes
        self.user: str | None = None
        self.account: str | None = None
        self.partition: str | None = None
        self.nodes: list[str] = []
        self.start: str | None = None
        self.end: str | None = None
        self.state = state
        self.vec = [0] * (4 * len(classes))
        self.node_vecs: dict[str, list[int]] = {}
        self.as_of: str | None = None  # running jobs: when the counters were sampled
        self.live = False  # running jobs: counters read from the kernel just now
        self.cost: Decimal | None = None  # with --rates

    @property
    def traffic(self) -> dict[str, dict[str, int]]:
        return unflatten(self.vec, self.classes)

    @property
    def per_node(self) -> dict[str, dict[str, dict[str, int]]]:
        return {n: unflatten(v, self.classes) for n, v in self.node_vecs.items()}

    def as_json(self, per_node: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "job_id": str(self.job_id), "user": self.user, "account": self.account,
            "partition": self.partition, "nodes": self.nodes, "start": self.start,
            "end": self.end, "state": self.state, "traffic": self.traffic,
        }
        if self.state == "running":
            out["live"] = self.live
        if self.state in ("running", "lost"):
            out["as_of"] = self.as_of  # the counters are those sampled then (None: never sampled)
        if per_node:
            out["per_node"] = self.per_node
        if self.cost is not None:
            out["cost"] = str(self.cost)
        return out


def unflatten(vec: list[int], classes: list[str]) -> dict[str, dict[str, int]]:
    return {k: dict(zip(FIELDS, vec[4 * i: 4 * i + 4])) for i, k in enumerate(classes)}


def flatten(traffic: dict[str, dict[str, int]], classes: list[str]) -> list[int]:
    return [int(traffic.get(k, {}).get(f, 0)) for k in classes for f in FIELDS]


def overlay_live(rec: JobRecord, node: str, traffic: dict[str, dict[str, int]]) -> None:
    """Replace one node's stored counters of a running job with its live counters."""
    new = flatten(traffic, rec.classes)
    old = rec.node_vecs.get(node, [0] * len(new))
    rec.vec = [v - o + n for v, o, n in zip(rec.vec, old, new)]
    rec.node_vecs[node] = new
    rec.live = len(rec.nodes) == 1
    if rec.live:
        rec.as_of = None


@dataclass(frozen=True)
class Query:
    """Which jobs to report; None means no restriction. Times are UTC ISO strings.

    The window [start, end] (both inclusive) selects as sacct does: without states, jobs whose
    run overlaps it; with states, jobs that were in one of them during it — `running`: the job
    ran at some time in the window (it may have ended since), a terminal state: the job is in
    it and ended in the window.

    With `billing` (--rates, --group-by) each job belongs to the period in which it ended: only
    jobs that have ended, within the window, are selected (running jobs are not billed), so
    consecutive windows never count a job twice."""

    job_ids: frozenset[int] | None = None
    users: frozenset[str] | None = None
    accounts: frozenset[str] | None = None
    partitions: frozenset[str] | None = None
    nodes: frozenset[str] | None = None
    states: frozenset[str] | None = None
    start: str | None = None
    end: str | None = None
    id_range: tuple[int, int] | None = None  # job ids from..to (to split work between processes)
    billing: bool = False  # select ended jobs by their end (see above)

    def _ran_in_window(self, rec: JobRecord) -> bool:
        if self.end is not None and (rec.start is None or rec.start > self.end):
            return False
        if self.start is not None and rec.end is not None and rec.end < self.start:
            return False
        return True

    def _ended_in_window(self, rec: JobRecord) -> bool:
        return (rec.end is not None and (self.start is None or rec.end >= self.start)
                and (self.end is None or rec.end <= self.end))

    def _in_state(self, rec: JobRecord, state: str) -> bool:
        if state == "running":
            return rec.start is not None and self._ran_in_window(rec)
        return rec.state == state and self._ended_in_window(rec)

    def _listed(self, rec: JobRecord) -> bool:
        if self.nodes is not None and not self.nodes.intersection(rec.nodes):
            return False
        if self.states is None:
            return self._ran_in_window(rec)
        return any(self._in_state(rec, s) for s in self.states)

    def wants(self, rec: JobRecord) -> bool:
        """The job-level filters (a job's nodes, state and time span are known only merged)."""
        if self.billing and (rec.state == "running" or not self._ended_in_window(rec)):
            return False
        return self._listed(rec)

    def unbilled(self, rec: JobRecord) -> bool:
        """A running job that billing leaves out but a listing with the same flags would show."""
        return self.billing and rec.state == "running" and self._listed(rec)


def unique_sources(paths: Iterable[Path]) -> list[Path]:
    """The databases to read, each file once (by device and inode), in the order given."""
    seen: set[tuple[int, int]] = set()
    out: list[Path] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise StoreError(f"database {path}: {exc.strerror}") from None
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            out.append(Path(path))
    return out


def databases_in(directory: Path) -> list[Path]:
    """Every *.db file in a directory (one per node, as a shared filesystem would hold them)."""
    try:
        return sorted(p for p in directory.iterdir() if p.suffix == ".db" and p.is_file())
    except OSError as exc:
        raise StoreError(f"--db-dir {directory}: {exc.strerror}") from None


def _open_ro(path: Path) -> sqlite3.Connection:
    """Open a node database read-only; StoreError if it is not one."""
    # The path is percent-encoded byte by byte: '?', '#' and '%' are file name characters
    # here, not URI syntax, and a name that is not UTF-8 keeps its exact bytes.
    uri = "file:" + urllib.parse.quote(os.fsencode(os.path.abspath(path)), safe="/") + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=30)
        conn.execute("SELECT 1 FROM jobs LIMIT 1")
        conn.execute("SELECT 1 FROM traffic LIMIT 1")
    except sqlite3.Error as exc:
        msg = str(exc)
        if "unable to open" in msg and not os.access(path, os.R_OK):
            msg = "permission denied (node databases are readable by root only: use sudo)"
        raise StoreError(f"database {path}: {msg}") from None
    return conn


def classes_in(paths: Iterable[Path]) -> list[str]:
    """Every traffic class any of the databases holds, sorted."""
    found: set[str] = set()
    for path in paths:
        conn = _open_ro(path)
        try:
            found.update(c for (c,) in conn.execute("SELECT DISTINCT class FROM traffic"))
        except sqlite3.Error as exc:
            raise StoreError(f"database {path}: {exc}") from None
        finally:
            conn.close()
    return sorted(found)


def others_jobs(paths: Iterable[Path], job_ids: frozenset[int], user: str) -> list[int]:
    """Those of `job_ids` that a database holds for someone other than `user`, sorted."""
    found: set[int] = set()
    ids = sorted(job_ids)
    for path in paths:
        conn = _open_ro(path)
        try:
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                found.update(j for (j,) in conn.execute(
                    f"SELECT DISTINCT job_id FROM jobs WHERE job_id IN ({','.join('?' * len(chunk))}) "
                    "AND user IS NOT ?", [*chunk, user]))
        except sqlite3.Error as exc:
            raise StoreError(f"database {path}: {exc}") from None
        finally:
            conn.close()
    return sorted(found)


def _in(column: str, values: frozenset[Any] | None, where: list[str], params: list[Any]) -> None:
    if values is not None:
        where.append(f"j.{column} IN ({','.join('?' * len(values))})")
        params.extend(sorted(values))


_Row = tuple[Any, ...]  # job_id, node, restart, user, account, partition, start, end, state, sampled_at, *vec
_KEY = operator.itemgetter(0, 1, 2)


def _node_rows(path: Path, query: Query, classes: list[str]) -> Iterator[_Row]:
    """One database's job rows, traffic pivoted per class, ordered by (job id, node, restart)."""
    conn = _open_ro(path)
    cols = [f"TOTAL(CASE WHEN t.class = '{k}' THEN t.{f} END)" for k in classes for f in FIELDS]
    where: list[str] = []
    params: list[Any] = []
    _in("job_id", query.job_ids, where, params)
    _in("user", query.users, where, params)
    _in("account", query.accounts, where, params)
    _in("partition", query.partitions, where, params)
    if query.id_range is not None:
        where.append("j.job_id BETWEEN ? AND ?")
        params.extend(query.id_range)
    sql = ("SELECT j.job_id, j.node, j.restart, j.user, j.account, j.partition, j.start, j.\"end\", "
           f"j.state, j.sampled_at{''.join(', ' + c for c in cols)} "
           "FROM jobs j LEFT JOIN traffic t ON t.job_id = j.job_id AND t.node = j.node "
           "AND t.restart = j.restart"
           + (" WHERE " + " AND ".join(where) if where else "")
           + " GROUP BY j.job_id, j.node, j.restart ORDER BY j.job_id, j.node, j.restart")
    try:
        yield from conn.execute(sql, params)
    except sqlite3.Error as exc:
        raise StoreError(f"database {path}: {exc}") from None
    finally:
        conn.close()


def _build(rows: list[_Row], classes: list[str]) -> JobRecord:
    first = rows[0]
    rec = JobRecord(first[0], classes, first[8])
    rec.user, rec.account, rec.partition = first[3], first[4], first[5]
    n = 4 * len(classes)
    vec = [0] * n
    for row in rows:
        node = row[1]
        if rec.user is None:
            rec.user = row[3]
        if rec.account is None:
            rec.account = row[4]
        if rec.partition is None:
            rec.partition = row[5]
        if node not in rec.node_vecs:
            rec.nodes.append(node)
            rec.node_vecs[node] = [0] * n
        start, end, state = row[6], row[7], row[8]
        if start and (rec.start is None or start < rec.start):
            rec.start = start
        if end and (rec.end is None or end > rec.end):
            rec.end = end
        if _STATE_RANK.get(state, 9) < _STATE_RANK.get(rec.state, 9):
            rec.state = state
        if state in ("running", "lost") and row[9] and (rec.as_of is None or row[9] < rec.as_of):
            rec.as_of = row[9]
        values = row[10:]
        nv = rec.node_vecs[node]
        for i in range(n):
            v = int(values[i])
            vec[i] += v
            nv[i] += v
    rec.vec = vec
    rec.nodes.sort()
    if rec.state == "running":
        rec.end = None
    return rec


@dataclass
class Notes:
    """What a report's reader must be told besides its rows (the command prints it on stderr)."""

    differing: int = 0  # reported (job, node, run) rows whose copies in several databases disagree
    first_differing: tuple[int, str] | None = None  # (job id, node) of the first of them
    unbilled_running: int = 0  # running jobs a billing query selected but left out (no end yet)

    def add_differing(self, count: int, first: tuple[int, str]) -> None:
        self.differing += count
        if self.first_differing is None or first < self.first_differing:
            self.first_differing = first

    def merge(self, other: "Notes") -> None:
        """Add the notes of another part of the same report (a worker's job-id range)."""
        if other.first_differing is not None:
            self.add_differing(other.differing, other.first_differing)
        self.unbilled_running += other.unbilled_running

    def lines(self) -> list[str]:
        """One line each, without the program's name."""
        out: list[str] = []
        if self.first_differing is not None:
            job, node = self.first_differing
            out.append(f"warning: {self.differing} job rows differ between database copies "
                       f"(first: job {job} on {node}); the most final copy is used")
        if self.unbilled_running:
            out.append(f"note: {self.unbilled_running} running jobs are not billed "
                       "(a job is billed in the period it ends)")
        return out


def _finality(row: _Row) -> tuple[int, str]:
    """How final a copy of a node row is: any terminal state over running; then the later
    end (terminal) or the later sample (running)."""
    if row[8] == "running":
        return (0, row[9] or "")
    return (1, row[7] or "")


def _final_rows(rows: Iterable[_Row]) -> Iterator[tuple[_Row, bool]]:
    """One row per (job, node, run) of rows in key order: its most final copy (ties: the
    first), and whether the copies disagreed (state or traffic)."""
    best: _Row | None = None
    differs = False
    for row in rows:
        if best is not None and row[0] == best[0] and row[1] == best[1] and row[2] == best[2]:
            if not differs and (row[8] != best[8] or row[10:] != best[10:]):
                differs = True
            if _finality(row) > _finality(best):
                best = row
            continue
        if best is not None:
            yield best, differs
        best, differs = row, False
    if best is not None:
        yield best, differs


def iter_jobs(paths: Iterable[Path], query: Query = Query(), classes: list[str] | None = None,
              notes: Notes | None = None) -> Iterator[JobRecord]:
    """Job records merged over all databases, ordered by job id, in constant memory.

    Each database yields its rows in (job id, node, restart) order; a k-way merge groups
    them by job. A row found in several databases (copies of one node's database, an old
    one among them) is taken once, from its most final copy; `notes` counts the reported
    rows whose copies disagreed."""
    sources = unique_sources(paths)
    if classes is None:
        classes = classes_in(sources)
    if notes is None:
        notes = Notes()
    merged = heapq.merge(*(_node_rows(p, query, classes) for p in sources), key=_KEY)
    group: list[_Row] = []
    differing: list[str] = []  # nodes of the group's rows whose copies disagreed
    wants = query.wants
    for row, differs in _final_rows(merged):
        if group and group[0][0] != row[0]:
            rec = _build(group, classes)
            if wants(rec):
                if differing:
                    notes.add_differing(len(differing), (rec.job_id, differing[0]))
                yield rec
            elif query.unbilled(rec):
                notes.unbilled_running += 1
            group = []
            differing = []
        group.append(row)
        if differs:
            differing.append(row[1])
    if group:
        rec = _build(group, classes)
        if wants(rec):
            if differing:
                notes.add_differing(len(differing), (rec.job_id, differing[0]))
            yield rec
        elif query.unbilled(rec):
            notes.unbilled_running += 1


def load(paths: Iterable[Path], job_ids: set[int] | None = None) -> list[JobRecord]:
    """All matching job records as a list (convenience for small selections)."""
    q = Query(job_ids=frozenset(job_ids) if job_ids else None)
    return list(iter_jobs(paths, q))


# --------------------------------------------------------------------------- aggregation

GROUP_BY = ("user", "account", "partition", "node", "day", "month")


class Group:
    """Totals of the jobs sharing one value of each --group-by key."""

    __slots__ = ("key", "classes", "jobs", "vec", "cost")

    def __init__(self, key: tuple[str, ...], classes: list[str]) -> None:
        self.key = key
        self.classes = classes
        self.jobs = 0
        self.vec = [0] * (4 * len(classes))
        self.cost = Decimal(0)

    @property
    def traffic(self) -> dict[str, dict[str, int]]:
        return unflatten(self.vec, self.classes)


def group_keys(rec: JobRecord, by: tuple[str, ...]) -> list[tuple[tuple[str, ...], list[int]]]:
    """(group key, the traffic vector that goes to it) for one job; a job may feed several nodes."""
    scalar: list[str] = []
    for b in by:
        if b in ("day", "month"):  # of the end: a job is billed in the period it ends
            scalar.append((rec.end or "")[:10 if b == "day" else 7])
        elif b != "node":
            scalar.append(getattr(rec, b) or "(none)")
    if "node" not in by:
        return [(tuple(scalar), rec.vec)]
    i = by.index("node")
    return [(tuple(scalar[:i] + [n] + scalar[i:]), rec.node_vecs[n]) for n in rec.nodes]


def aggregate(records: Iterable[JobRecord], by: tuple[str, ...], rates: "Rates | None" = None,
              classes: list[str] | None = None) -> list[Group]:
    """Totals per group, sorted by key; memory grows with the number of groups only."""
    groups: dict[tuple[str, ...], Group] = {}
    for rec in records:
        for key, vec in group_keys(rec, by):
            g = groups.get(key)
            if g is None:
                g = groups[key] = Group(key, rec.classes)
            g.jobs += 1
            g.vec = list(map(operator.add, g.vec, vec))
    if rates is not None:
        for g in groups.values():
            g.cost = rates.cost(g.traffic)
    return [groups[k] for k in sorted(groups)]


def _aggregate_part(args: tuple[list[Path], Query, list[str], tuple[str, ...]]
                    ) -> tuple[list[tuple[tuple[str, ...], int, list[int]]], Notes]:
    sources, query, classes, by = args
    notes = Notes()
    groups = aggregate(iter_jobs(sources, query, classes, notes), by)
    return [(g.key, g.jobs, g.vec) for g in groups], notes


def aggregate_parallel(sources: list[Path], query: Query, classes: list[str], by: tuple[str, ...],
                       rates: "Rates | None" = None, workers: int | None = None,
                       min_span: int = 10_000, notes: Notes | None = None) -> list[Group]:
    """aggregate() over iter_jobs(), split by job-id range over worker processes.

    Every job falls into exactly one range, so each worker merges whole jobs; the partial
    totals are then added up. Same result as the single-process path, in less time."""
    import multiprocessing

    workers = workers or os.cpu_count() or 1
    lo, hi = None, None
    for path in sources:
        conn = _open_ro(path)
        try:
            a, b = conn.execute("SELECT MIN(job_id), MAX(job_id) FROM jobs").fetchone()
        finally:
            conn.close()
        if a is not None:
            lo = a if lo is None else min(lo, a)
            hi = b if hi is None else max(hi, b)
    if lo is None or hi is None or workers < 2 or hi - lo < min_span:
        return aggregate(iter_jobs(sources, query, classes, notes), by, rates)
    step = (hi - lo) // workers + 1
    parts = []
    for i in range(workers):
        a = lo + i * step
        b = min(hi, a + step - 1)
        if query.id_range is not None:
            a, b = max(a, query.id_range[0]), min(b, query.id_range[1])
        if a <= b:
            parts.append((sources, Query(**{**query.__dict__, "id_range": (a, b)}), classes, by))
    with multiprocessing.get_context("fork").Pool(len(parts)) as pool:
        results = pool.map(_aggregate_part, parts)
    groups: dict[tuple[str, ...], Group] = {}
    for part, part_notes in results:
        if notes is not None:
            notes.merge(part_notes)
        for key, jobs, vec in part:
            g = groups.get(key)
            if g is None:
                g = groups[key] = Group(key, classes)
            g.jobs += jobs
            g.vec = list(map(operator.add, g.vec, vec))
    if rates is not None:
        for g in groups.values():
            g.cost = rates.cost(g.traffic)
    return [groups[k] for k in sorted(groups)]


# --------------------------------------------------------------------------- billing

@dataclass(frozen=True)
class Rates:
    """Prices per unit of traffic for each (class, direction); see README "Billing"."""

    prices: dict[tuple[str, str], Decimal]
    unit_bytes: int = 10**9  # "GB": clouds bill decimal gigabytes
    decimals: int = 2
    currency: str = ""

    def cost(self, traffic: dict[str, dict[str, int]]) -> Decimal:
        """The exact price of the traffic, rounded half-up to `decimals` once."""
        total = Decimal(0)
        for (klass, direction), price in self.prices.items():
            n = traffic.get(klass, {}).get(f"{direction}_bytes", 0)
            total += Decimal(n) * price / Decimal(self.unit_bytes)
        return total.quantize(Decimal(1).scaleb(-self.decimals), rounding=ROUND_HALF_UP)


def human_bytes(n: int) -> str:
    """Bytes in binary units as sacct prints them: 512, 1.50K, 3.20M, ..."""
    value = float(n)
    for unit in ("", "K", "M", "G", "T", "P"):
        if value < 1024 or unit == "P":
            return f"{n}" if unit == "" else f"{value:.2f}{unit}"
        value /= 1024
    return str(n)  # pragma: no cover


def in_units(n: int, unit: str) -> str:
    """Bytes in a fixed sacct unit (K, M, G, T, P = powers of 1024), two decimals."""
    power = "KMGTP".index(unit) + 1
    return f"{n / 1024**power:.2f}{unit}"

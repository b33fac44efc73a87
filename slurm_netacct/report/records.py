"""Job records: node rows merged into one record per job (streamed), and which jobs a query wants."""

from __future__ import annotations

import heapq
import operator
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from ..states import SHOWN_FIRST, State
from ..store import read
from ..store.read import Row, RowFilter
from ..traffic import FIELDS, Traffic

_KEY = operator.itemgetter(0, 1, 2)  # (job id, node, restart): a node row's key


class JobRecord:
    """One job, summed over its nodes (and over restarts of a requeued job).

    Traffic is kept as a flat vector, 4 numbers per class in `classes` order (in_bytes,
    out_bytes, in_packets, out_packets): summing a million jobs stays cheap. `traffic` and
    `per_node` give the usual {class: {field: n}} view.
    """

    __slots__ = ("job_id", "classes", "user", "account", "partition", "nodes", "start", "end",
                 "state", "vec", "node_vecs", "as_of", "live", "cost")

    def __init__(self, job_id: int, classes: list[str], state: str = State.COMPLETED) -> None:
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
    def traffic(self) -> Traffic:
        return unflatten(self.vec, self.classes)

    @property
    def per_node(self) -> dict[str, Traffic]:
        return {n: unflatten(v, self.classes) for n, v in self.node_vecs.items()}

    def as_json(self, per_node: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "job_id": str(self.job_id), "user": self.user, "account": self.account,
            "partition": self.partition, "nodes": self.nodes, "start": self.start,
            "end": self.end, "state": str(self.state), "traffic": self.traffic,
        }
        if self.state == State.RUNNING:
            out["live"] = self.live
        if self.state in (State.RUNNING, State.LOST):
            out["as_of"] = self.as_of  # the counters are those sampled then (None: never sampled)
        if per_node:
            out["per_node"] = self.per_node
        if self.cost is not None:
            out["cost"] = str(self.cost)
        return out


def unflatten(vec: list[int], classes: list[str]) -> Traffic:
    return {k: dict(zip(FIELDS, vec[4 * i: 4 * i + 4])) for i, k in enumerate(classes)}


def flatten(traffic: Traffic, classes: list[str]) -> list[int]:
    return [int(traffic.get(k, {}).get(f, 0)) for k in classes for f in FIELDS]


def overlay_live(rec: JobRecord, node: str, traffic: Traffic) -> None:
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
        if state == State.RUNNING:
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
        if self.billing and (rec.state == State.RUNNING or not self._ended_in_window(rec)):
            return False
        return self._listed(rec)

    def unbilled(self, rec: JobRecord) -> bool:
        """A running job that billing leaves out but a listing with the same flags would show."""
        return self.billing and rec.state == State.RUNNING and self._listed(rec)

    def rows(self) -> RowFilter:
        """What the databases select by themselves."""
        return RowFilter(self.job_ids, self.users, self.accounts, self.partitions, self.id_range)


def _build(rows: list[Row], classes: list[str]) -> JobRecord:
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
        if SHOWN_FIRST.get(state, 9) < SHOWN_FIRST.get(rec.state, 9):
            rec.state = state
        if state in (State.RUNNING, State.LOST) and row[9] and (rec.as_of is None or row[9] < rec.as_of):
            rec.as_of = row[9]
        values = row[10:]
        nv = rec.node_vecs[node]
        for i in range(n):
            v = int(values[i])
            vec[i] += v
            nv[i] += v
    rec.vec = vec
    rec.nodes.sort()
    if rec.state == State.RUNNING:
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


def _finality(row: Row) -> tuple[int, str]:
    """How final a copy of a node row is: any terminal state over running; then the later
    end (terminal) or the later sample (running)."""
    if row[8] == State.RUNNING:
        return (0, row[9] or "")
    return (1, row[7] or "")


def _final_rows(rows: Iterable[Row]) -> Iterator[tuple[Row, bool]]:
    """One row per (job, node, run) of rows in key order: its most final copy (ties: the
    first), and whether the copies disagreed (state or traffic)."""
    best: Row | None = None
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
    sources = read.unique_sources(paths)
    if classes is None:
        classes = read.classes_in(sources)
    rows = query.rows()
    merged = heapq.merge(*(read.node_rows(p, rows, classes) for p in sources), key=_KEY)
    return jobs_from_rows(merged, query, classes, notes)


def jobs_from_rows(merged: Iterable[Row], query: Query, classes: list[str],
                   notes: Notes | None = None) -> Iterator[JobRecord]:
    """Job records from node rows in (job id, node, restart) order (a row may come several
    times: its most final copy is taken), those the query wants; constant memory."""
    if notes is None:
        notes = Notes()
    group: list[Row] = []
    differing: list[str] = []  # nodes of the group's rows whose copies disagreed
    for row, differs in _final_rows(merged):
        if group and group[0][0] != row[0]:
            yield from _selected(group, differing, classes, query, notes)
            group = []
            differing = []
        group.append(row)
        if differs:
            differing.append(row[1])
    if group:
        yield from _selected(group, differing, classes, query, notes)


def _selected(group: list[Row], differing: list[str], classes: list[str], query: Query,
              notes: Notes) -> Iterator[JobRecord]:
    """One job's record from its node rows, if the query wants it (noted: copies that differed,
    or a running job left out of a bill)."""
    rec = _build(group, classes)
    if query.wants(rec):
        if differing:
            notes.add_differing(len(differing), (rec.job_id, differing[0]))
        yield rec
    elif query.unbilled(rec):
        notes.unbilled_running += 1


def load(paths: Iterable[Path], job_ids: set[int] | None = None) -> list[JobRecord]:
    """All matching job records as a list (convenience for small selections)."""
    q = Query(job_ids=frozenset(job_ids) if job_ids else None)
    return list(iter_jobs(paths, q))

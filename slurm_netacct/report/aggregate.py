"""Totals per group of jobs (--group-by), in one process or split by job-id range."""

from __future__ import annotations

import operator
import os
from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path

from ..store import read
from ..traffic import Traffic
from .rates import Rates
from .records import JobRecord, Notes, Query, iter_jobs, unflatten


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
    def traffic(self) -> Traffic:
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


def aggregate(records: Iterable[JobRecord], by: tuple[str, ...], rates: Rates | None = None,
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


def regroup(groups: Iterable[Group], keep: tuple[int, ...], rates: Rates | None = None) -> list[Group]:
    """Totals of coarser groups from finer ones: those of the key positions `keep` of each key.

    For groups without the `node` key every job is in exactly one of them, so the jobs and the
    traffic of the coarser groups add up exactly to what aggregate() gives for those keys; their
    costs are priced afresh (each group's traffic rounded once)."""
    out: dict[tuple[str, ...], Group] = {}
    for fine in groups:
        key = tuple(fine.key[i] for i in keep)
        g = out.get(key)
        if g is None:
            g = out[key] = Group(key, fine.classes)
        g.jobs += fine.jobs
        g.vec = list(map(operator.add, g.vec, fine.vec))
    if rates is not None:
        for g in out.values():
            g.cost = rates.cost(g.traffic)
    return [out[k] for k in sorted(out)]


def _aggregate_part(args: tuple[list[Path], Query, list[str], tuple[str, ...]]
                    ) -> tuple[list[tuple[tuple[str, ...], int, list[int]]], Notes]:
    sources, query, classes, by = args
    notes = Notes()
    groups = aggregate(iter_jobs(sources, query, classes, notes), by)
    return [(g.key, g.jobs, g.vec) for g in groups], notes


def aggregate_parallel(sources: list[Path], query: Query, classes: list[str], by: tuple[str, ...],
                       rates: Rates | None = None, workers: int | None = None,
                       min_span: int = 10_000, notes: Notes | None = None) -> list[Group]:
    """aggregate() over iter_jobs(), split by job-id range over worker processes.

    Every job falls into exactly one range, so each worker merges whole jobs; the partial
    totals are then added up. Same result as the single-process path, in less time."""
    import multiprocessing

    workers = workers or os.cpu_count() or 1
    span = read.job_id_range(sources)
    if span is None or workers < 2 or span[1] - span[0] < min_span:
        return aggregate(iter_jobs(sources, query, classes, notes), by, rates)
    lo, hi = span
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

"""Reading node databases and merging their rows into one record per job (streamed)."""

from __future__ import annotations

import heapq
import os
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from .errors import StoreError

FIELDS = ("in_bytes", "out_bytes", "in_packets", "out_packets")
# When a job's node rows disagree, the most important state wins.
_STATE_RANK = {"running": 0, "lost": 1, "reconciled": 2, "completed": 3}
STATES = tuple(_STATE_RANK)


@dataclass
class JobRecord:
    """One job, summed over its nodes (and over restarts of a requeued job)."""

    job_id: int
    user: str | None = None
    account: str | None = None
    partition: str | None = None
    nodes: list[str] = field(default_factory=list)
    start: str | None = None
    end: str | None = None
    state: str = "completed"
    traffic: dict[str, dict[str, int]] = field(default_factory=dict)
    per_node: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    as_of: str | None = None  # running jobs: when the counters were sampled ("live": now)
    live: bool = False
    cost: Decimal | None = None  # with --rates

    def as_json(self, per_node: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "job_id": str(self.job_id), "user": self.user, "account": self.account,
            "partition": self.partition, "nodes": self.nodes, "start": self.start,
            "end": self.end, "state": self.state, "traffic": self.traffic,
        }
        if self.state == "running":
            out["live"] = self.live
            out["as_of"] = self.as_of
        if per_node:
            out["per_node"] = self.per_node
        if self.cost is not None:
            out["cost"] = str(self.cost)
        return out


def overlay_live(rec: JobRecord, node: str, traffic: dict[str, dict[str, int]]) -> None:
    """Replace one node's stored counters of a running job with its live counters."""
    old = rec.per_node.get(node, {})
    for klass in set(old) | set(traffic):
        for f in FIELDS:
            delta = traffic.get(klass, {}).get(f, 0) - old.get(klass, {}).get(f, 0)
            rec.traffic.setdefault(klass, {k: 0 for k in FIELDS})[f] += delta
    rec.per_node[node] = {k: dict(v) for k, v in traffic.items()}
    rec.live = len(rec.nodes) == 1
    if rec.live:
        rec.as_of = None


@dataclass(frozen=True)
class Query:
    """Which jobs to report; None means no restriction. Times are UTC ISO strings."""

    job_ids: frozenset[int] | None = None
    users: frozenset[str] | None = None
    accounts: frozenset[str] | None = None
    partitions: frozenset[str] | None = None
    nodes: frozenset[str] | None = None
    states: frozenset[str] | None = None
    start: str | None = None  # jobs still running at or after this time
    end: str | None = None  # jobs started at or before this time

    def wants(self, rec: JobRecord) -> bool:
        """The job-level filters (a job's nodes, state and time span are known only merged)."""
        if self.nodes is not None and not self.nodes.intersection(rec.nodes):
            return False
        if self.states is not None and rec.state not in self.states:
            return False
        if self.end is not None and (rec.start is None or rec.start > self.end):
            return False
        if self.start is not None and rec.end is not None and rec.end < self.start:
            return False
        return True


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
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
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


def _in(column: str, values: frozenset[Any] | None, where: list[str], params: list[Any]) -> None:
    if values is not None:
        where.append(f"j.{column} IN ({','.join('?' * len(values))})")
        params.extend(sorted(values))


_Key = tuple[int, str, int]


def _node_rows(path: Path, query: Query, classes: list[str]) -> Iterator[tuple[_Key, dict[str, Any]]]:
    """One database's job rows, traffic pivoted per class, ordered by (job id, node, restart)."""
    conn = _open_ro(path)
    cols = []
    for k in classes:
        for f in FIELDS:
            cols.append(f"SUM(CASE WHEN t.class = '{k}' THEN t.{f} END)")
    where: list[str] = []
    params: list[Any] = []
    _in("job_id", query.job_ids, where, params)
    _in("user", query.users, where, params)
    _in("account", query.accounts, where, params)
    _in("partition", query.partitions, where, params)
    sql = ("SELECT j.job_id, j.node, j.restart, j.user, j.account, j.partition, j.start, j.\"end\", "
           f"j.state, j.sampled_at{''.join(', ' + c for c in cols)} "
           "FROM jobs j LEFT JOIN traffic t ON t.job_id = j.job_id AND t.node = j.node "
           "AND t.restart = j.restart"
           + (" WHERE " + " AND ".join(where) if where else "")
           + " GROUP BY j.job_id, j.node, j.restart ORDER BY j.job_id, j.node, j.restart")
    try:
        for r in conn.execute(sql, params):
            traffic: dict[str, dict[str, int]] = {}
            i = 10
            for k in classes:
                vals = r[i:i + 4]
                i += 4
                if any(v is not None for v in vals):
                    traffic[k] = {f: int(v or 0) for f, v in zip(FIELDS, vals)}
            yield (r[0], r[1], r[2]), {
                "user": r[3], "account": r[4], "partition": r[5], "start": r[6], "end": r[7],
                "state": r[8], "sampled_at": r[9], "traffic": traffic}
    except sqlite3.Error as exc:
        raise StoreError(f"database {path}: {exc}") from None
    finally:
        conn.close()


def _add(dst: dict[str, int], src: dict[str, int]) -> None:
    for k in FIELDS:
        dst[k] = dst.get(k, 0) + int(src.get(k) or 0)


def _build(job_id: int, rows: list[tuple[_Key, dict[str, Any]]], classes: list[str]) -> JobRecord:
    rec = JobRecord(job_id=job_id, state=rows[0][1]["state"])
    for (_, node, _restart), row in rows:
        for attr in ("user", "account", "partition"):
            if getattr(rec, attr) is None and row[attr] is not None:
                setattr(rec, attr, row[attr])
        if node not in rec.nodes:
            rec.nodes.append(node)
        if row["start"] and (rec.start is None or row["start"] < rec.start):
            rec.start = row["start"]
        if _STATE_RANK.get(row["state"], 9) < _STATE_RANK.get(rec.state, 9):
            rec.state = row["state"]
        if row["end"] and (rec.end is None or row["end"] > rec.end):
            rec.end = row["end"]
        if row["state"] == "running" and row["sampled_at"]:
            if rec.as_of is None or row["sampled_at"] < rec.as_of:
                rec.as_of = row["sampled_at"]
        for klass, values in row["traffic"].items():
            _add(rec.traffic.setdefault(klass, {}), values)
            _add(rec.per_node.setdefault(node, {}).setdefault(klass, {}), values)
    rec.nodes.sort()
    if rec.state == "running":
        rec.end = None
    for k in classes:
        rec.traffic.setdefault(k, {f: 0 for f in FIELDS})
        for node in rec.nodes:
            rec.per_node.setdefault(node, {}).setdefault(k, {f: 0 for f in FIELDS})
    return rec


def iter_jobs(paths: Iterable[Path], query: Query = Query(), classes: list[str] | None = None) -> Iterator[JobRecord]:
    """Job records merged over all databases, ordered by job id, in constant memory.

    Each database yields its rows in (job id, node, restart) order; a k-way merge groups
    them by job. A row seen twice (two copies of one node's database) is counted once.
    """
    sources = unique_sources(paths)
    if classes is None:
        classes = classes_in(sources)
    merged = heapq.merge(*(_node_rows(p, query, classes) for p in sources), key=lambda kr: kr[0])
    group: list[tuple[_Key, dict[str, Any]]] = []
    last_key: _Key | None = None
    for key, row in merged:
        if key == last_key:
            continue  # the same node row from another copy of the database
        last_key = key
        if group and group[0][0][0] != key[0]:
            rec = _build(group[0][0][0], group, classes)
            if query.wants(rec):
                yield rec
            group = []
        group.append((key, row))
    if group:
        rec = _build(group[0][0][0], group, classes)
        if query.wants(rec):
            yield rec


def load(paths: Iterable[Path], job_ids: set[int] | None = None) -> list[JobRecord]:
    """All matching job records as a list (convenience for small selections)."""
    q = Query(job_ids=frozenset(job_ids) if job_ids else None)
    return list(iter_jobs(paths, q))


# --------------------------------------------------------------------------- aggregation

GROUP_BY = ("user", "account", "partition", "node", "day", "month")


@dataclass
class Group:
    """Totals of the jobs sharing one value of the --group-by key."""

    key: str
    jobs: int = 0
    traffic: dict[str, dict[str, int]] = field(default_factory=dict)
    cost: Decimal = Decimal(0)


def group_keys(rec: JobRecord, by: str) -> list[tuple[str, dict[str, dict[str, int]]]]:
    """(group key, the traffic that goes to it) for one job; a job may feed several nodes."""
    if by == "node":
        return [(n, rec.per_node.get(n, {})) for n in rec.nodes]
    if by in ("day", "month"):
        start = rec.start or ""
        return [(start[:10] if by == "day" else start[:7], rec.traffic)]
    return [(getattr(rec, by) or "(none)", rec.traffic)]


def aggregate(records: Iterable[JobRecord], by: str, rates: "Rates | None" = None) -> list[Group]:
    """Totals per group, sorted by key; memory grows with the number of groups only."""
    groups: dict[str, Group] = {}
    for rec in records:
        for key, traffic in group_keys(rec, by):
            g = groups.get(key)
            if g is None:
                g = groups[key] = Group(key)
            g.jobs += 1
            for klass, values in traffic.items():
                _add(g.traffic.setdefault(klass, {}), values)
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

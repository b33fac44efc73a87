"""The node-local SQLite store (sqlite-utils, WAL): job rows, per-class traffic, address leases."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlite_utils

from ..errors import PoolExhaustedError, StoreError
from ..states import State
from ..traffic import FIELDS

SCHEMA_VERSION = 4
BUSY_TIMEOUT_MS = 30_000

JOB_COLUMNS: dict[str, Any] = {
    "job_id": int, "node": str, "restart": int, "user": str, "uid": int, "account": str,
    "partition": str, "start": str, "end": str, "state": str, "netns": str,
    "ipv4": str, "ipv6": str, "backend": str, "sampled_at": str,
    "classes": str,  # the classes its counters count, in counter order, comma-separated
    "changed": int,  # version 4: when the row (or its traffic) last changed, a node-wide sequence
}
TRAFFIC_COLUMNS: dict[str, Any] = {"job_id": int, "node": str, "restart": int, "class": str,
                                   **{f: int for f in FIELDS}}


def now_iso() -> str:
    """The current UTC time as ISO 8601 with seconds, e.g. 2026-11-25T23:59:01Z."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class JobInfo:
    """What the prolog knows about a job on this node."""

    job_id: int
    node: str
    restart: int = 0
    user: str | None = None
    uid: int | None = None
    account: str | None = None
    partition: str | None = None
    host: str | None = None  # the host name for %h in netns_prefix (default: this host's)


def connect(path: Path, create: bool = True) -> sqlite_utils.Database:
    """Open (and if needed create) a node database in WAL mode with a long busy timeout."""
    try:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        elif not path.exists():
            raise StoreError(f"database {path} does not exist")
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        db = sqlite_utils.Database(conn)
        if create:
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)
            _ensure_schema(db)
        return db
    except sqlite3.Error as exc:
        raise StoreError(f"database {path}: {exc}") from None
    except OSError as exc:
        raise StoreError(f"database {path}: {exc.strerror}") from None


# Every write of a job row or of its traffic gives the row the next number of a node-wide
# sequence (`changed`): whatever path wrote it (hooks, samples, spool replay, reconcile),
# netacct-ship finds it above its watermark. A writer holds the write lock, so a number is
# always above every number a reader's snapshot can hold: nothing slips under a watermark.
_NEXT_CHANGE = "(SELECT COALESCE(MAX(changed), 0) + 1 FROM jobs)"
_CHANGE_TRIGGERS = (
    "CREATE TRIGGER IF NOT EXISTS jobs_changed_insert AFTER INSERT ON jobs BEGIN "
    f"UPDATE jobs SET changed = {_NEXT_CHANGE} WHERE rowid = NEW.rowid; END",
    "CREATE TRIGGER IF NOT EXISTS jobs_changed_update AFTER UPDATE OF job_id, node, restart, user, uid, "
    "account, partition, start, \"end\", state, sampled_at, classes ON jobs BEGIN "
    f"UPDATE jobs SET changed = {_NEXT_CHANGE} WHERE rowid = NEW.rowid; END",
    "CREATE TRIGGER IF NOT EXISTS traffic_changed_insert AFTER INSERT ON traffic BEGIN "
    f"UPDATE jobs SET changed = {_NEXT_CHANGE} WHERE job_id = NEW.job_id AND node = NEW.node "
    "AND restart = NEW.restart; END",
    "CREATE TRIGGER IF NOT EXISTS traffic_changed_update AFTER UPDATE ON traffic BEGIN "
    f"UPDATE jobs SET changed = {_NEXT_CHANGE} WHERE job_id = NEW.job_id AND node = NEW.node "
    "AND restart = NEW.restart; END",
)


def _ensure_schema(db: sqlite_utils.Database) -> None:
    if db.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
        return
    with immediate(db):
        version = db.conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise StoreError(f"database of schema version {version}, newer than this version of "
                             f"slurm-netacct knows ({SCHEMA_VERSION}): upgrade slurm-netacct")
        if version == 1:  # 0.1.0 development databases: add what version 2 added
            db.conn.execute("ALTER TABLE jobs ADD COLUMN sampled_at TEXT")
        if version in (1, 2):  # version 3: the classes a job's counters count
            db.conn.execute("ALTER TABLE jobs ADD COLUMN classes TEXT")
        if version in (1, 2, 3):  # version 4: a change sequence for shipping to the ledger
            db.conn.execute("ALTER TABLE jobs ADD COLUMN changed INTEGER")
            db.conn.execute("UPDATE jobs SET changed = rowid")  # every existing row is yet to ship
        db.conn.execute("PRAGMA journal_mode=WAL")  # no-op inside a transaction if already WAL
        db["jobs"].create(JOB_COLUMNS, pk=("job_id", "node", "restart"), not_null={"job_id", "node", "restart", "state"}, if_not_exists=True)
        db["traffic"].create(TRAFFIC_COLUMNS, pk=("job_id", "node", "restart", "class"), if_not_exists=True)
        db["leases"].create({"node": str, "idx": int, "job_id": int, "netns": str, "since": str},
                            pk=("node", "idx"), if_not_exists=True)
        db["leases"].create_index(["node", "job_id"], unique=True, if_not_exists=True)
        db["jobs"].create_index(["start"], if_not_exists=True)
        db["jobs"].create_index(["state"], if_not_exists=True)
        db["jobs"].create_index(["changed"], if_not_exists=True)
        db["ship_marks"].create({"ledger": str, "watermark": int, "shipped_at": str}, pk="ledger",
                                if_not_exists=True)
        for sql in _CHANGE_TRIGGERS:
            db.conn.execute(sql)
        db.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    db.conn.execute("PRAGMA journal_mode=WAL")


@contextmanager
def _sql_errors() -> Iterator[None]:
    """sqlite3 errors raised inside (a corrupted file, a read-only one) become StoreError."""
    try:
        yield
    except sqlite3.Error as exc:
        raise StoreError(f"database: {exc}") from None


@contextmanager
def immediate(db: sqlite_utils.Database) -> Iterator[None]:
    """A write transaction taken up front (BEGIN IMMEDIATE), so concurrent writers queue.

    sqlite3 errors inside it (a corrupted or read-only file, a full disk) are StoreErrors."""
    conn = db.conn
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    with _sql_errors():
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise StoreError(f"database: {exc}") from None
                time.sleep(0.01)
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise


def lease(db: sqlite_utils.Database, node: str, job_id: int, netns: str, first: int, last: int) -> int:
    """The job's address index on node in first..last: its lease, or the lowest free one."""
    with immediate(db):
        row = db.conn.execute("SELECT idx FROM leases WHERE node = ? AND job_id = ?",
                              (node, job_id)).fetchone()
        if row:
            return int(row[0])
        count, low, high = db.conn.execute(
            "SELECT COUNT(*), MIN(idx), MAX(idx) FROM leases WHERE node = ? AND idx BETWEEN ? AND ?",
            (node, first, last)).fetchone()
        if count == 0 or low > first:
            idx = first
        elif count == high - first + 1:  # no gap: the next one (one index walk, no rows fetched)
            idx = high + 1
        else:  # a gap somewhere: find the lowest
            taken = db.conn.execute(
                "SELECT idx FROM leases WHERE node = ? AND idx BETWEEN ? AND ? ORDER BY idx",
                (node, first, last)).fetchall()
            idx = first
            for (t,) in taken:
                if t != idx:
                    break
                idx += 1
        if idx > last:
            raise PoolExhaustedError(f"address pool exhausted: all {last - first + 1} addresses are leased")
        db.conn.execute("INSERT INTO leases (node, idx, job_id, netns, since) VALUES (?, ?, ?, ?, ?)",
                        (node, idx, job_id, netns, now_iso()))
        return idx


def release(db: sqlite_utils.Database, node: str, job_id: int) -> None:
    with immediate(db):
        db.conn.execute("DELETE FROM leases WHERE node = ? AND job_id = ?", (node, job_id))


def job_row(db: sqlite_utils.Database, info: JobInfo) -> dict[str, Any] | None:
    """The job's row for this node and run, or None."""
    with _sql_errors():
        cur = db.conn.execute("SELECT * FROM jobs WHERE job_id=? AND node=? AND restart=?",
                              (info.job_id, info.node, info.restart))
        row = cur.fetchone()
    if row is None:
        return None
    return dict(zip([c[0] for c in cur.description], row))


def record_start(db: sqlite_utils.Database, info: JobInfo, netns: str, ipv4: str | None,
                 ipv6: str | None, backend: str, classes: tuple[str, ...] = ()) -> None:
    """Insert the job's row (state running); keep the start time of an existing row."""
    with immediate(db):
        existing = job_row(db, info)
        db["jobs"].upsert({
            "job_id": info.job_id, "node": info.node, "restart": info.restart,
            "user": info.user, "uid": info.uid, "account": info.account,
            "partition": info.partition,
            "start": existing["start"] if existing and existing.get("start") else now_iso(),
            "end": None, "state": State.RUNNING.value, "netns": netns, "ipv4": ipv4, "ipv6": ipv6,
            "backend": backend, "classes": ",".join(classes) or None,
        }, pk=("job_id", "node", "restart"))


def record_end(db: sqlite_utils.Database, info: JobInfo, state: str,
               traffic: Mapping[str, Mapping[str, int]] | None, end: str | None = None,
               start: str | None = None, if_running: bool = False) -> bool:
    """Store the final counters (class -> in/out bytes/packets) and close the job's row.

    `end` defaults to now; `start` fills a row that has none (a replayed spool record may be
    all there is). With if_running, only a row still `running` is closed. True if stored."""
    with immediate(db):
        existing = job_row(db, info)
        if if_running and (existing is None or existing["state"] != State.RUNNING):
            return False
        row: dict[str, Any] = {"job_id": info.job_id, "node": info.node, "restart": info.restart,
                               "end": end or now_iso(), "state": state}
        if existing is None:
            row.update({"user": info.user, "uid": info.uid, "account": info.account,
                        "partition": info.partition, "start": start})
        else:
            for key in ("user", "uid", "account", "partition"):
                if existing.get(key) is None and getattr(info, key) is not None:
                    row[key] = getattr(info, key)
            if existing.get("start") is None and start is not None:
                row["start"] = start
        db["jobs"].upsert(row, pk=("job_id", "node", "restart"))
        if traffic is not None:
            for klass, values in traffic.items():
                db["traffic"].upsert({
                    "job_id": info.job_id, "node": info.node, "restart": info.restart,
                    "class": klass, **{k: int(values[k]) for k in FIELDS},
                }, pk=("job_id", "node", "restart", "class"))
        return True


def running_jobs(db: sqlite_utils.Database, node: str | None = None,
                 job_id: int | None = None) -> list[dict[str, Any]]:
    """Rows of the jobs this database believes are running (on `node`, and of `job_id`, if
    given: a prolog or epilog asks about its own job only, whatever else runs on the node)."""
    # With a job id the primary key finds its rows; "+state" keeps SQLite from choosing the
    # state index instead, which walks every running job of the node (measured: 3x slower
    # with 1000 running jobs).
    sql = "SELECT * FROM jobs WHERE " + ("+state" if job_id is not None else "state") + " = ?"
    params: tuple[Any, ...] = (State.RUNNING.value,)
    if node is not None:
        sql += " AND node = ?"
        params = (*params, node)
    if job_id is not None:
        sql += " AND job_id = ?"
        params = (*params, job_id)
    with _sql_errors():
        cur = db.conn.execute(sql, params)
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, r)) for r in cur]


_UPSERT_TRAFFIC = (
    f"INSERT INTO traffic (job_id, node, restart, class, {', '.join(FIELDS)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (job_id, node, restart, class) DO UPDATE SET "
    + ", ".join(f"{f}=excluded.{f}" for f in FIELDS))


def record_sample(db: sqlite_utils.Database, info: JobInfo,
                  traffic: Mapping[str, Mapping[str, int]]) -> bool:
    """Store a running job's current counters (the job stays running); False if the job is
    no longer running here (its epilog won the race: the final numbers are already stored)."""
    return record_samples(db, [(info, traffic)])[0]


def record_samples(db: sqlite_utils.Database,
                   items: list[tuple[JobInfo, Mapping[str, Mapping[str, int]]]]) -> list[bool]:
    """record_sample for many jobs in one transaction (one commit for a whole node)."""
    done: list[bool] = []
    now = now_iso()
    with immediate(db):
        for info, traffic in items:
            key = (info.job_id, info.node, info.restart)
            state = db.conn.execute("SELECT state FROM jobs WHERE job_id=? AND node=? AND restart=?",
                                    key).fetchone()
            if state is None or state[0] != State.RUNNING:
                done.append(False)
                continue
            db.conn.executemany(_UPSERT_TRAFFIC, [(*key, klass, *(int(v[f]) for f in FIELDS))
                                                  for klass, v in traffic.items()])
            db.conn.execute("UPDATE jobs SET sampled_at = ? WHERE job_id=? AND node=? AND restart=?",
                            (now, *key))
            done.append(True)
    return done


def newest_run(db: sqlite_utils.Database, node: str, job_id: int) -> JobInfo | None:
    """The newest run of a job on a node as the store knows it (user, account, ...), or None."""
    with _sql_errors():
        row = db.conn.execute("SELECT restart, user, uid, account, partition FROM jobs WHERE job_id = ? "
                              "AND node = ? ORDER BY restart DESC LIMIT 1", (job_id, node)).fetchone()
    if row is None:
        return None
    return JobInfo(job_id=job_id, node=node, restart=row[0], user=row[1], uid=row[2], account=row[3],
                   partition=row[4])


def leased_jobs(db: sqlite_utils.Database, node: str) -> list[int]:
    """The jobs that hold an address lease on a node."""
    with _sql_errors():
        return [int(j) for (j,) in db.conn.execute("SELECT job_id FROM leases WHERE node = ?", (node,))]


def row_classes(row: Mapping[str, Any] | None) -> tuple[str, ...] | None:
    """The classes a job run's counters count, as its prolog recorded them (None: not recorded)."""
    text = (row or {}).get("classes")
    return tuple(text.split(",")) if text else None

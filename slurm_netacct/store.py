"""The node-local SQLite store (sqlite-utils, WAL): job rows, per-class traffic, address leases."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlite_utils

from . import naming
from .errors import PoolExhaustedError, StoreError
from .log import get as get_log

SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 30_000

JOB_COLUMNS: dict[str, Any] = {
    "job_id": int, "node": str, "restart": int, "user": str, "uid": int, "account": str,
    "partition": str, "start": str, "end": str, "state": str, "netns": str,
    "ipv4": str, "ipv6": str, "backend": str, "sampled_at": str,
}
TRAFFIC_COLUMNS: dict[str, Any] = {
    "job_id": int, "node": str, "restart": int, "class": str,
    "in_bytes": int, "out_bytes": int, "in_packets": int, "out_packets": int,
}


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


def _ensure_schema(db: sqlite_utils.Database) -> None:
    if db.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
        return
    with immediate(db):
        version = db.conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version == 1:  # 0.1.0 development databases: add what version 2 added
            db.conn.execute("ALTER TABLE jobs ADD COLUMN sampled_at TEXT")
        db.conn.execute("PRAGMA journal_mode=WAL")  # no-op inside a transaction if already WAL
        db["jobs"].create(JOB_COLUMNS, pk=("job_id", "node", "restart"), not_null={"job_id", "node", "restart", "state"}, if_not_exists=True)
        db["traffic"].create(TRAFFIC_COLUMNS, pk=("job_id", "node", "restart", "class"), if_not_exists=True)
        db["leases"].create({"node": str, "idx": int, "job_id": int, "netns": str, "since": str},
                            pk=("node", "idx"), if_not_exists=True)
        db["leases"].create_index(["node", "job_id"], unique=True, if_not_exists=True)
        db["jobs"].create_index(["start"], if_not_exists=True)
        db["jobs"].create_index(["state"], if_not_exists=True)
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


def record_start(db: sqlite_utils.Database, info: JobInfo, netns: str, ipv4: str,
                 ipv6: str | None, backend: str) -> None:
    """Insert the job's row (state running); keep the start time of an existing row."""
    with immediate(db):
        existing = job_row(db, info)
        db["jobs"].upsert({
            "job_id": info.job_id, "node": info.node, "restart": info.restart,
            "user": info.user, "uid": info.uid, "account": info.account,
            "partition": info.partition,
            "start": existing["start"] if existing and existing.get("start") else now_iso(),
            "end": None, "state": "running", "netns": netns, "ipv4": ipv4, "ipv6": ipv6,
            "backend": backend,
        }, pk=("job_id", "node", "restart"))


def record_end(db: sqlite_utils.Database, info: JobInfo, state: str,
               traffic: Mapping[str, Mapping[str, int]] | None, end: str | None = None,
               start: str | None = None, if_running: bool = False) -> bool:
    """Store the final counters (class -> in/out bytes/packets) and close the job's row.

    `end` defaults to now; `start` fills a row that has none (a replayed spool record may be
    all there is). With if_running, only a row still `running` is closed. True if stored."""
    with immediate(db):
        existing = job_row(db, info)
        if if_running and (existing is None or existing["state"] != "running"):
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
                    "class": klass, **{k: int(values[k]) for k in
                                       ("in_bytes", "out_bytes", "in_packets", "out_packets")},
                }, pk=("job_id", "node", "restart", "class"))
        return True


def running_jobs(db: sqlite_utils.Database, node: str | None = None,
                 job_id: int | None = None) -> list[dict[str, Any]]:
    """Rows of the jobs this database believes are running (on `node`, and of `job_id`, if
    given: a prolog or epilog asks about its own job only, whatever else runs on the node)."""
    # With a job id the primary key finds its rows; "+state" keeps SQLite from choosing the
    # state index instead, which walks every running job of the node (measured: 3x slower
    # with 1000 running jobs).
    sql = "SELECT * FROM jobs WHERE " + ("+state" if job_id is not None else "state") + " = 'running'"
    params: tuple[Any, ...] = ()
    if node is not None:
        sql += " AND node = ?"
        params = (node,)
    if job_id is not None:
        sql += " AND job_id = ?"
        params = (*params, job_id)
    with _sql_errors():
        cur = db.conn.execute(sql, params)
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, r)) for r in cur]


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
            if state is None or state[0] != "running":
                done.append(False)
                continue
            db.conn.executemany(
                "INSERT INTO traffic (job_id, node, restart, class, in_bytes, out_bytes, in_packets, "
                "out_packets) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (job_id, node, restart, class) "
                "DO UPDATE SET in_bytes=excluded.in_bytes, out_bytes=excluded.out_bytes, "
                "in_packets=excluded.in_packets, out_packets=excluded.out_packets",
                [(*key, klass, int(v["in_bytes"]), int(v["out_bytes"]), int(v["in_packets"]),
                  int(v["out_packets"])) for klass, v in traffic.items()])
            db.conn.execute("UPDATE jobs SET sampled_at = ? WHERE job_id=? AND node=? AND restart=?",
                            (now, *key))
            done.append(True)
    return done


# --------------------------------------------------------------------------- the spool
#
# When the epilog cannot write a job's final record into the database, it writes it as one
# JSON file into the spool directory (durably: temp file, fsync, rename, fsync of the
# directory) and tears the job down. The next hook, netacct-sample or netacct-reconcile that
# opens the database stores every spooled record of its node and only then deletes the file.
# Records hold absolute counter values, keyed by job, node and run: storing one twice (a crash
# between the commit and the deletion, two replays at once) stores the same numbers again.

SPOOL_FORMAT = "slurm-netacct spool 1"
SPOOL_SUFFIX = ".json"
_STALE_TMP_S = 3600  # a temp file this old is what a crash left: its epilog will run again


def _spool_token(node: str) -> str:
    """The node's part of a spool file name: the name itself if it is file-name safe."""
    if naming.valid_host_name(node) and "." not in node:
        return node
    return "node-" + hashlib.sha256(node.encode()).hexdigest()[:16]


def spool_path(spool_dir: Path, info: JobInfo) -> Path:
    """The spool file of one run of one job on one node (one file per key)."""
    return spool_dir / f"{_spool_token(info.node)}.{info.job_id}.{info.restart}{SPOOL_SUFFIX}"


def spool_record(info: JobInfo, state: str, traffic: Mapping[str, Mapping[str, int]] | None,
                 row: Mapping[str, Any] | None, if_running: bool, db_path: Path, error: str) -> dict[str, Any]:
    """A final record as it is spooled: what record_end would have stored, and why it was not."""
    row = row or {}
    return {
        "format": SPOOL_FORMAT, "job_id": info.job_id, "node": info.node, "restart": info.restart,
        "user": info.user if info.user is not None else row.get("user"),
        "uid": info.uid if info.uid is not None else row.get("uid"),
        "account": info.account if info.account is not None else row.get("account"),
        "partition": info.partition if info.partition is not None else row.get("partition"),
        "start": row.get("start"), "end": now_iso(), "state": state,
        "traffic": None if traffic is None else {k: {f: int(v[f]) for f in
                                                     ("in_bytes", "out_bytes", "in_packets", "out_packets")}
                                                 for k, v in traffic.items()},
        "if_running": if_running, "db": str(db_path), "error": error,
    }


def spool_write(spool_dir: Path, record: Mapping[str, Any]) -> Path:
    """Write one record durably into the spool (replacing the same key's); OSError if not."""
    info = JobInfo(job_id=int(record["job_id"]), node=str(record["node"]), restart=int(record["restart"]))
    final = spool_path(spool_dir, info)
    spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=spool_dir)  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(spool_dir)
    return final


def _fsync_dir(path: Path) -> None:
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _spool_names(spool_dir: Path) -> list[str]:
    """The names in the spool directory; [] if there is none or it cannot be read."""
    try:
        return os.listdir(spool_dir)
    except OSError:
        return []


def spool_pending(spool_dir: Path, node: str, names: list[str] | None = None) -> list[Path]:
    """The node's spooled records waiting to be stored, oldest key first; [] if none or unreadable.
    `names`: the directory's listing, if the caller has it already."""
    token = _spool_token(node)
    if names is None:
        names = _spool_names(spool_dir)
    out = []
    for name in names:
        parts = name.rsplit(".", 3)
        if (len(parts) == 4 and parts[0] == token and parts[1].isdigit() and parts[2].isdigit()
                and "." + parts[3] == SPOOL_SUFFIX):
            out.append(spool_dir / name)
    return sorted(out, key=lambda p: (int(p.name.rsplit(".", 3)[1]), int(p.name.rsplit(".", 3)[2])))


def _load_spooled(path: Path, node: str) -> dict[str, Any]:
    """A spooled record, checked; ValueError if it is not one of this node's."""
    rec = json.loads(path.read_text())
    if not isinstance(rec, dict) or rec.get("format") != SPOOL_FORMAT:
        raise ValueError("not a slurm-netacct spool record")
    if rec.get("node") != node:
        raise ValueError(f"a record of node {rec.get('node')!r}")
    for key in ("job_id", "restart"):
        if not isinstance(rec.get(key), int) or isinstance(rec.get(key), bool) or rec[key] < 0:
            raise ValueError(f"bad {key}")
    if not isinstance(rec.get("state"), str) or not isinstance(rec.get("end"), str):
        raise ValueError("bad state or end")
    traffic = rec.get("traffic")
    if traffic is not None:
        if not isinstance(traffic, dict):
            raise ValueError("bad traffic")
        for values in traffic.values():
            if not isinstance(values, dict) or not all(
                    isinstance(values.get(f), int) and values[f] >= 0
                    for f in ("in_bytes", "out_bytes", "in_packets", "out_packets")):
                raise ValueError("bad traffic")
    return rec


def replay_spool(db: sqlite_utils.Database, spool_dir: Path, node: str) -> int:
    """Store the node's spooled records in db, each exactly once; the number stored.

    A file is deleted only after its record is committed. A file that is not a valid record
    is renamed to *.bad and logged; a spool that cannot be read is logged, never an error.
    StoreError if the database cannot be written (the files stay for the next attempt)."""
    log = get_log()
    stored = 0
    names = _spool_names(spool_dir)  # one listing for the records and the stale temp files
    pending = spool_pending(spool_dir, node, names)
    if pending:
        try:
            st = os.stat(spool_dir)
        except OSError:
            return 0
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:  # anyone could have planted records
            log.error("spool %s is not owned by uid %d or is writable by others: its %d records are "
                      "not stored (fix its owner and mode)", spool_dir, os.geteuid(), len(pending))
            return 0
    for path in pending:
        try:
            rec = _load_spooled(path, node)
        except FileNotFoundError:  # another process replayed it meanwhile
            continue
        except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            bad = path.with_name(path.name + ".bad")
            log.error("spool file %s is not a valid record (%s); moved to %s", path, exc, bad.name)
            try:
                os.rename(path, bad)
            except OSError:
                pass
            continue
        info = JobInfo(job_id=rec["job_id"], node=node, restart=rec["restart"], user=rec.get("user"),
                       uid=rec.get("uid"), account=rec.get("account"), partition=rec.get("partition"))
        applied = record_end(db, info, rec["state"], rec["traffic"], end=rec["end"],
                             start=rec.get("start"), if_running=bool(rec.get("if_running")))
        try:
            os.unlink(path)
            _fsync_dir(spool_dir)
        except FileNotFoundError:
            pass
        except OSError as exc:  # stored; storing it again later stores the same numbers
            log.error("job %d: spooled record stored, but %s cannot be deleted: %s",
                      info.job_id, path, exc.strerror)
        if applied:
            stored += 1
            log.warning("job %d: spooled record from %s stored in the database (%s)",
                        info.job_id, path, rec["state"])
        else:
            log.info("job %d: spooled record %s not needed (the run is not running here)", info.job_id, path)
    _remove_stale_temps(spool_dir, names)
    return stored


def _remove_stale_temps(spool_dir: Path, names: list[str]) -> None:
    """Temp files of spool writes that a crash interrupted (their epilog runs again)."""
    now = time.time()
    for name in (n for n in names if n.startswith(".tmp-") and n.endswith(".part")):
        try:
            if now - os.stat(spool_dir / name).st_mtime > _STALE_TMP_S:
                os.unlink(spool_dir / name)
        except OSError:
            pass

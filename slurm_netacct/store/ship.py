"""Shipping a node database to the ledger: rows above the watermark, in batches, exactly once in effect."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from .. import naming
from ..config import LedgerConfig
from ..errors import StoreError
from ..traffic import FIELDS
from . import db as store
from . import ledger as ledger_mod


@dataclass
class Shipped:
    """What one shipping run did."""

    rows: int = 0  # job rows sent (a row changed twice between runs is sent once)
    batches: int = 0
    watermark: int = 0  # the node database's change number everything up to which is in the ledger


def mark_key(cfg: LedgerConfig) -> str:
    """Whose watermark: one per ledger and cluster (a new ledger gets everything again)."""
    u = cfg.url
    where = u.socket or f"{u.host}:{u.port}"
    return f"{where}/{u.database}#{cfg.cluster}"


def watermark(db: sqlite_utils.Database, key: str) -> int:
    with store._sql_errors():
        row = db.conn.execute("SELECT watermark FROM ship_marks WHERE ledger = ?", (key,)).fetchone()
    return int(row[0]) if row else 0


def _set_watermark(db: sqlite_utils.Database, key: str, value: int) -> None:
    with store.immediate(db):
        db.conn.execute("INSERT INTO ship_marks (ledger, watermark, shipped_at) VALUES (?, ?, ?) "
                        # never backwards: two shippers of one database (a timer and the
                        # daemon) may finish out of order; rows between are sent again, harmlessly
                        "ON CONFLICT (ledger) DO UPDATE SET watermark = MAX(watermark, excluded.watermark), "
                        "shipped_at = excluded.shipped_at", (key, value, store.now_iso()))


_SELECT_JOBS = (f"SELECT {', '.join(chr(34) + c + chr(34) for c in ledger_mod.JOB_FIELDS)}, changed FROM jobs "
                f"WHERE changed > ? AND job_id != {naming.SELFTEST_JOB_ID} ORDER BY changed LIMIT ?")
_SELECT_TRAFFIC = (f"SELECT t.job_id, t.node, t.restart, t.class, {', '.join('t.' + f for f in FIELDS)} "
                   "FROM traffic t JOIN jobs j ON j.job_id = t.job_id AND j.node = t.node AND j.restart = t.restart "
                   f"WHERE j.changed > ? AND j.changed <= ? AND j.job_id != {naming.SELFTEST_JOB_ID}")


def _batch(db: sqlite_utils.Database, after: int, limit: int) -> tuple[list[tuple], list[tuple], int]:
    """The next rows above `after` (at most `limit`), their traffic, and the highest change
    number among them; read in one snapshot, so traffic and rows agree."""
    conn = db.conn
    with store._sql_errors():
        conn.execute("BEGIN")
        try:
            jobs = conn.execute(_SELECT_JOBS, (after, limit)).fetchall()
            top = jobs[-1][-1] if jobs else after
            traffic = conn.execute(_SELECT_TRAFFIC, (after, top)).fetchall() if jobs else []
        finally:
            conn.execute("COMMIT")
    return [j[:-1] for j in jobs], traffic, top


def ship(node_db: Path, cfg: LedgerConfig, led: ledger_mod.Ledger | None = None,
         max_batches: int | None = None, rollups: bool | None = None) -> Shipped:
    """Send every row of the node database that changed since the last run to the ledger.

    Each batch is one ledger transaction; the watermark moves only after it has committed. A
    crash or an outage between the two sends the batch again, which changes nothing (absolute
    values, keyed rows). Memory holds one batch (`rollups=False`: without the rollups' upkeep,
    for a benchmark's comparison only). StoreError for the node database,
    LedgerError for the ledger (nothing is lost: the next run resumes at the watermark)."""
    if not node_db.exists():
        raise StoreError(f"database {node_db} does not exist")
    db = store.connect(node_db)  # brings an older node database to the schema with `changed`
    own = led is None
    try:
        if led is None:
            led = ledger_mod.connect(cfg, migrate=True)
        key = mark_key(cfg)
        done = Shipped(watermark=watermark(db, key))
        while max_batches is None or done.batches < max_batches:
            jobs, traffic, top = _batch(db, done.watermark, cfg.batch)
            if not jobs:
                break
            led.upsert(cfg.cluster, jobs, traffic, rollups=rollups)
            _set_watermark(db, key, top)
            done.rows += len(jobs)
            done.batches += 1
            done.watermark = top
        return done
    finally:
        if own and led is not None:
            led.close()
        db.conn.close()

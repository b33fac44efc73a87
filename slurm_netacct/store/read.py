"""Reading node databases for reports: read-only, each file once, rows streamed in key order."""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import StoreError
from ..traffic import FIELDS

Row = tuple[Any, ...]  # see node_rows


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
        raise StoreError(f"database directory {directory}: {exc.strerror}") from None


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


@dataclass(frozen=True)
class RowFilter:
    """What the database itself can select rows by (the rest is judged per merged job)."""

    job_ids: frozenset[int] | None = None
    users: frozenset[str] | None = None
    accounts: frozenset[str] | None = None
    partitions: frozenset[str] | None = None
    id_range: tuple[int, int] | None = None  # job ids from..to


def node_rows(path: Path, sel: RowFilter, classes: list[str]) -> Iterator[Row]:
    """One database's job rows, traffic pivoted per class, ordered by (job id, node, restart).

    Row: job_id, node, restart, user, account, partition, start, end, state, sampled_at, and
    then the four traffic numbers (FIELDS) of each class in `classes` order."""
    conn = _open_ro(path)
    # SUM, not TOTAL: TOTAL is a float, inexact past 2**53 (a property test of the ledger found it)
    cols = [f"COALESCE(SUM(CASE WHEN t.class = '{k}' THEN t.{f} END), 0)" for k in classes for f in FIELDS]
    where: list[str] = []
    params: list[Any] = []
    _in("job_id", sel.job_ids, where, params)
    _in("user", sel.users, where, params)
    _in("account", sel.accounts, where, params)
    _in("partition", sel.partitions, where, params)
    if sel.id_range is not None:
        where.append("j.job_id BETWEEN ? AND ?")
        params.extend(sel.id_range)
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


def job_id_range(paths: Iterable[Path]) -> tuple[int, int] | None:
    """The lowest and the highest job id in any of the databases; None if they hold no job."""
    lo: int | None = None
    hi: int | None = None
    for path in paths:
        conn = _open_ro(path)
        try:
            a, b = conn.execute("SELECT MIN(job_id), MAX(job_id) FROM jobs").fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"database {path}: {exc}") from None
        finally:
            conn.close()
        if a is not None:
            lo = a if lo is None else min(lo, a)
            hi = b if hi is None else max(hi, b)
    return None if lo is None or hi is None else (lo, hi)

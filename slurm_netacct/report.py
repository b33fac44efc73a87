"""Reading node databases and merging their rows into one record per job."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import StoreError

FIELDS = ("in_bytes", "out_bytes", "in_packets", "out_packets")
# When a job's node rows disagree, the most important state wins.
_STATE_RANK = {"running": 0, "lost": 1, "reconciled": 2, "completed": 3}


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

    def as_json(self, per_node: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "job_id": str(self.job_id), "user": self.user, "account": self.account,
            "partition": self.partition, "nodes": self.nodes, "start": self.start,
            "end": self.end, "state": self.state, "traffic": self.traffic,
        }
        if per_node:
            out["per_node"] = self.per_node
        return out


def _open_ro(path: Path) -> sqlite3.Connection:
    if not path.exists():
        raise StoreError(f"database {path} does not exist")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        conn.execute("SELECT 1 FROM jobs LIMIT 1")
    except sqlite3.Error as exc:
        raise StoreError(f"database {path}: {exc}") from None
    return conn


def _add(dst: dict[str, int], src: dict[str, int]) -> None:
    for k in FIELDS:
        dst[k] = dst.get(k, 0) + int(src.get(k) or 0)


def load(paths: Iterable[Path], job_ids: set[int] | None = None) -> list[JobRecord]:
    """Merge the given node databases into job records, ordered by job id.

    The same database named twice (or two copies of one node's rows) is counted once:
    rows are keyed by (job id, node, restart).
    """
    seen_files: set[tuple[int, int]] = set()
    rows: dict[tuple[int, str, int], dict[str, Any]] = {}
    traffic: dict[tuple[int, str, int], dict[str, dict[str, int]]] = {}
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise StoreError(f"database {path}: {exc.strerror}") from None
        if (st.st_dev, st.st_ino) in seen_files:
            continue
        seen_files.add((st.st_dev, st.st_ino))
        conn = _open_ro(path)
        try:
            where, params = "", []
            if job_ids:
                where = f" WHERE job_id IN ({','.join('?' * len(job_ids))})"
                params = sorted(job_ids)
            cur = conn.execute(f"SELECT * FROM jobs{where}", params)
            cols = [c[0] for c in cur.description]
            for r in cur:
                row = dict(zip(cols, r))
                rows.setdefault((row["job_id"], row["node"], row["restart"]), row)
            cur = conn.execute(f"SELECT * FROM traffic{where}", params)
            cols = [c[0] for c in cur.description]
            for r in cur:
                t = dict(zip(cols, r))
                key = (t["job_id"], t["node"], t["restart"])
                traffic.setdefault(key, {}).setdefault(t["class"], {k: int(t[k]) for k in FIELDS})
        except sqlite3.Error as exc:
            raise StoreError(f"database {path}: {exc}") from None
        finally:
            conn.close()

    jobs: dict[int, JobRecord] = {}
    for key in sorted(rows):
        row = rows[key]
        job_id, node, _restart = key
        rec = jobs.get(job_id)
        if rec is None:
            rec = jobs[job_id] = JobRecord(job_id=job_id, state=row["state"])
        for attr in ("user", "account", "partition"):
            if getattr(rec, attr) is None and row.get(attr) is not None:
                setattr(rec, attr, row[attr])
        if node not in rec.nodes:
            rec.nodes.append(node)
        if row.get("start") and (rec.start is None or row["start"] < rec.start):
            rec.start = row["start"]
        if _STATE_RANK.get(row["state"], 9) < _STATE_RANK.get(rec.state, 9):
            rec.state = row["state"]
        if row.get("end") and (rec.end is None or row["end"] > rec.end):
            rec.end = row["end"]
        for klass, values in traffic.get(key, {}).items():
            _add(rec.traffic.setdefault(klass, {}), values)
            _add(rec.per_node.setdefault(node, {}).setdefault(klass, {}), values)
    for rec in jobs.values():
        rec.nodes.sort()
        if rec.state == "running":
            rec.end = None
    return [jobs[j] for j in sorted(jobs)]


def human_bytes(n: int) -> str:
    """Bytes in binary units as sacct prints them: 512, 1.50K, 3.20M, ..."""
    value = float(n)
    for unit in ("", "K", "M", "G", "T", "P"):
        if value < 1024 or unit == "P":
            return f"{n}" if unit == "" else f"{value:.2f}{unit}"
        value /= 1024
    return str(n)  # pragma: no cover


def table(records: list[JobRecord], classes: list[str]) -> str:
    """A readable fixed-width table, one line per job, bytes in/out per class."""
    head = ["JobID", "User", "Account", "Nodes", "State"]
    for k in classes:
        head += [f"{k.upper()}-In", f"{k.upper()}-Out"]
    lines = [head]
    for r in records:
        line = [str(r.job_id), r.user or "", r.account or "", ",".join(r.nodes), r.state]
        for k in classes:
            t = r.traffic.get(k, {})
            line += [human_bytes(t.get("in_bytes", 0)), human_bytes(t.get("out_bytes", 0))]
        lines.append(line)
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = [" ".join(c.rjust(w) if i >= 5 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
           for row in lines]
    out.insert(1, " ".join("-" * w for w in widths))
    return "\n".join(out)

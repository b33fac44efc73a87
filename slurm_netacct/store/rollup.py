"""The ledger's monthly rollups: per-job attributes in SQL, and the summary rows kept exactly in step with the job rows.

A job (cluster, job id: every node and run) has the attributes the report gives it (the first
non-null user, account and partition in (node, restart) order, the earliest start, the latest
end, the state shown first). A finished job with an end is billed in the month of its end; a
running job is not billed (its group holds the month of its start). The rollup holds, per group of jobs that share (cluster, kind,
month, user, account, partition, flags), the number of jobs, bounds of their starts and ends,
and (billed groups) their traffic per class. `rollup_jobs` remembers which group each job is
in, so a change to a job's rows moves it from its old group to its new one: the old
contribution is subtracted and the new one added, in the transaction that writes the rows
(exactly once: the delta is taken against the stored absolute values, and a row lock on the
job in `rollup_jobs` serializes two shippers of the same job). The bounds only ever widen (a
job that leaves a group does not narrow them), which is safe: the report reads a group only
when its bounds put every job of it inside the window, or every one outside.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from ..states import SHOWN_FIRST
from ..traffic import FIELDS

_SEP = "CHAR(0)"
_TEXT = "CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin"

BILLED, RUNNING = 1, 2  # rollup kinds (0: neither, e.g. no end yet; such a job is in no group)
# Flag bits of a group: its jobs' rows disagree on user / account / partition (a report that
# selects rows by one of them cannot use the group), or its jobs have no start.
MIXED_USER, MIXED_ACCOUNT, MIXED_PARTITION, NO_START = 1, 2, 4, 8


def first(col: str) -> str:
    """The first non-null value of a column in (node, restart) order, per job."""
    return (f"SUBSTRING_INDEX(MIN(CASE WHEN j.{col} IS NOT NULL THEN CONCAT(j.node, {_SEP}, "
            f"LPAD(j.restart, 10, '0'), {_SEP}, j.{col}) END), {_SEP}, -1)")


RANK = ("CASE j.state " + " ".join(f"WHEN '{s.value}' THEN {r}" for s, r in SHOWN_FIRST.items())
        + " ELSE 9 END")
# The state shown first (lowest rank; the first row of that rank in (node, restart) order).
STATE = (f"SUBSTRING_INDEX(MIN(CONCAT({RANK}, {_SEP}, j.node, {_SEP}, LPAD(j.restart, 10, '0'), "
         f"{_SEP}, j.state)), {_SEP}, -1)")
START = "MIN(NULLIF(j.start, ''))"
END_ANY = "MAX(NULLIF(j.`end`, ''))"
JOB_ATTRS = (f"j.job_id AS job_id, {STATE} AS jstate, {START} AS jstart, "
             f"{END_ANY} AS jend_any, {first('user')} AS juser, "
             f"{first('account')} AS jaccount, {first('`partition`')} AS jpartition")

# One job's rollup contribution, as expressions over its rows (GROUP BY j.cluster, j.job_id).
_KIND = f"(CASE WHEN {STATE} = 'running' THEN {RUNNING} WHEN {END_ANY} IS NOT NULL THEN {BILLED} ELSE 0 END)"
# The month of a billed job's end; of a running job's start (so that a group of running jobs
# lies on one side of a window that ends with a month: a report counts those it leaves out).
_MONTH = (f"(CASE {_KIND} WHEN {BILLED} THEN SUBSTRING({END_ANY}, 1, 7) "
          f"WHEN {RUNNING} THEN COALESCE(SUBSTRING({START}, 1, 7), '') ELSE '' END)")
_ATTR = {c: f"COALESCE({first(q)}, '')" for c, q in (("user", "user"), ("account", "account"),
                                                      ("partition", "`partition`"))}


def _mixed(q: str, bit: int) -> str:
    return f"{bit} * (MIN(COALESCE(j.{q}, '')) <> MAX(COALESCE(j.{q}, '')))"


_FLAGS = (f"({_mixed('user', MIXED_USER)} + {_mixed('account', MIXED_ACCOUNT)} + "
          f"{_mixed('`partition`', MIXED_PARTITION)} + {NO_START} * ({START} IS NULL))")
_GKEY = (f"IF({_KIND} = 0, NULL, UNHEX(SHA1(CONCAT_WS(CHAR(0 USING utf8mb4), j.cluster, {_KIND}, {_MONTH}, "
         f"{_ATTR['user']}, {_ATTR['account']}, {_ATTR['partition']}, {_FLAGS}))))")
CONTRIB_COLS = ("job_id", "kind", "gkey", "month", "user", "account", "partition", "flags", "jstart", "jend")
_CONTRIB = (f"SELECT j.cluster, j.job_id, {_KIND}, {_GKEY}, {_MONTH}, {_ATTR['user']}, {_ATTR['account']}, "
            f"{_ATTR['partition']}, {_FLAGS}, {START}, {END_ANY} FROM jobs j")

MIGRATION = [
    "CREATE TABLE IF NOT EXISTS rollup_jobs ("
    " cluster VARCHAR(64) NOT NULL, job_id BIGINT UNSIGNED NOT NULL, kind TINYINT NOT NULL DEFAULT 0,"
    " gkey BINARY(20) NULL, PRIMARY KEY (cluster, job_id)"
    f") ENGINE=InnoDB {_TEXT}",
    "CREATE TABLE IF NOT EXISTS rollup ("
    " gkey BINARY(20) NOT NULL, cluster VARCHAR(64) NOT NULL, kind TINYINT NOT NULL, month VARCHAR(7) NOT NULL,"
    " user VARCHAR(255) NOT NULL, account VARCHAR(255) NOT NULL, `partition` VARCHAR(255) NOT NULL,"
    " flags TINYINT NOT NULL, jobs BIGINT NOT NULL,"
    " lo_end VARCHAR(32) NULL, hi_end VARCHAR(32) NULL, lo_start VARCHAR(32) NULL, hi_start VARCHAR(32) NULL,"
    " PRIMARY KEY (gkey), KEY rollup_by_cluster (cluster, kind, month)"
    f") ENGINE=InnoDB {_TEXT}",
    "CREATE TABLE IF NOT EXISTS rollup_traffic ("
    " gkey BINARY(20) NOT NULL, class VARCHAR(16) NOT NULL,"
    + "".join(f" {f} DECIMAL(40, 0) NOT NULL," for f in FIELDS)
    + f" PRIMARY KEY (gkey, class)) ENGINE=InnoDB {_TEXT}",
    "CREATE TABLE IF NOT EXISTS rollup_classes ("
    " cluster VARCHAR(64) NOT NULL, class VARCHAR(16) NOT NULL, PRIMARY KEY (cluster, class)"
    f") ENGINE=InnoDB {_TEXT}",
]

_WIDEN = ", ".join(f"{c} = COALESCE({fn}({c}, VALUES({c})), {c}, VALUES({c}))"
                   for c, fn in (("lo_end", "LEAST"), ("hi_end", "GREATEST"), ("lo_start", "LEAST"),
                                 ("hi_start", "GREATEST")))
_UPSERT_GROUP = ("INSERT INTO rollup (gkey, cluster, kind, month, user, account, `partition`, flags, jobs, "
                 "lo_end, hi_end, lo_start, hi_start) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                 f"ON DUPLICATE KEY UPDATE jobs = jobs + VALUES(jobs), {_WIDEN}")
_UPSERT_TRAFFIC = (f"INSERT INTO rollup_traffic (gkey, class, {', '.join(FIELDS)}) VALUES "
                   f"({', '.join(['%s'] * (2 + len(FIELDS)))}) ON DUPLICATE KEY UPDATE "
                   + ", ".join(f"{f} = {f} + VALUES({f})" for f in FIELDS))


def build(cur: Any, cluster: str | None = None) -> None:
    """Fill the (empty) rollup tables from every job row of the ledger (or of one cluster that
    has none yet): at the migration that makes them. The caller runs it in one REPEATABLE READ
    transaction with the version it records: the scans lock the rows they read, so no shipper
    writes a row between them, and a crash leaves nothing half-made (the migration runs again)."""
    where, t_where, args = ("WHERE j.cluster = %s", "AND t.cluster = %s", (cluster,)) if cluster else ("", "", ())
    cur.execute(f"INSERT INTO rollup_jobs (cluster, job_id, kind, gkey) SELECT j.cluster, j.job_id, {_KIND}, "
                f"{_GKEY} FROM jobs j {where} GROUP BY j.cluster, j.job_id", args)
    cur.execute("INSERT INTO rollup (gkey, cluster, kind, month, user, account, `partition`, flags, jobs, "
                f"lo_end, hi_end, lo_start, hi_start) SELECT {_GKEY} AS g, j.cluster, {_KIND} AS k, {_MONTH}, "
                f"{_ATTR['user']}, {_ATTR['account']}, {_ATTR['partition']}, {_FLAGS}, 1, {END_ANY}, {END_ANY}, "
                f"{START}, {START} FROM jobs j {where} GROUP BY j.cluster, j.job_id HAVING k > 0 "
                f"ON DUPLICATE KEY UPDATE jobs = jobs + 1, {_WIDEN}", args)
    cur.execute(f"INSERT INTO rollup_traffic (gkey, class, {', '.join(FIELDS)}) SELECT rj.gkey, t.class, "
                + ", ".join(f"SUM(t.{f})" for f in FIELDS)
                + f" FROM rollup_jobs rj JOIN traffic t ON t.cluster = rj.cluster AND t.job_id = rj.job_id "
                f"WHERE rj.kind = {BILLED} {t_where} GROUP BY rj.gkey, t.class", args)
    cur.execute(f"INSERT IGNORE INTO rollup_classes (cluster, class) SELECT DISTINCT t.cluster, t.class "
                f"FROM traffic t WHERE TRUE {t_where}", args)


def _in(ids: Sequence[int]) -> str:
    return f"({', '.join(['%s'] * len(ids))})"


def _traffic_of(cur: Any, cluster: str, ids: list[int]) -> dict[int, dict[str, list[int]]]:
    """Each job's traffic per class, summed over its rows."""
    out: dict[int, dict[str, list[int]]] = defaultdict(dict)
    if ids:
        cur.execute(f"SELECT job_id, class, {', '.join(f'SUM({f})' for f in FIELDS)} FROM traffic "
                    f"WHERE cluster = %s AND job_id IN {_in(ids)} GROUP BY job_id, class", (cluster, *ids))
        for job_id, cls, *vals in cur.fetchall():
            out[int(job_id)][str(cls)] = [int(v) for v in vals]
    return out


class Maintenance:
    """The rollup's side of one upsert transaction: `lock` before the rows are written (the jobs'
    current groups and traffic), `apply` after (their new groups: the differences go in)."""

    def __init__(self, cur: Any, cluster: str, job_ids: set[int]) -> None:
        self.cur = cur
        self.cluster = cluster
        self.ids = sorted(job_ids)
        self.old: dict[int, tuple[int, bytes | None]] = {}
        self.old_traffic: dict[int, dict[str, list[int]]] = {}

    def lock(self) -> None:
        """Lock the jobs' rollup rows (made if new) in job-id order, then read their groups."""
        if not self.ids:
            return
        cur = self.cur
        # ON DUPLICATE KEY UPDATE takes an exclusive lock on an existing row (INSERT IGNORE would
        # take a shared one, and two shippers upgrading it would deadlock).
        cur.executemany("INSERT INTO rollup_jobs (cluster, job_id) VALUES (%s, %s) "
                        "ON DUPLICATE KEY UPDATE job_id = job_id", [(self.cluster, i) for i in self.ids])
        cur.execute(f"SELECT job_id, kind, gkey FROM rollup_jobs WHERE cluster = %s AND job_id IN {_in(self.ids)}",
                    (self.cluster, *self.ids))
        self.old = {int(j): (int(k), g) for j, k, g in cur.fetchall()}
        self.old_traffic = _traffic_of(cur, self.cluster, [j for j, (k, _) in self.old.items() if k == BILLED])

    def apply(self, classes: set[str]) -> None:
        """Move each job from its old group to its new one (jobs, bounds, traffic)."""
        if not self.ids:
            return
        cur = self.cur
        if classes:
            cur.executemany("INSERT IGNORE INTO rollup_classes (cluster, class) VALUES (%s, %s)",
                            [(self.cluster, c) for c in sorted(classes)])
        cur.execute(f"{_CONTRIB} WHERE j.cluster = %s AND j.job_id IN {_in(self.ids)} GROUP BY j.cluster, j.job_id",
                    (self.cluster, *self.ids))
        new = {int(r[1]): dict(zip(CONTRIB_COLS, r[1:])) for r in cur.fetchall()}
        new_traffic = _traffic_of(cur, self.cluster, [j for j, c in new.items() if c["kind"] == BILLED])
        groups: dict[bytes, list[Any]] = {}
        traffic: dict[tuple[bytes, str], list[int]] = defaultdict(lambda: [0] * len(FIELDS))
        moved = []
        for job_id in self.ids:
            old_kind, old_key = self.old.get(job_id, (0, None))
            c = new.get(job_id)
            kind, key = (int(c["kind"]), c["gkey"]) if c else (0, None)
            if old_key is not None:
                if old_key != key:
                    groups.setdefault(old_key, [old_key, self.cluster, old_kind, None, "", "", "", 0, 0,
                                                None, None, None, None])[8] -= 1  # a row that exists
                if old_kind == BILLED:
                    for cls, vals in self.old_traffic.get(job_id, {}).items():
                        acc = traffic[(old_key, cls)]
                        for i, v in enumerate(vals):
                            acc[i] -= v
            if key is not None and c is not None:
                g = groups.get(key)
                if g is None or g[3] is None:  # a fresh entry, or one made by a job leaving: the full key
                    g = groups[key] = [key, self.cluster, kind, c["month"], c["user"], c["account"],
                                       c["partition"], int(c["flags"]), g[8] if g else 0, None, None, None, None]
                if old_key != key:
                    g[8] += 1
                for i, v, fn in ((9, c["jend"], min), (10, c["jend"], max), (11, c["jstart"], min),
                                 (12, c["jstart"], max)):
                    if v is not None:
                        g[i] = v if g[i] is None else fn(g[i], v)
                if kind == BILLED:
                    for cls, vals in new_traffic.get(job_id, {}).items():
                        acc = traffic[(key, cls)]
                        for i, v in enumerate(vals):
                            acc[i] += v
            if (old_kind, old_key) != (kind, key):
                moved.append((self.cluster, job_id, kind, key))
        rows = [[*g[:3], g[3] or "", *g[4:]] for _, g in sorted(groups.items())
                if g[8] != 0 or any(v is not None for v in g[9:])]
        if rows:
            cur.executemany(_UPSERT_GROUP, rows)
        trows = [(k, cls, *v) for (k, cls), v in sorted(traffic.items()) if any(v)]
        if trows:
            cur.executemany(_UPSERT_TRAFFIC, trows)
        if moved:
            cur.executemany("INSERT INTO rollup_jobs (cluster, job_id, kind, gkey) VALUES (%s, %s, %s, %s) "
                            "ON DUPLICATE KEY UPDATE kind = VALUES(kind), gkey = VALUES(gkey)", moved)

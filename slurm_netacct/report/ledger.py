"""Reports from the cluster ledger: selection and aggregation done by MariaDB, in parametrized SQL.

The SQL is written to give what the node-database path (records.py, aggregate.py) gives for the
same rows, exactly: a job's attributes are those `records._build` takes (the first non-null
user, account and partition in (node, restart) order; the earliest start; the latest end;
the state shown first), and `records.Query` is translated clause by clause. Nothing a user
types becomes SQL text: values are parameters, and names (group keys) come from fixed tables.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..states import SHOWN_FIRST, State
from ..store.ledger import Ledger
from ..traffic import FIELDS
from .aggregate import Group
from .rates import Rates
from .records import JobRecord, Notes, Query, jobs_from_rows

_SEP = "CHAR(0)"


def _first(col: str) -> str:
    """The first non-null value of a column in (node, restart) order, per job."""
    return (f"SUBSTRING_INDEX(MIN(CASE WHEN j.{col} IS NOT NULL THEN CONCAT(j.node, {_SEP}, "
            f"LPAD(j.restart, 10, '0'), {_SEP}, j.{col}) END), {_SEP}, -1)")


_RANK = ("CASE j.state " + " ".join(f"WHEN '{s.value}' THEN {r}" for s, r in SHOWN_FIRST.items())
         + " ELSE 9 END")
# The state shown first (lowest rank; the first row of that rank in (node, restart) order).
_STATE = (f"SUBSTRING_INDEX(MIN(CONCAT({_RANK}, {_SEP}, j.node, {_SEP}, LPAD(j.restart, 10, '0'), "
          f"{_SEP}, j.state)), {_SEP}, -1)")
_JOB_ATTRS = (f"j.job_id AS job_id, {_STATE} AS jstate, MIN(NULLIF(j.start, '')) AS jstart, "
              f"MAX(NULLIF(j.`end`, '')) AS jend_any, {_first('user')} AS juser, "
              f"{_first('account')} AS jaccount, {_first('`partition`')} AS jpartition")


def _row_where(cluster: str, query: Query) -> tuple[str, list[Any]]:
    """What the node databases select rows by (records.Query.rows), for table alias j."""
    where = ["j.cluster = %s"]
    params: list[Any] = [cluster]
    for col, values in (("job_id", query.job_ids), ("user", query.users), ("account", query.accounts),
                        ("`partition`", query.partitions)):
        if values is not None:
            if not values:  # nothing can match (SQL has no empty IN list)
                where.append("FALSE")
                continue
            where.append(f"j.{col} IN ({', '.join(['%s'] * len(values))})")
            params.extend(sorted(values))
    if query.id_range is not None:
        where.append("j.job_id BETWEEN %s AND %s")
        params.extend(query.id_range)
    return " AND ".join(where), params


class _Cond:
    """records.Query's job-level tests over the columns of the per-job table J."""

    def __init__(self, query: Query) -> None:
        self.q = query
        self.params: list[Any] = []

    def p(self, value: Any) -> str:
        self.params.append(value)
        return "%s"

    @property
    def end(self) -> str:  # a running job has no end (records._build)
        return f"(CASE WHEN J.jstate = '{State.RUNNING.value}' THEN NULL ELSE J.jend_any END)"

    def ran_in_window(self) -> str:
        parts = []
        if self.q.end is not None:
            parts.append(f"(J.jstart IS NOT NULL AND J.jstart <= {self.p(self.q.end)})")
        if self.q.start is not None:
            parts.append(f"({self.end} IS NULL OR {self.end} >= {self.p(self.q.start)})")
        return "(" + " AND ".join(parts) + ")" if parts else "TRUE"

    def ended_in_window(self) -> str:
        parts = [f"{self.end} IS NOT NULL"]
        if self.q.start is not None:
            parts.append(f"{self.end} >= {self.p(self.q.start)}")
        if self.q.end is not None:
            parts.append(f"{self.end} <= {self.p(self.q.end)}")
        return "(" + " AND ".join(parts) + ")"

    def listed(self) -> str:
        parts = []
        if self.q.nodes is not None:
            parts.append("J.on_nodes > 0")
        if self.q.states is None:
            parts.append(self.ran_in_window())
        else:
            ors = []
            for s in sorted(self.q.states):
                if s == State.RUNNING:
                    ors.append(f"(J.jstart IS NOT NULL AND {self.ran_in_window()})")
                else:
                    ors.append(f"(J.jstate = {self.p(s)} AND {self.ended_in_window()})")
            parts.append("(" + " OR ".join(ors) + ")" if ors else "FALSE")
        return " AND ".join(parts) if parts else "TRUE"

    def wants(self) -> str:
        if self.q.billing:
            return (f"J.jstate <> '{State.RUNNING.value}' AND {self.ended_in_window()} AND {self.listed()}")
        return self.listed()

    def unbilled(self) -> str:
        return f"J.jstate = '{State.RUNNING.value}' AND {self.listed()}"


def _jobs_table(cluster: str, query: Query) -> tuple[str, list[Any]]:
    """SQL of the per-job table J (one row per job: its attributes from its selected rows)."""
    where, params = _row_where(cluster, query)
    on_nodes = ""
    if query.nodes is not None:
        if query.nodes:
            on_nodes = f", SUM(j.node IN ({', '.join(['%s'] * len(query.nodes))})) AS on_nodes"
            params = [*sorted(query.nodes), *params]
        else:
            on_nodes = ", 0 AS on_nodes"
    return (f"SELECT {_JOB_ATTRS}{on_nodes} FROM jobs j WHERE {where} GROUP BY j.job_id", params)


def _pivot(classes: list[str]) -> tuple[str, list[Any]]:
    """The traffic of each class and field as columns c0, c1, ... (4 per class, FIELDS order)."""
    cols = []
    params: list[Any] = []
    for k in classes:
        for f in FIELDS:
            cols.append(f", COALESCE(SUM(CASE WHEN t.class = %s THEN t.{f} END), 0) AS c{len(cols)}")
            params.append(k)
    return "".join(cols), params


_JOIN_TRAFFIC = ("LEFT JOIN traffic t ON t.cluster = j.cluster AND t.job_id = j.job_id AND t.node = j.node "
                 "AND t.restart = j.restart")


class LedgerSource:
    """One cluster of a ledger, read through its report account."""

    def __init__(self, led: Ledger, cluster: str) -> None:
        self.led = led
        self.cluster = cluster

    def classes(self) -> list[str]:
        """Every traffic class the cluster's rows hold, sorted."""
        return sorted(str(k) for (k,) in self.led.query(
            "SELECT DISTINCT class FROM traffic WHERE cluster = %s", (self.cluster,)))

    def others_jobs(self, job_ids: frozenset[int], user: str) -> list[int]:
        """Those of `job_ids` that the ledger holds for someone other than `user`, sorted."""
        ids = sorted(job_ids)
        found: set[int] = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            found.update(int(j) for (j,) in self.led.query(
                f"SELECT DISTINCT job_id FROM jobs WHERE cluster = %s AND job_id IN ({', '.join(['%s'] * len(chunk))}) "
                "AND NOT (user <=> %s)", (self.cluster, *chunk, user)))
        return sorted(found)

    def _selected_jobs(self, query: Query, cond: _Cond) -> tuple[str, list[Any]]:
        jt, jparams = _jobs_table(self.cluster, query)
        sql = f"SELECT J.job_id FROM ({jt}) J WHERE {cond.wants()}"
        return sql, [*jparams, *cond.params]

    def iter_jobs(self, query: Query, classes: list[str], notes: Notes) -> Iterator[JobRecord]:
        """The jobs the query wants, in job-id order, streamed (the server selects; this
        process merges each job's rows, as for node databases)."""
        pivot, pparams = _pivot(classes)
        where, wparams = _row_where(self.cluster, query)
        sel, sparams = self._selected_jobs(query, _Cond(query))
        sql = (f"SELECT j.job_id, j.node, j.restart, j.user, j.account, j.`partition`, j.start, j.`end`, "
               f"j.state, j.sampled_at{pivot} FROM jobs j {_JOIN_TRAFFIC} "
               f"WHERE {where} AND j.job_id IN ({sel}) "
               "GROUP BY j.job_id, j.node, j.restart ORDER BY j.job_id, j.node, j.restart")
        rows = self.led.stream(sql, [*pparams, *wparams, *sparams])
        if query.billing:
            notes.unbilled_running += self.unbilled(query)
        return jobs_from_rows(rows, query, classes, Notes())

    def unbilled(self, query: Query) -> int:
        """Running jobs a billing query selects but leaves out (no end yet)."""
        cond = _Cond(query)
        jt, jparams = _jobs_table(self.cluster, query)
        sql = f"SELECT COUNT(*) FROM ({jt}) J WHERE {cond.unbilled()}"
        return int(self.led.query(sql, [*jparams, *cond.params])[0][0])

    def aggregate(self, query: Query, classes: list[str], by: tuple[str, ...], rates: Rates | None,
                  notes: Notes) -> list[Group]:
        """Totals per group, computed by the server (aggregate.aggregate's result)."""
        cond = _Cond(query)
        jt, jparams = _jobs_table(self.cluster, query)
        pivot, pparams = _pivot(classes)
        where, wparams = _row_where(self.cluster, query)
        per_node = "node" in by
        t_keys = "j.job_id, j.node" if per_node else "j.job_id"
        traffic = (f"SELECT {t_keys}{pivot} FROM jobs j {_JOIN_TRAFFIC} "
                   f"WHERE {where} GROUP BY {t_keys}")
        keys = []
        for b in by:
            if b == "node":
                keys.append("T.node")
            elif b == "day":
                keys.append(f"SUBSTRING({cond.end}, 1, 10)")
            elif b == "month":
                keys.append(f"SUBSTRING({cond.end}, 1, 7)")
            else:
                keys.append(f"COALESCE(NULLIF(J.j{b}, ''), '(none)')")
        n = 4 * len(classes)
        tcols = [f"T.c{i}" for i in range(n)]
        sums = "".join(f", SUM({c})" for c in tcols)
        key_list = ", ".join(f"{k} AS k{i}" for i, k in enumerate(keys))
        group_list = ", ".join(f"k{i}" for i in range(len(keys)))
        where_j = cond.wants()
        sql = (f"SELECT {key_list}, COUNT(*){sums} FROM ({jt}) J JOIN ({traffic}) T ON T.job_id = J.job_id "
               f"WHERE {where_j} GROUP BY {group_list}")
        # Parameters in the order their %s appear: the key expressions (none), J's, T's, the WHERE's.
        params = [*jparams, *pparams, *wparams, *cond.params]
        groups = []
        for row in self.led.query(sql, params):
            g = Group(tuple(str(k) for k in row[:len(keys)]), classes)
            g.jobs = int(row[len(keys)])
            g.vec = [int(v) for v in row[len(keys) + 1:]]
            if rates is not None:
                g.cost = rates.cost(g.traffic)
            groups.append(g)
        if query.billing:
            notes.unbilled_running += self.unbilled(query)
        groups.sort(key=lambda g: g.key)
        return groups

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

from ..states import State
from ..store import rollup
from ..store.ledger import Ledger
from ..store.rollup import JOB_ATTRS as _JOB_ATTRS
from ..traffic import FIELDS
from .aggregate import Group
from .rates import Rates
from .records import JobRecord, Notes, Query, jobs_from_rows

_ROLLUP_KEYS = {"user": "user", "account": "account", "partition": "`partition`", "month": "month"}


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
        """Every traffic class the cluster's rows hold, sorted (kept with the rollups)."""
        return sorted(str(k) for (k,) in self.led.query(
            "SELECT class FROM rollup_classes WHERE cluster = %s", (self.cluster,)))

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
        """Totals per group (aggregate.aggregate's result): from the rollups when they can
        answer the query exactly, else summed by the server from the job rows."""
        groups = self.aggregate_rollup(query, classes, by, rates, notes)
        if groups is None:
            groups = self.aggregate_rows(query, classes, by, rates, notes)
        return groups

    def aggregate_rollup(self, query: Query, classes: list[str], by: tuple[str, ...], rates: Rates | None,
                         notes: Notes) -> list[Group] | None:
        """Totals per group from the rollups; None if they cannot answer the query exactly: a
        key they do not hold (node, day), a selection of jobs or nodes or states, a window
        that cuts through a group (a partial month), or a selection by user, account or
        partition while some job's rows disagree on it."""
        if (not query.billing or any(b not in _ROLLUP_KEYS for b in by) or query.job_ids is not None
                or query.nodes is not None or query.states is not None or query.id_range is not None):
            return None
        # Named parameters: %(s)s and %(e)s the window, %(pN)s the picked names.
        params: dict[str, Any] = {"cluster": self.cluster, "s": query.start, "e": query.end}
        mask = 0
        picks = []
        for col, values, bit in (("user", query.users, rollup.MIXED_USER),
                                 ("account", query.accounts, rollup.MIXED_ACCOUNT),
                                 ("`partition`", query.partitions, rollup.MIXED_PARTITION)):
            if values is None:
                continue
            mask |= bit
            names = []
            for v in sorted(values):
                names.append(f"%(p{len(params)})s")
                params[f"p{len(params)}"] = v
            picks.append(f"r.{col} IN ({', '.join(names)})" if names else "FALSE")
        picked = " AND ".join(picks) or "TRUE"
        has_s, has_e = query.start is not None, query.end is not None
        no_start = f"(r.flags & {rollup.NO_START}) <> 0"
        # A group is read only if every job of it is inside the window, or every one outside
        # (its bounds: see store/rollup.py); a billed job is inside if it ended in the window
        # and started before its end (-E), a running one if it started before -E.
        billed_in = " AND ".join(["TRUE"] + (["r.lo_end >= %(s)s"] if has_s else [])
                                 + (["r.hi_end <= %(e)s", f"NOT {no_start}", "r.hi_start <= %(e)s"] if has_e else []))
        billed_out = " OR ".join(["FALSE"] + (["r.hi_end < %(s)s"] if has_s else [])
                                 + (["r.lo_end > %(e)s", no_start, "r.lo_start > %(e)s"] if has_e else []))
        running_in = f"NOT {no_start} AND r.hi_start <= %(e)s" if has_e else "TRUE"
        running_out = f"{no_start} OR r.lo_start > %(e)s" if has_e else "FALSE"
        billed, running = f"r.kind = {rollup.BILLED}", f"r.kind = {rollup.RUNNING}"
        undecided = (f"SELECT COUNT(*) FROM rollup r WHERE r.cluster = %(cluster)s AND r.jobs <> 0 "
                     f"AND ((r.flags & {mask}) <> 0 OR ({picked} AND NOT "
                     f"(({billed} AND (({billed_in}) OR ({billed_out}))) OR ({running} AND (({running_in}) OR ({running_out}))))))")
        if self.led.query(undecided, params)[0][0]:
            return None
        where = f"r.cluster = %(cluster)s AND r.jobs <> 0 AND {picked}"
        unbilled = self.led.query(f"SELECT COALESCE(SUM(r.jobs), 0) FROM rollup r WHERE {where} AND {running} "
                                  f"AND ({running_in})", params)[0][0]
        chosen = f"{where} AND {billed} AND ({billed_in})"
        index = {k: i for i, k in enumerate(classes)}
        width = len(FIELDS)
        out: dict[tuple[str, ...], Group] = {}
        keyof: dict[bytes, tuple[str, ...]] = {}
        cols = ", ".join(f"r.{_ROLLUP_KEYS[b]}" for b in by)
        for gkey, jobs, *keys in self.led.query(f"SELECT r.gkey, r.jobs, {cols} FROM rollup r WHERE {chosen}", params):
            key = tuple(str(k) if b == "month" else (str(k) or "(none)") for b, k in zip(by, keys))
            keyof[gkey] = key
            g = out.get(key) or out.setdefault(key, Group(key, classes))
            g.jobs += int(jobs)
        for gkey, cls, *vals in self.led.query(
                f"SELECT t.gkey, t.class, {', '.join('t.' + f for f in FIELDS)} FROM rollup_traffic t "
                f"JOIN rollup r ON r.gkey = t.gkey WHERE {chosen}", params):
            i = index.get(str(cls))
            if i is None:  # as the rows' pivot: a class not reported is not summed
                continue
            g = out[keyof[gkey]]
            for f, v in enumerate(vals):
                g.vec[i * width + f] += int(v)
        groups = sorted((g for g in out.values() if g.jobs), key=lambda g: g.key)
        if rates is not None:
            for g in groups:
                g.cost = rates.cost(g.traffic)
        notes.unbilled_running += int(unbilled)
        return groups

    def aggregate_rows(self, query: Query, classes: list[str], by: tuple[str, ...], rates: Rates | None,
                       notes: Notes) -> list[Group]:
        """Totals per group, summed by the server from the job rows."""

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

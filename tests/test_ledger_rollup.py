"""The ledger's monthly rollups: a grouped report they answer equals the one summed from the job
rows, and the node-database report, through random records, samples of running jobs, late and
re-shipped records, and a migration of a ledger that already holds rows.

A real mariadbd in a namespace of its own (the fixtures of test_ledger.py).
"""

from __future__ import annotations

import itertools
import random
import shutil
import sqlite3
from collections import defaultdict
from pathlib import Path
from typing import Any

import MySQLdb
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from slurm_netacct import config
from slurm_netacct.errors import LedgerError
from slurm_netacct.report.ledger import LedgerSource
from slurm_netacct.report.rates import load as load_rates
from slurm_netacct.report.records import Notes, Query
from slurm_netacct.store import db as store
from slurm_netacct.store import ledger, rollup, ship
from slurm_netacct.traffic import FIELDS
from test_ledger import (_LCOLS, RATES, SHIP_PW, Env, _new_env, _rows_of, end_all, env,  # noqa: F401
                         journal_rows, net, random_cluster, run_report, server)

pytestmark = pytest.mark.sandbox

KEYS = ("account", "user", "partition", "month")
# Every group-by the rollup can answer: each non-empty subset of the keys, and some in another order.
BY = [c for n in range(1, 5) for c in itertools.combinations(KEYS, n)] + [("month", "account"), ("month", "user", "account")]
MONTHS = [("2026-10-01T00:00:00Z", "2026-10-31T23:59:59Z"), ("2026-11-01T00:00:00Z", "2026-11-30T23:59:59Z"),
          ("2026-10-01T00:00:00Z", "2026-12-31T23:59:59Z")]
WINDOWS: list[tuple[str | None, str | None]] = [(None, None), *MONTHS, ("2026-11-01T00:00:00Z", None),
                                                ("2026-11-15T00:00:00Z", "2026-11-30T23:59:59Z")]
PICKS: list[dict[str, frozenset[str]]] = [{}, {"accounts": frozenset({"phys"})}, {"users": frozenset({"ann", "bob"})},
                                          {"partitions": frozenset({"gpu"})},
                                          {"accounts": frozenset({"phys", "chem"}), "users": frozenset({"ann"})}]


def ledger_rows(e: Env, cluster: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """One cluster's job and traffic rows in the ledger, as the node databases hold them."""
    return _rows_of(e.sql(f"SELECT {', '.join(_LCOLS)} FROM jobs WHERE cluster = '{cluster}'"),
                    e.sql(f"SELECT job_id, node, restart, class, {', '.join(FIELDS)} FROM traffic "
                          f"WHERE cluster = '{cluster}'"))


def _groups(gs: list[Any]) -> list[tuple[Any, ...]]:
    return [(g.key, g.jobs, list(g.vec), g.cost) for g in gs]


def compare(e: Env, cluster: str, rates_path: Path) -> tuple[int, int]:
    """Every group-by, window and selection: the rollup's answer (when it gives one) equals the
    rows'. Returns (answered, asked); asserts that windows of whole months are answered."""
    cfg = config.LedgerConfig(**{**e.cfg().__dict__, "cluster": cluster})
    answered = asked = 0
    with ledger.connect(cfg, report=True) as led:
        src = LedgerSource(led, cluster)
        classes = src.classes() + [k for k in ("lan", "wan", "site") if k not in src.classes()]
        rates = load_rates(rates_path, classes)
        combos = [*itertools.product(BY, WINDOWS, PICKS[:1]), *itertools.product(BY, WINDOWS[1:3], PICKS[1:])]
        for by, (s, end), pick in combos:
            q = Query(start=s, end=end, billing=True, **pick)
            n1, n2 = Notes(), Notes()
            fast = src.aggregate_rollup(q, classes, by, rates, n1)
            slow = src.aggregate_rows(q, classes, by, rates, n2)
            asked += 1
            if fast is not None:
                answered += 1
                assert _groups(fast) == _groups(slow), (by, s, end, pick)
                assert n1.unbilled_running == n2.unbilled_running, (by, s, end, pick)
            elif not pick and (s, end) in [(None, None), *MONTHS]:
                raise AssertionError(f"the rollup did not answer {by} {s} {end}")
        # Selections it must leave to the rows.
        for q, by in ((Query(billing=True, job_ids=frozenset({1})), ("account",)),
                      (Query(billing=True, nodes=frozenset({"n1"})), ("account",)),
                      (Query(billing=True, states=frozenset({"completed"})), ("account",)),
                      (Query(billing=True), ("node",)), (Query(billing=True), ("day",))):
            assert src.aggregate_rollup(q, classes, by, rates, Notes()) is None
    return answered, asked


def check_tables(e: Env, cluster: str) -> None:
    """The rollup tables equal what a rebuild from the job rows gives (bounds: they hold every job)."""
    conn = MySQLdb.connect(unix_socket=str(e.server.socket), user="root", database=e.name, autocommit=True)
    try:  # closed even when an assertion fails: an open reader would hold up DROP DATABASE
        _check_tables(conn.cursor(), cluster)
    finally:
        conn.close()


def _check_tables(cur: Any, cluster: str) -> None:
    cur.execute(f"{rollup._CONTRIB} WHERE j.cluster = %s GROUP BY j.cluster, j.job_id", (cluster,))
    jobs = {int(r[1]): dict(zip(rollup.CONTRIB_COLS, r[1:])) for r in cur.fetchall()}
    want: dict[tuple[Any, ...], int] = defaultdict(int)
    want_t: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0] * len(FIELDS))
    cur.execute(f"SELECT job_id, class, {', '.join(FIELDS)} FROM traffic WHERE cluster = %s", (cluster,))
    per_job = defaultdict(list)
    for job_id, cls, *vals in cur.fetchall():
        per_job[int(job_id)].append((cls, vals))
    for job_id, c in jobs.items():
        if c["kind"]:
            key = (c["kind"], c["month"], c["user"], c["account"], c["partition"], c["flags"])
            want[key] += 1
            if c["kind"] == rollup.BILLED:
                for cls, vals in per_job[job_id]:
                    acc = want_t[(*key, cls)]
                    for i, v in enumerate(vals):
                        acc[i] += int(v)
    cur.execute("SELECT gkey, kind, month, user, account, `partition`, flags, jobs, lo_end, hi_end, lo_start, "
                "hi_start FROM rollup WHERE cluster = %s", (cluster,))
    got = {}
    bounds = {}
    for gkey, *key, n, lo_e, hi_e, lo_s, hi_s in cur.fetchall():
        key = tuple(key)
        bounds[gkey] = (lo_e, hi_e, lo_s, hi_s)
        if n:
            got[key] = n
    assert got == dict(want)
    cur.execute("SELECT r.kind, r.month, r.user, r.account, r.`partition`, r.flags, t.class, "
                f"{', '.join('t.' + f for f in FIELDS)} FROM rollup_traffic t JOIN rollup r ON r.gkey = t.gkey "
                "WHERE r.cluster = %s", (cluster,))
    got_t = {tuple(r[:7]): [int(v) for v in r[7:]] for r in cur.fetchall() if any(r[7:])}
    assert got_t == {k: v for k, v in want_t.items() if any(v)}
    cur.execute("SELECT job_id, kind, gkey FROM rollup_jobs WHERE cluster = %s", (cluster,))
    assigned = {int(j): (k, g) for j, k, g in cur.fetchall()}
    for job_id, c in jobs.items():
        assert assigned[job_id] == (c["kind"], c["gkey"])
        if c["gkey"] is not None:
            lo_e, hi_e, lo_s, hi_s = bounds[c["gkey"]]
            if c["jend"] is not None:
                assert lo_e <= c["jend"] <= hi_e
            if c["jstart"] is not None:
                assert lo_s <= c["jstart"] <= hi_s


# ---------------------------------------------------------------------------------------------
# A property: random node databases changing over several rounds of shipping.

_USERS = ["ann", "bob", "Ann", "ann ", None, ""]
_ACCOUNTS = ["phys", "chem", None, ""]
_PARTS = ["batch", "gpu", None]
_T0 = 1_793_000_000  # 2026-10-26


def _iso(t: int) -> str:
    import time
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _times(rng: random.Random) -> int:
    """A moment from late October to mid December, often at a month's edge."""
    return rng.choice([_T0 + rng.randrange(0, 50 * 86400), 1_793_491_199, 1_793_491_200, 1_796_083_199,
                       1_796_083_200])


class Cluster:
    """Node databases whose rows a test writes directly (as the hooks would, and oddities)."""

    def __init__(self, d: Path, rng: random.Random) -> None:
        self.d = d
        self.rng = rng
        self.rows: dict[tuple[int, str, int], dict[str, Any]] = {}
        self.job_attrs: dict[int, tuple[Any, Any, Any]] = {}
        self.clock = _T0

    def path(self, node: str) -> Path:
        return self.d / f"{node}.db"

    def write(self, row: dict[str, Any], traffic: dict[str, list[int]]) -> None:
        db = store.connect(self.path(row["node"]))
        with store.immediate(db):
            db["jobs"].upsert({**row, "uid": 1, "classes": "lan,wan"}, pk=("job_id", "node", "restart"))
            for k, vals in traffic.items():
                db["traffic"].upsert({"job_id": row["job_id"], "node": row["node"], "restart": row["restart"],
                                      "class": k, **dict(zip(FIELDS, vals))}, pk=("job_id", "node", "restart", "class"))
        db.conn.close()
        self.rows[(row["job_id"], row["node"], row["restart"])] = row

    def traffic(self) -> dict[str, list[int]]:
        rng = self.rng
        return {k: [rng.randrange(0, 2**62) for _ in FIELDS] for k in rng.sample(["lan", "wan", "site"],
                                                                                  rng.choice([0, 1, 2, 2, 3]))}

    def round(self, changes: int) -> None:
        """Jobs start, running jobs get a later sample, some end (each change more final)."""
        rng = self.rng
        for _ in range(changes):
            key = (rng.randint(1, 10), rng.choice(["n1", "n2", "n10"]), rng.choice([0, 0, 0, 1]))
            old = self.rows.get(key)
            self.clock += rng.randrange(1, 4 * 86400)
            if old is None:
                if key[0] not in self.job_attrs or rng.random() < 0.15:  # sometimes rows disagree
                    self.job_attrs[key[0]] = (rng.choice(_USERS), rng.choice(_ACCOUNTS), rng.choice(_PARTS))
                user, account, part = self.job_attrs[key[0]]
                start = _times(rng)
                row = {"job_id": key[0], "node": key[1], "restart": key[2], "user": user, "account": account,
                       "partition": part, "start": _iso(start) if rng.random() > 0.05 else None, "end": None,
                       "state": "running", "sampled_at": None}
                if rng.random() < 0.4:  # a late record: the node ships it finished
                    row.update(state=rng.choice(["completed", "lost", "reconciled"]),
                               end=_iso(start + rng.randrange(0, 20 * 86400)))
            elif old["state"] == "running":
                row = dict(old)
                start = int(old["start"] and _parse(old["start"]) or _T0)
                if rng.random() < 0.5:
                    row["sampled_at"] = _iso(max(start, _parse(old["sampled_at"] or _iso(start))) + rng.randrange(1, 9999))
                else:
                    row.update(state=rng.choice(["completed", "completed", "lost", "reconciled"]),
                               end=_iso(max(start, _parse(old["sampled_at"] or _iso(start))) + rng.randrange(0, 9 * 86400)))
            else:  # a later end (a restored copy of the node's record)
                row = dict(old, end=_iso(_parse(old["end"]) + rng.randrange(1, 5 * 86400)))
            self.write(row, self.traffic())

    def ship(self, cfg: config.LedgerConfig) -> None:
        for p in sorted(self.d.glob("*.db"), key=lambda _: self.rng.random()):
            ship.ship(p, config.LedgerConfig(**{**cfg.__dict__, "batch": self.rng.randint(1, 7)}))


def _parse(text: str) -> int:
    import calendar
    import time
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ"))


_clusters = itertools.count()


@pytest.fixture(scope="module")
def fresh(server: Any, net: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:  # noqa: F811
    tmp = tmp_path_factory.mktemp("rollup")
    e = _new_env(server, net, tmp)
    (tmp / "rates.toml").write_text(RATES)
    yield e
    server.sql(f"DROP DATABASE {e.name}")


# A seed does not shrink into a simpler case: no shrinking phase (a failure names its seed).
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(seed=st.integers(0, 2**32 - 1))
def test_property_rollup_equals_rows_through_changes(fresh: Env, tmp_path_factory: pytest.TempPathFactory,
                                                     seed: int) -> None:
    e = fresh
    rng = random.Random(seed)
    name = f"roll{next(_clusters)}"
    d = tmp_path_factory.mktemp(name)
    c = Cluster(d, rng)
    cfg = config.LedgerConfig(**{**e.cfg().__dict__, "cluster": name})
    snapshots: list[Path] = []
    cfg_file = e.config_file(d / "n1.db")
    c.write({"job_id": 11, "node": "n1", "restart": 0, "user": "ann", "account": "phys", "partition": "batch",
             "start": "2026-11-02T00:00:00Z", "end": "2026-11-03T00:00:00Z", "state": "completed",
             "sampled_at": None}, {k: [1, 2, 3, 4] for k in ("lan", "wan", "site")})  # every class priced
    for step in range(3):
        c.round(rng.randint(3, 25))
        c.ship(cfg)
        if step and rng.random() < 0.6:  # an older copy of a node database ships again, everything
            old = rng.choice(snapshots)
            conn = sqlite3.connect(old)
            conn.execute("DELETE FROM ship_marks")
            conn.commit()
            conn.close()
            ship.ship(old, cfg)
        if rng.random() < 0.4:  # a node database's watermark is lost: every row again
            p = rng.choice(sorted(d.glob("*.db")))
            conn = sqlite3.connect(p)
            conn.execute("DELETE FROM ship_marks")
            conn.commit()
            conn.close()
            ship.ship(p, cfg)
        for p in d.glob("*.db"):
            snap = d.parent / f"{name}-{step}-{p.name}"
            shutil.copy(p, snap)
            snapshots.append(snap)
        assert ledger_rows(e, name) == journal_rows(*sorted(d.glob("*.db")))
        check_tables(e, name)
        compare(e, name, e.tmp / "rates.toml")
        # The command line gives what the node databases give.
        for flags in (["-S", "2026-11-01", "-E", "2026-11-30T23:59:59", "--group-by", "account,month"],
                      ["-S", "2026-10-01", "-E", "2026-12-31T23:59:59", "--group-by", "user,partition,month"],
                      ["-S", "2026-10-01", "-E", "2026-10-31T23:59:59", "--group-by", "account", "-A", "phys"]):
            argv = [*flags, "--rates", str(e.tmp / "rates.toml"), "--json"]
            nodes = run_report([*argv, "--db-dir", str(d)], cfg_file)
            assert run_report([*argv, "--ledger", "-M", name], cfg_file) == nodes, flags


# ---------------------------------------------------------------------------------------------
# The migration that makes the rollups fills them from the rows a ledger already holds.


def test_migration_fills_the_rollups_of_a_ledger_with_rows(env: Env) -> None:  # noqa: F811
    paths = random_cluster(env.tmp, seed=23)
    cfg = env.cfg(batch=50)
    conn = MySQLdb.connect(unix_socket=str(env.server.socket), user="netacct_ship", password=SHIP_PW,
                           database=env.name)
    led = ledger.Ledger(conn, cfg.url)
    assert led.migrate(target=ledger.ROLLUPS_SINCE - 1) == ledger.ROLLUPS_SINCE - 1
    for p in paths:  # nodes of the previous version ship everything
        assert ship.ship(p, cfg, led=led).rows > 0
    assert env.sql("SHOW TABLES LIKE 'rollup%'") == []
    for p in paths[:2]:  # some jobs end meanwhile
        end_all(p, p.stem)
    assert ship.ship(paths[0], cfg).rows > 0  # migrates (the rollups built from the rows), then ships
    # A node of the previous version, in the middle of a run across the migration, is refused
    # (it would write rows the rollups miss); its record waits in its database.
    db = store.connect(paths[2])
    with store.immediate(db):
        db["jobs"].upsert({"job_id": 999, "node": paths[2].stem, "restart": 0, "user": "ann", "account": "phys",
                           "start": "2026-11-02T00:00:00Z", "end": "2026-11-03T00:00:00Z", "state": "completed"},
                          pk=("job_id", "node", "restart"))
    db.conn.close()
    with pytest.raises(LedgerError, match="'upkeep' doesn't have a default value"):
        ship.ship(paths[2], cfg, led=led)
    led.close()
    assert env.sql("SELECT COUNT(*) FROM jobs WHERE job_id = 999") == [["0"]]
    assert env.sql("SELECT MAX(version) FROM netacct_schema") == [[str(ledger.SCHEMA_VERSION)]]
    assert int(env.sql("SELECT COUNT(*) FROM rollup WHERE cluster = 'alpha' AND jobs > 0")[0][0]) > 20
    check_tables(env, "alpha")
    for p in paths[1:]:
        ship.ship(p, cfg)
    assert ledger_rows(env, "alpha") == journal_rows(*paths)
    check_tables(env, "alpha")
    (env.tmp / "rates.toml").write_text(RATES)
    answered, asked = compare(env, "alpha", env.tmp / "rates.toml")
    assert answered >= len(BY) * 4 and asked == len(BY) * 14  # whole months: always answered
    cfg_file = env.config_file(paths[0])
    for flags in (["--group-by", "account,month"], ["--group-by", "month,user"], ["--group-by", "partition"]):
        argv = ["-S", "2026-10-01", "-E", "2026-12-31T23:59:59", *flags, "--rates", str(env.tmp / "rates.toml"), "-P"]
        nodes = run_report([*argv, "--db-dir", str(paths[0].parent)], cfg_file)
        assert nodes[0] == 0 and nodes[1].count("\n") > 3
        assert run_report([*argv, "--ledger"], cfg_file) == nodes

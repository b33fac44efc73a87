"""Benchmark: the cluster ledger — shipping throughput, and reports over many job records.

Against a throwaway mariadbd (tests/mariadb.py: its own data directory, unix socket only, no
TCP), measures:
  ship1      netacct-ship of one node database of --ship-jobs jobs (records/s), without and
             with the rollups' upkeep, alternating (--pairs times each)
  shipN      --nodes node databases of --ship-jobs/--nodes jobs each, shipping at once, one
             process each (records/s over all, and the slowest node's time), without and with
  migrate    a ledger of schema 3 filled with --jobs job records (made in the server with its
             SEQUENCE engine: 2 classes a record, every 50th job on two nodes) migrated to
             schema 4: the rollups built from its rows (the migration's own code)
  grouped    netacct-report --ledger --group-by account,month --rates RATES over them (answered
             by the rollups), wall time and peak RSS, --reps times
  parsable   netacct-report --ledger -P over the first tenth of them, then all (streamed: the
             RSS must stay flat)
Run as root: .venv/bin/python bench/ledger.py [--jobs 10000000] [--nodes 100 --ship-jobs 100000]
The lead's targets (issue 15): grouped over 10,000,000 records <= 2 s on a 2-vCPU VM; compare
with 1,000,000 records in 100 SQLite files (3.5 s, bench/report.py).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from mariadb import MariaDB  # noqa: E402
from slurm_netacct import config  # noqa: E402
from slurm_netacct.store import db as store  # noqa: E402
from slurm_netacct.store import ledger, ship  # noqa: E402
from slurm_netacct.traffic import FIELDS  # noqa: E402

VENV_BIN = Path(sys.executable).parent
RATES = '[price]\nlan_in = "0.001"\nlan_out = "0.002"\nwan_in = "0.01"\nwan_out = "0.09"\n'


def make_journal(path: Path, node: str, jobs: int, first: int, seed: int) -> None:
    """A node database with `jobs` finished jobs (rows written directly, in one transaction)."""
    rng = random.Random(seed)
    db = store.connect(path)
    with store.immediate(db):
        for j in range(first, first + jobs):
            db.conn.execute(
                'INSERT INTO jobs (job_id, node, restart, user, uid, account, partition, start, "end", state, classes) '
                "VALUES (?, ?, 0, ?, 1000, ?, 'batch', '2026-11-01T00:00:00Z', '2026-11-01T01:00:00Z', 'completed', "
                "'lan,wan')", (j, node, f"user{j % 300:03d}", f"acct{j % 40:02d}"))
            for k in ("lan", "wan"):
                db.conn.execute(f"INSERT INTO traffic (job_id, node, restart, class, {', '.join(FIELDS)}) "
                                "VALUES (?, ?, 0, ?, ?, ?, ?, ?)",
                                (j, node, k, *(rng.randrange(10**9) for _ in FIELDS)))
    db.conn.close()


def _ship_one(args: tuple[str, dict[str, Any], bool]) -> tuple[int, float]:
    path, table, rollups = args
    led = config.parse({"ledger": table}).ledger
    assert led is not None
    t0 = time.perf_counter()
    done = ship.ship(Path(path), led, rollups=rollups)
    return done.rows, time.perf_counter() - t0


def fill_ledger(db: MariaDB, name: str, jobs: int) -> None:
    """`jobs` job records in the ledger made by the server itself (SEQUENCE engine)."""
    db.sql(f"""
        SET SESSION unique_checks = 0;
        INSERT INTO jobs (cluster, job_id, node, restart, user, uid, account, `partition`, start, `end`, state,
                          sampled_at, classes, finality)
          SELECT 'bench', seq, CONCAT('n', LPAD(seq % 100, 3, '0')), 0, CONCAT('user', LPAD(seq % 300, 3, '0')), 1000,
                 CONCAT('acct', LPAD(seq % 40, 2, '0')), 'batch',
                 DATE_FORMAT(FROM_UNIXTIME(1767225600 + seq * 3), '%Y-%m-%dT%H:%i:%sZ'),
                 DATE_FORMAT(FROM_UNIXTIME(1767225600 + seq * 3 + 3600), '%Y-%m-%dT%H:%i:%sZ'),
                 'completed', NULL, 'lan,wan', '1' FROM seq_1_to_{jobs};
        INSERT INTO jobs (cluster, job_id, node, restart, user, uid, account, `partition`, start, `end`, state,
                          sampled_at, classes, finality)
          SELECT 'bench', seq * 50, CONCAT('n', LPAD((seq * 50 + 1) % 100, 3, '0')), 0, NULL, NULL, NULL, NULL,
                 DATE_FORMAT(FROM_UNIXTIME(1767225600 + seq * 150), '%Y-%m-%dT%H:%i:%sZ'),
                 DATE_FORMAT(FROM_UNIXTIME(1767225600 + seq * 150 + 3600), '%Y-%m-%dT%H:%i:%sZ'),
                 'completed', NULL, 'lan,wan', '1' FROM seq_1_to_{jobs // 50};
        INSERT INTO traffic (cluster, job_id, node, restart, class, in_bytes, out_bytes, in_packets, out_packets, finality)
          SELECT j.cluster, j.job_id, j.node, 0, c.class, (j.job_id * 7919) % 1000000007, (j.job_id * 104729) % 999999937,
                 j.job_id % 100003, j.job_id % 99991, '1'
          FROM jobs j JOIN (SELECT 'lan' AS class UNION ALL SELECT 'wan') c WHERE j.cluster = 'bench';
        ANALYZE TABLE jobs, traffic;
    """, database=name)


class _Shown(dict):  # type: ignore[type-arg]
    """Results, each printed as it comes (a long run that fails keeps what it measured)."""

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        print(f"{key:28s} {value}", flush=True)

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            super().__setitem__(key, default)
        return self[key]


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, int, int]:
    """Wall seconds, peak RSS (KiB) and output bytes of one command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    n = 0
    assert proc.stdout is not None
    while chunk := proc.stdout.read(1 << 20):
        n += len(chunk)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{argv}: exit {proc.returncode}: {err}")
    return time.perf_counter() - t0, usage.ru_maxrss, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=10_000_000, help="job records for the report runs")
    ap.add_argument("--ship-jobs", type=int, default=100_000, help="job records to ship (one node, then split)")
    ap.add_argument("--nodes", type=int, default=100, help="node databases shipping at once")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/netacct-bench-ledger"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--pairs", type=int, default=2, help="ship1 runs without and with rollups, alternating")
    ap.add_argument("--reps", type=int, default=3, help="grouped report runs")
    ap.add_argument("--buffer-pool", default="4G", help="mariadbd's InnoDB buffer pool")
    ap.add_argument("--skip-parsable-all", action="store_true", help="-P over the first tenth only")
    a = ap.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = _Shown({"jobs": a.jobs, "ship_jobs": a.ship_jobs, "nodes": a.nodes, "batch": a.batch})
    server = MariaDB(options=(f"--innodb-buffer-pool-size={a.buffer_pool}",))
    server.start()
    try:
        server.create_accounts("bench", "ship", "report", host="localhost")
        (a.dir / "ship.pw").write_text("ship\n")
        (a.dir / "report.pw").write_text("report\n")
        for f in ("ship.pw", "report.pw"):
            os.chmod(a.dir / f, 0o600)
        table = {"url": f"mysql://netacct_ship@localhost/bench?socket={server.socket}",
                 "password_file": str(a.dir / "ship.pw"), "cluster": "ship1", "batch": a.batch,
                 "report_url": f"mysql://netacct_report@localhost/bench?socket={server.socket}",
                 "report_password_file": str(a.dir / "report.pw")}
        res["load_before"] = os.getloadavg()
        # ship1: one node, without and with the rollups' upkeep, alternating (a cluster each)
        one = a.dir / "one.db"
        one.unlink(missing_ok=True)
        make_journal(one, "n000", a.ship_jobs, 1, 1)
        for i in range(a.pairs):
            for mode, roll in (("plain", False), ("rollups", True)):
                rows, secs = _ship_one((str(one), {**table, "cluster": f"ship1-{mode}-{i}"}, roll))
                res.setdefault(f"ship1_{mode}_records_per_s", []).append(round(rows / secs))
                print(f"ship1 {mode}", round(rows / secs), flush=True)
        # shipN: many nodes at once, one process each, without and with
        per = max(1, a.ship_jobs // a.nodes)
        paths = []
        for i in range(a.nodes):
            p = a.dir / f"n{i:03d}.db"
            p.unlink(missing_ok=True)
            make_journal(p, f"n{i:03d}", per, 1 + i * per, i)
            paths.append(p)
        for mode, roll in (("plain", False), ("rollups", True)):
            t0 = time.perf_counter()
            with multiprocessing.get_context("fork").Pool(a.nodes) as pool:
                out = pool.map(_ship_one, [(str(p), {**table, "cluster": f"shipN-{mode}"}, roll) for p in paths])
            wall = time.perf_counter() - t0
            res[f"shipN_{mode}_records_per_s"] = round(sum(r for r, _ in out) / wall)
            res[f"shipN_{mode}_slowest_node_s"] = round(max(s for _, s in out), 2)
        # the reports: a ledger of schema 3 with --jobs records, then migrated (rollups built)
        server.create_accounts("big", "ship", "report", host="localhost")
        big = {**table, "cluster": "bench", "url": table["url"].replace("/bench?", "/big?"),
               "report_url": table["report_url"].replace("/bench?", "/big?")}
        big_cfg = config.parse({"ledger": big}).ledger
        assert big_cfg is not None
        import MySQLdb
        conn = MySQLdb.connect(unix_socket=str(server.socket), user="netacct_ship", password="ship", database="big")
        ledger.Ledger(conn, big_cfg.url).migrate(target=ledger.ROLLUPS_SINCE - 1)
        conn.close()
        t0 = time.perf_counter()
        fill_ledger(server, "big", a.jobs)
        res["fill_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        ledger.connect(big_cfg, migrate=True).close()
        res["migrate_s"] = round(time.perf_counter() - t0, 1)
        res["rollup_rows"] = int(server.sql("SELECT COUNT(*) FROM big.rollup").stdout)
        size = server.sql("SELECT SUM(data_length + index_length) FROM information_schema.tables "
                          "WHERE table_schema = 'big' AND table_name IN ('jobs', 'traffic')").stdout
        rsize = server.sql("SELECT SUM(data_length + index_length) FROM information_schema.tables "
                           "WHERE table_schema = 'big' AND table_name LIKE 'rollup%'").stdout
        rows = server.sql("SELECT COUNT(*) FROM big.jobs").stdout
        res["job_rows"] = int(rows)
        res["ledger_bytes_per_job_row"] = round(int(size) / int(rows))
        res["rollup_bytes_per_job_row"] = round(int(rsize) / int(rows))
        cfgp = a.dir / "netacct.toml"
        # -P over millions of records waits for the server's first row longer than the default 30 s
        lines = ["[ledger]"] + [f"{k} = {json.dumps(v)}" for k, v in {**big, "timeout": 3600}.items()]
        cfgp.write_text("\n".join(lines) + "\n")
        (a.dir / "rates.toml").write_text(RATES)
        env = dict(os.environ, NETACCT_CONFIG=str(cfgp), TZ="UTC")
        report = str(VENV_BIN / "netacct-report")
        window = ["-S", "2026-01-01", "-E", "2030-12-31T23:59:59"]
        grouped = [report, "--ledger", *window, "--group-by", "account,month", "--rates", str(a.dir / "rates.toml")]
        for _ in range(a.reps):
            secs, rss, _ = timed(grouped, env)
            res.setdefault("grouped_s", []).append(round(secs, 2))
            res.setdefault("grouped_rss_kib", []).append(rss)
            print("grouped", round(secs, 2), rss, flush=True)
        res["load_mid"] = os.getloadavg()
        for part, n in (("tenth", max(1, a.jobs // 10)), ("all", a.jobs)):
            if part == "all" and a.skip_parsable_all:
                continue
            upto = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(1767225600 + n * 3))
            secs, rss, nbytes = timed([report, "--ledger", "-S", "2026-01-01", "-E", upto, "-P"], env)
            res[f"parsable_{part}_s"], res[f"parsable_{part}_rss_kib"] = round(secs, 1), rss
            res[f"parsable_{part}_bytes"] = nbytes
        res["load_after"] = os.getloadavg()
    finally:
        server.remove()
    for k, v in res.items():
        print(f"{k:28s} {v:,.1f}" if isinstance(v, float) else f"{k:28s} {v}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

"""Benchmark: netacct-report over 1,000,000 job records in 100 node databases.

Builds the databases (once, cached in --dir) with the real schema, then times, as a user
would run them:
  grouped   --group-by account,month --rates RATES  (the billing query)
  parsable  -P over every record (streamed: peak memory must not grow with the rows)
  json      --json over every record
and records wall time and peak RSS of each. Run:
    .venv/bin/python bench/report.py [--nodes 100 --jobs-per-node 10000]
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slurm_netacct.store import db as store  # noqa: E402

RATES = '[price]\nlan_in = "0.001"\nlan_out = "0.002"\nwan_in = "0.01"\nwan_out = "0.09"\n'


def build(directory: Path, nodes: int, per_node: int, seed: int = 1) -> None:
    """nodes databases of per_node jobs each; every 50th job also runs on the next node."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    accounts = [f"acct{i:02d}" for i in range(40)]
    users = [f"user{i:03d}" for i in range(300)]
    for n in range(nodes):
        path = directory / f"n{n:03d}.db"
        if path.exists():
            continue
        store.connect(path).close()  # the real schema
        conn = sqlite3.connect(path)
        jobs, traffic = [], []
        for i in range(per_node):
            job_id = n * per_node + i + 1
            month = 1 + (job_id * 7) % 12
            start = f"2026-{month:02d}-{1 + job_id % 28:02d}T{job_id % 24:02d}:00:00Z"
            end = start.replace("T", "T").replace(":00:00Z", ":30:00Z")
            jobs.append((job_id, f"n{n:03d}", 0, users[job_id % 300], 1000 + job_id % 300,
                         accounts[job_id % 40], "batch", start, end, "completed"))
            for klass in ("lan", "wan"):
                traffic.append((job_id, f"n{n:03d}", 0, klass, rng.randrange(10**10), rng.randrange(10**9),
                                rng.randrange(10**7), rng.randrange(10**6)))
        conn.executemany('INSERT INTO jobs (job_id, node, restart, user, uid, account, partition, start, "end", state) '
                         "VALUES (?,?,?,?,?,?,?,?,?,?)", jobs)
        conn.executemany("INSERT INTO traffic VALUES (?,?,?,?,?,?,?,?)", traffic)
        conn.commit()
        conn.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--jobs-per-node", type=int, default=10000)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/netacct-bench-report"))
    args = ap.parse_args()
    d = args.dir / f"{args.nodes}x{args.jobs_per_node}"
    t0 = time.perf_counter()
    build(d, args.nodes, args.jobs_per_node)
    print(f"databases: {args.nodes} x {args.jobs_per_node} jobs in {d} (built/checked in {time.perf_counter() - t0:.1f} s)")
    rates = args.dir / "rates.toml"
    rates.write_text(RATES)
    exe = str(Path(sys.executable).parent / "netacct-report")
    base = [exe, "--db-dir", str(d), "-S", "2026-01-01"]
    runs = {
        "grouped": base + ["--group-by", "account,month", "--rates", str(rates), "-P"],
        "parsable": base + ["-P"],
        "json": base + ["--json"],
    }
    env_cfg = args.dir / "netacct.toml"
    env_cfg.write_text("")
    os.environ["NETACCT_CONFIG"] = str(env_cfg)
    print("| run | records | wall s | peak RSS MiB | output MB |")
    print("|---|---|---|---|---|")
    for name, argv in runs.items():
        wall, rss, size = timed_own(argv)
        print(f"| {name} | {args.nodes * args.jobs_per_node:,} | {wall:.2f} | {rss:.0f} | {size / 1e6:.1f} |", flush=True)
    return 0


def timed_own(argv: list[str]) -> tuple[float, float, int]:
    """Wall time, the child's own peak RSS (via /proc status polling-free wait4), output size."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    size = 0
    assert p.stdout is not None
    while chunk := p.stdout.read(1 << 20):
        size += len(chunk)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"{argv}: {p.stderr.read().decode() if p.stderr else ''}")
    return wall, usage.ru_maxrss / 1024, size


if __name__ == "__main__":
    sys.exit(main())

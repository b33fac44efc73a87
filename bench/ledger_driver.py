"""Benchmark: PyMySQL against mysqlclient (MySQLdb) for what the ledger does most.

Against a throwaway mariadbd (unix socket, tests/mariadb.py), each driver in turn, alternately,
`--reps` times: upsert `--rows` rows in batches of `--batch` (executemany with ON DUPLICATE KEY
UPDATE, one commit a batch: shipping) and read them back unbuffered (a streamed report).
Prints rows/s, medians. Run: .venv/bin/python bench/ledger_driver.py [--rows 100000]
(mysqlclient must be importable: it is not a dependency of the project).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from mariadb import MariaDB  # noqa: E402

TABLE = ("CREATE TABLE t (cluster VARCHAR(64) NOT NULL, job_id BIGINT NOT NULL, node VARCHAR(64) NOT NULL, "
         "restart INT NOT NULL, user VARCHAR(64), account VARCHAR(64), state VARCHAR(16), "
         "in_bytes BIGINT UNSIGNED, out_bytes BIGINT UNSIGNED, in_packets BIGINT UNSIGNED, "
         "out_packets BIGINT UNSIGNED, PRIMARY KEY (cluster, job_id, node, restart)) "
         "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
UPSERT = ("INSERT INTO t VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON DUPLICATE KEY UPDATE "
          "state = VALUES(state), in_bytes = VALUES(in_bytes), out_bytes = VALUES(out_bytes), "
          "in_packets = VALUES(in_packets), out_packets = VALUES(out_packets)")


def connect(driver: str, socket: Path) -> Any:
    if driver == "pymysql":
        import pymysql
        return pymysql.connect(unix_socket=str(socket), user="root", database="bench", autocommit=False)
    import MySQLdb
    return MySQLdb.connect(unix_socket=str(socket), user="root", database="bench", autocommit=False)


def unbuffered(driver: str, conn: Any) -> Any:
    if driver == "pymysql":
        import pymysql.cursors
        return conn.cursor(pymysql.cursors.SSCursor)
    import MySQLdb.cursors
    return conn.cursor(MySQLdb.cursors.SSCursor)


def one(driver: str, socket: Path, rows: int, batch: int) -> tuple[float, float]:
    conn = connect(driver, socket)
    cur = conn.cursor()
    cur.execute("DROP TABLE IF EXISTS t")
    cur.execute(TABLE)
    data = [("c1", j, f"n{j % 100:03d}", 0, f"user{j % 300}", f"acct{j % 40}", "completed",
             j * 1000, j * 10, j, j // 10) for j in range(rows)]
    t0 = time.perf_counter()
    for i in range(0, rows, batch):
        cur.executemany(UPSERT, data[i:i + batch])
        conn.commit()
    write = rows / (time.perf_counter() - t0)
    ss = unbuffered(driver, conn)
    t0 = time.perf_counter()
    n = 0
    ss.execute("SELECT * FROM t ORDER BY cluster, job_id, node, restart")
    for _ in ss:
        n += 1
    read = n / (time.perf_counter() - t0)
    ss.close()
    conn.close()
    assert n == rows
    return write, read


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    db = MariaDB().start()
    try:
        db.sql("CREATE DATABASE bench")
        res: dict[str, dict[str, list[float]]] = {d: {"write": [], "read": []} for d in ("pymysql", "mysqlclient")}
        for _ in range(a.reps):
            for d in res:
                w, r = one(d, db.socket, a.rows, a.batch)
                res[d]["write"].append(w)
                res[d]["read"].append(r)
    finally:
        db.remove()
    out = {d: {k: statistics.median(v) for k, v in m.items()} for d, m in res.items()}
    for d, m in out.items():
        print(f"{d:12s} upsert {m['write']:10.0f} rows/s   streamed read {m['read']:10.0f} rows/s")
    if a.json:
        a.json.write_text(json.dumps({"rows": a.rows, "batch": a.batch, "reps": a.reps, "medians": out}))


if __name__ == "__main__":
    main()

"""The cluster ledger: a central MariaDB that holds every node's job rows (connect, schema, upserts)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import MySQLdb
import MySQLdb.cursors

from ..config import LedgerConfig, LedgerURL
from ..errors import ConfigError, LedgerError
from ..traffic import FIELDS
from . import rollup

# The ledger's schema, one list of statements per version; a server at version v gets the
# statements of v+1, v+2, ... in turn, each version recorded once its statements have run
# (MariaDB commits DDL at once: every statement is written so that running it twice is harmless;
# a function fills tables in one transaction that also records the version, so a crash in the
# middle leaves the version unrecorded and the tables empty, and the migration runs again).
# Text is utf8mb4_nopad_bin: compared and grouped by code point, trailing spaces significant, as
# Python compares it (a report from the ledger must equal the node-database report exactly).
# Times are the node database's ISO strings (2026-11-25T08:00:00Z): they sort as text.
_TEXT = "CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin"
Step = str | Callable[[Any], None]
MIGRATIONS: list[list[Step]] = [
    [  # version 1: one row per job, node and run; its traffic per class
        "CREATE TABLE IF NOT EXISTS netacct_schema (version INT NOT NULL) ENGINE=InnoDB",
        "CREATE TABLE IF NOT EXISTS jobs ("
        " cluster VARCHAR(64) NOT NULL, job_id BIGINT UNSIGNED NOT NULL, node VARCHAR(255) NOT NULL,"
        " restart INT UNSIGNED NOT NULL, user VARCHAR(255) NULL, uid BIGINT NULL, account VARCHAR(255) NULL,"
        " `partition` VARCHAR(255) NULL, start VARCHAR(32) NULL, `end` VARCHAR(32) NULL,"
        " state VARCHAR(16) NOT NULL, sampled_at VARCHAR(32) NULL, classes VARCHAR(600) NULL,"
        # How final this copy is ('0' + sample time while running, '1' + end time after): a
        # copy replaces the stored one only if it is at least as final (an old copy never wins).
        " finality VARCHAR(33) NOT NULL,"
        " PRIMARY KEY (cluster, job_id, node, restart)"
        f") ENGINE=InnoDB {_TEXT}",
        "CREATE TABLE IF NOT EXISTS traffic ("
        " cluster VARCHAR(64) NOT NULL, job_id BIGINT UNSIGNED NOT NULL, node VARCHAR(255) NOT NULL,"
        " restart INT UNSIGNED NOT NULL, class VARCHAR(16) NOT NULL,"
        " in_bytes BIGINT UNSIGNED NOT NULL, out_bytes BIGINT UNSIGNED NOT NULL,"
        " in_packets BIGINT UNSIGNED NOT NULL, out_packets BIGINT UNSIGNED NOT NULL,"
        " finality VARCHAR(33) NOT NULL,"
        " PRIMARY KEY (cluster, job_id, node, restart, class)"
        f") ENGINE=InnoDB {_TEXT}",
    ],
    [  # version 2: when a row last arrived, and the indexes of the report's selections
        "ALTER TABLE jobs ADD COLUMN IF NOT EXISTS shipped_at TIMESTAMP NOT NULL "
        "DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP",
        "CREATE INDEX IF NOT EXISTS jobs_by_end ON jobs (cluster, `end`)",
        "CREATE INDEX IF NOT EXISTS jobs_by_user ON jobs (cluster, user, job_id)",
        "CREATE INDEX IF NOT EXISTS jobs_by_account ON jobs (cluster, account, job_id)",
    ],
    [  # version 3: the summaries written into slurmdbd (netacct-sacct), so each is written once
        "CREATE TABLE IF NOT EXISTS sacct_summaries ("
        " cluster VARCHAR(64) NOT NULL, job_id BIGINT UNSIGNED NOT NULL, summary VARCHAR(1000) NOT NULL,"
        " written_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,"
        " PRIMARY KEY (cluster, job_id)"
        f") ENGINE=InnoDB {_TEXT}",
        "CREATE INDEX IF NOT EXISTS jobs_by_shipped ON jobs (cluster, shipped_at)",
    ],
    # version 4: monthly rollups (store/rollup.py), filled from the rows already there; first
    # the column that shuts out shippers of earlier versions (see UPSERT_JOB_4; instant in MariaDB)
    ["ALTER TABLE jobs ADD COLUMN IF NOT EXISTS upkeep TINYINT NOT NULL", *rollup.MIGRATION, rollup.build],
]
SCHEMA_VERSION = len(MIGRATIONS)
ROLLUPS_SINCE = 4
_LOCK = "netacct_ledger_schema"
_DEADLOCK_RETRIES = 5
REPORT_TMP_TABLE_BYTES = 256 << 20

JOB_FIELDS = ("job_id", "node", "restart", "user", "uid", "account", "partition", "start", "end",
              "state", "sampled_at", "classes")
_Q = {"partition": "`partition`", "end": "`end`"}
_JOB_COLS = ", ".join(_Q.get(c, c) for c in ("cluster", *JOB_FIELDS, "finality"))
_NEWER = "VALUES(finality) >= finality"  # finality itself is assigned last: the test sees the old one
_JOB_UPDATE = ("ON DUPLICATE KEY UPDATE "
               + ", ".join(f"{_Q.get(c, c)} = IF({_NEWER}, VALUES({_Q.get(c, c)}), {_Q.get(c, c)})"
                           for c in (*JOB_FIELDS[3:], "finality")))
UPSERT_JOB = f"INSERT INTO jobs ({_JOB_COLS}) VALUES ({', '.join(['%s'] * (len(JOB_FIELDS) + 2))}) {_JOB_UPDATE}"
# From schema 4 on, a job row names the column `upkeep` (NOT NULL, no default), which the
# statement of earlier versions does not: a node still running one of them is refused by the
# server (strict mode, MariaDB's default) instead of writing rows the rollups would miss.
UPSERT_JOB_4 = (f"INSERT INTO jobs ({_JOB_COLS}, upkeep) VALUES ({', '.join(['%s'] * (len(JOB_FIELDS) + 3))}) "
                f"{_JOB_UPDATE}")
UPSERT_TRAFFIC = (f"INSERT INTO traffic (cluster, job_id, node, restart, class, {', '.join(FIELDS)}, finality) "
                  f"VALUES ({', '.join(['%s'] * (6 + len(FIELDS)))}) ON DUPLICATE KEY UPDATE "
                  + ", ".join(f"{c} = IF({_NEWER}, VALUES({c}), {c})" for c in (*FIELDS, "finality")))


def finality(state: str, end: str | None, sampled_at: str | None) -> str:
    """How final a copy of a row is, as text that sorts as the report's rule does: any
    terminal state over running; then the later end (terminal) or the later sample (running)."""
    return "0" + (sampled_at or "") if state == "running" else "1" + (end or "")


def read_password(path: Path, owner_only: bool = True) -> str:
    """The password in a file (its first line); ConfigError if it cannot be read, or if others
    than its owner may read it (a password file must be 0600 or 0400, owned by root)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            text = f.read(4096)
    except OSError as exc:
        raise ConfigError(f"ledger password file {path}: {exc.strerror}") from None
    if owner_only and (st.st_mode & (stat.S_IRWXG | stat.S_IRWXO) or st.st_uid != 0):
        raise ConfigError(f"ledger password file {path} is readable by others than root "
                          f"(mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}): "
                          "chown root and chmod 600")
    try:
        return text.decode("utf-8").splitlines()[0] if text.strip() else ""
    except UnicodeDecodeError:
        raise ConfigError(f"ledger password file {path}: not UTF-8") from None


def describe(exc: Exception, url: LedgerURL) -> str:
    """A MySQLdb error as one line that says what to do."""
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
    text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    where = f"ledger {url}"
    if code == 1045:
        return f"{where}: access denied for user {url.user} (wrong password in the password file?)"
    if code == 1044 or code == 1142:
        return f"{where}: not allowed: {text}"
    if code == 1049:
        return f"{where}: the database {url.database} does not exist (create it: see README, 'The ledger')"
    if code in (2002, 2003, 2005):
        return f"{where}: cannot connect ({text})"
    if code in (2006, 2013, 4031):
        return f"{where}: the connection was lost ({text})"
    return f"{where}: {text}"


class Ledger:
    """One connection to the ledger, with the schema checked (and, for shipping, migrated)."""

    def __init__(self, conn: Any, url: LedgerURL) -> None:
        self.conn = conn
        self.url = url
        self.schema = SCHEMA_VERSION  # what check_version or migrate found or made
        self.known_classes: set[tuple[str, str]] = set()  # (cluster, class) in rollup_classes
        # A connection without the read timeout, for a migration: filling the rollups of a big
        # ledger, or waiting for another node's, takes longer than `timeout` (connect sets it).
        self.untimed: Callable[[], Any] | None = None

    @contextmanager
    def errors(self) -> Iterator[None]:
        """MySQLdb errors inside become LedgerError (one line)."""
        try:
            yield
        except MySQLdb.Error as exc:
            raise LedgerError(describe(exc, self.url)) from None

    def close(self) -> None:
        try:
            self.conn.close()
        except MySQLdb.Error:
            pass

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def version(self) -> int:
        """The schema version of the ledger (0: no schema yet)."""
        with self.errors():
            cur = self.conn.cursor()
            cur.execute("SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE() "
                        "AND table_name = 'netacct_schema'")
            if cur.fetchone()[0] == 0:
                return 0
            cur.execute("SELECT MAX(version) FROM netacct_schema")
            row = cur.fetchone()
            return int(row[0] or 0)

    def check_version(self, migrate: bool) -> int:
        """The ledger's schema is this version's (migrated to it, if `migrate`); LedgerError if
        it is newer, or older and not migrated."""
        version = self.version()
        if version > SCHEMA_VERSION:
            raise LedgerError(f"ledger {self.url}: schema version {version} is newer than this version "
                              f"of slurm-netacct knows ({SCHEMA_VERSION}): upgrade slurm-netacct")
        if version < SCHEMA_VERSION:
            if not migrate:
                raise LedgerError(f"ledger {self.url}: schema version {version}, older than this version "
                                  f"of slurm-netacct reads ({SCHEMA_VERSION}): run netacct-ship once "
                                  "(it migrates the ledger)")
            if self.untimed is None:
                version = self.migrate()
            else:
                with self.errors():
                    other = Ledger(self.untimed(), self.url)
                try:
                    version = other.migrate()
                finally:
                    other.close()
        self.schema = version
        return version

    def migrate(self, target: int = SCHEMA_VERSION) -> int:
        """Bring the schema up to `target`, one version after the other; one migrator at a time
        (a named lock: a hundred nodes may start shipping together)."""
        with self.errors():
            cur = self.conn.cursor()
            cur.execute("SELECT GET_LOCK(%s, 60)", (_LOCK,))
            if cur.fetchone()[0] != 1:
                raise LedgerError(f"ledger {self.url}: another node holds the schema lock for over 60 s")
            try:
                version = self.version()
                if version > SCHEMA_VERSION:
                    raise LedgerError(f"ledger {self.url}: schema version {version} is newer than this "
                                      f"version of slurm-netacct knows ({SCHEMA_VERSION}): upgrade slurm-netacct")
                while version < target:
                    for step in MIGRATIONS[version]:
                        if isinstance(step, str):
                            cur.execute(step)
                        else:  # after the DDL (each commits at once): one transaction, reads locked
                            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                            step(cur)
                    version += 1
                    cur.execute("INSERT INTO netacct_schema (version) VALUES (%s)", (version,))
                    self.conn.commit()
                self.schema = version
                return version
            finally:
                cur.execute("SELECT RELEASE_LOCK(%s)", (_LOCK,))
                cur.fetchall()

    def upsert(self, cluster: str, jobs: Sequence[Sequence[Any]], traffic: Sequence[Sequence[Any]],
               rollups: bool | None = None) -> None:
        """Store job rows (JOB_FIELDS order) and traffic rows (job_id, node, restart, class,
        FIELDS...) of one node in one transaction. Absolute values, keyed by cluster, job, node
        and run: sending a row twice stores it once; an older copy never replaces a newer one.
        The rollups follow in the same transaction, from schema 4 on (`rollups=False`: only for a
        benchmark's comparison). A deadlock between two shippers is retried."""
        if rollups is None:
            rollups = self.schema >= ROLLUPS_SINCE
        fin = {(j[0], j[1], j[2]): finality(j[9], j[8], j[10]) for j in jobs}
        for attempt in range(_DEADLOCK_RETRIES + 1):
            with self.errors():
                try:
                    cur = self.conn.cursor()
                    upkeep = rollup.Maintenance(cur, cluster, {int(j[0]) for j in jobs}) if rollups else None
                    if upkeep is not None:
                        upkeep.lock()
                    if jobs and self.schema >= ROLLUPS_SINCE:
                        cur.executemany(UPSERT_JOB_4, [(cluster, *j, fin[(j[0], j[1], j[2])], 1) for j in jobs])
                    elif jobs:
                        cur.executemany(UPSERT_JOB, [(cluster, *j, fin[(j[0], j[1], j[2])]) for j in jobs])
                    if traffic:
                        cur.executemany(UPSERT_TRAFFIC, [(cluster, *t, fin[(t[0], t[1], t[2])]) for t in traffic])
                    new_classes = {str(t[3]) for t in traffic} - {c for k, c in self.known_classes if k == cluster}
                    if upkeep is not None:
                        upkeep.apply(new_classes)
                    self.conn.commit()
                    if upkeep is not None:
                        self.known_classes.update((cluster, c) for c in new_classes)
                    return
                except BaseException as exc:
                    try:
                        self.conn.rollback()
                    except MySQLdb.Error:
                        pass
                    if (isinstance(exc, MySQLdb.OperationalError) and exc.args and exc.args[0] == 1213
                            and attempt < _DEADLOCK_RETRIES):
                        continue  # InnoDB rolled the transaction back: run it again
                    raise

    def stream(self, sql: str, params: Sequence[Any]) -> Iterator[tuple[Any, ...]]:
        """Rows of a query, fetched as they come (unbuffered): memory stays flat."""
        with self.errors():
            cur = self.conn.cursor(MySQLdb.cursors.SSCursor)
            done = False
            try:
                cur.execute(sql, tuple(params))
                while True:
                    rows = cur.fetchmany(1000)
                    if not rows:
                        break
                    yield from rows
                done = True
            finally:
                if done:
                    cur.close()
                else:  # the reader stopped early (`| head`): closing the cursor would read every
                    self.close()  # remaining row first; dropping the connection ends the query

    def query(self, sql: str, params: Sequence[Any] | Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """All rows of a query; `params` by position (%s) or by name (%(name)s)."""
        with self.errors():
            cur = self.conn.cursor()
            cur.execute(sql, params if isinstance(params, Mapping) else tuple(params))
            return list(cur.fetchall())


def connect(cfg: LedgerConfig, report: bool = False, migrate: bool = False) -> Ledger:
    """A connection to the ledger: the shipping account, or with `report` the report's
    (report_url, else url). ConfigError for a bad password file, LedgerError for the server."""
    url = (cfg.report_url or cfg.url) if report else cfg.url
    pw_file = (cfg.report_password_file or cfg.password_file) if report else cfg.password_file
    password = read_password(pw_file)
    kw: dict[str, Any] = {"user": url.user, "password": password, "database": url.database,
                          "connect_timeout": cfg.timeout, "read_timeout": cfg.timeout,
                          "write_timeout": cfg.timeout, "charset": "utf8mb4", "autocommit": False}
    if url.socket:
        kw["unix_socket"] = url.socket
    else:
        kw.update(host=url.host, port=url.port)
    if cfg.tls != "off":
        ssl: dict[str, str] = {}
        if cfg.tls_ca:
            ssl["ca"] = str(cfg.tls_ca)
        if cfg.tls_cert and cfg.tls_key:
            ssl.update(cert=str(cfg.tls_cert), key=str(cfg.tls_key))
        kw["ssl"] = ssl
        kw["ssl_mode"] = cfg.tls.upper()
    try:
        conn = MySQLdb.connect(**kw)
    except MySQLdb.Error as exc:
        raise LedgerError(describe(exc, url)) from None
    led = Ledger(conn, url)
    led.untimed = lambda: MySQLdb.connect(**{k: v for k, v in kw.items() if k != "read_timeout"})
    try:
        with led.errors():
            cur = conn.cursor()
            cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
            if report:  # per-job tables of a grouped report stay in memory up to this size
                # (measured, 200,000 jobs: 13 s with the server's default 16 MiB, 4 s with it)
                cur.execute("SET SESSION tmp_table_size = %s, max_heap_table_size = %s",
                            (REPORT_TMP_TABLE_BYTES, REPORT_TMP_TABLE_BYTES))
        led.check_version(migrate)
    except BaseException:
        led.close()
        raise
    return led

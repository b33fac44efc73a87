"""The spool: a job's final record as one JSON file, when the node database cannot be written.

The epilog writes it durably (temp file, fsync, rename, fsync of the directory) and tears the
job down. The next hook, netacct-sample or netacct-reconcile that opens the database stores
every spooled record of its node and only then deletes the file. Records hold absolute counter
values, keyed by job, node and run: storing one twice (a crash between the commit and the
deletion, two replays at once) stores the same numbers again.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sqlite_utils

from .. import naming
from ..log import get as get_log
from ..traffic import FIELDS, checked
from .db import JobInfo, now_iso, record_end

SPOOL_FORMAT = "slurm-netacct spool 1"
_STALE_TMP_S = 3600  # a temp file this old is what a crash left: its epilog will run again


def spool_path(spool_dir: Path, info: JobInfo) -> Path:
    """The spool file of one run of one job on one node (one file per key)."""
    return spool_dir / naming.spool_name(info.node, info.job_id, info.restart)


def spool_record(info: JobInfo, state: str, traffic: Mapping[str, Mapping[str, int]] | None,
                 row: Mapping[str, Any] | None, if_running: bool, db_path: Path, error: str) -> dict[str, Any]:
    """A final record as it is spooled: what record_end would have stored, and why it was not."""
    row = row or {}
    return {
        "format": SPOOL_FORMAT, "job_id": info.job_id, "node": info.node, "restart": info.restart,
        "user": info.user if info.user is not None else row.get("user"),
        "uid": info.uid if info.uid is not None else row.get("uid"),
        "account": info.account if info.account is not None else row.get("account"),
        "partition": info.partition if info.partition is not None else row.get("partition"),
        "start": row.get("start"), "end": now_iso(), "state": state,
        "traffic": None if traffic is None else checked(traffic),
        "if_running": if_running, "db": str(db_path), "error": error,
    }


def spool_write(spool_dir: Path, record: Mapping[str, Any]) -> Path:
    """Write one record durably into the spool (replacing the same key's); OSError if not."""
    info = JobInfo(job_id=int(record["job_id"]), node=str(record["node"]), restart=int(record["restart"]))
    final = spool_path(spool_dir, info)
    spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=spool_dir)  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(spool_dir)
    return final


def _fsync_dir(path: Path) -> None:
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _spool_names(spool_dir: Path) -> list[str]:
    """The names in the spool directory; [] if there is none, or (logged) it cannot be read."""
    try:
        return os.listdir(spool_dir)
    except FileNotFoundError:
        return []
    except OSError as exc:
        get_log().error("spool %s cannot be listed (%s): its records wait", spool_dir, exc.strerror or exc)
        return []


def spool_pending(spool_dir: Path, node: str, names: list[str] | None = None) -> list[Path]:
    """The node's spooled records waiting to be stored, oldest key first; [] if none or unreadable.
    `names`: the directory's listing, if the caller has it already."""
    token = naming.spool_token(node)
    if names is None:
        names = _spool_names(spool_dir)
    out = []
    for name in names:
        parts = name.rsplit(".", 3)
        if (len(parts) == 4 and parts[0] == token and parts[1].isdigit() and parts[2].isdigit()
                and "." + parts[3] == naming.SPOOL_SUFFIX):
            out.append(spool_dir / name)
    return sorted(out, key=lambda p: (int(p.name.rsplit(".", 3)[1]), int(p.name.rsplit(".", 3)[2])))


def _load_spooled(path: Path, node: str) -> dict[str, Any]:
    """A spooled record, checked; ValueError if it is not one of this node's."""
    rec = json.loads(path.read_text())
    if not isinstance(rec, dict) or rec.get("format") != SPOOL_FORMAT:
        raise ValueError("not a slurm-netacct spool record")
    if rec.get("node") != node:
        raise ValueError(f"a record of node {rec.get('node')!r}")
    for key in ("job_id", "restart"):
        if not isinstance(rec.get(key), int) or isinstance(rec.get(key), bool) or rec[key] < 0:
            raise ValueError(f"bad {key}")
    if not isinstance(rec.get("state"), str) or not isinstance(rec.get("end"), str):
        raise ValueError("bad state or end")
    traffic = rec.get("traffic")
    if traffic is not None:
        if not isinstance(traffic, dict):
            raise ValueError("bad traffic")
        for values in traffic.values():
            if not isinstance(values, dict) or not all(
                    isinstance(values.get(f), int) and values[f] >= 0 for f in FIELDS):
                raise ValueError("bad traffic")
    return rec


def replay_spool(db: sqlite_utils.Database, spool_dir: Path, node: str) -> int:
    """Store the node's spooled records in db, each exactly once; the number stored.

    A file is deleted only after its record is committed. A file that is not a valid record
    is renamed to *.bad and logged; a spool that cannot be read is logged, never an error.
    StoreError if the database cannot be written (the files stay for the next attempt)."""
    log = get_log()
    stored = 0
    names = _spool_names(spool_dir)  # one listing for the records and the stale temp files
    pending = spool_pending(spool_dir, node, names)
    if pending:
        try:
            st = os.stat(spool_dir)
        except OSError:
            return 0
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:  # anyone could have planted records
            log.error("spool %s is not owned by uid %d or is writable by others: its %d records are "
                      "not stored (fix its owner and mode)", spool_dir, os.geteuid(), len(pending))
            return 0
    for path in pending:
        try:
            rec = _load_spooled(path, node)
        except FileNotFoundError:  # another process replayed it meanwhile
            continue
        except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            bad = path.with_name(path.name + ".bad")
            log.error("spool file %s is not a valid record (%s); moved to %s", path, exc, bad.name)
            try:
                os.rename(path, bad)
            except OSError:
                pass
            continue
        info = JobInfo(job_id=rec["job_id"], node=node, restart=rec["restart"], user=rec.get("user"),
                       uid=rec.get("uid"), account=rec.get("account"), partition=rec.get("partition"))
        applied = record_end(db, info, rec["state"], rec["traffic"], end=rec["end"],
                             start=rec.get("start"), if_running=bool(rec.get("if_running")))
        try:
            os.unlink(path)
            _fsync_dir(spool_dir)
        except FileNotFoundError:
            pass
        except OSError as exc:  # stored; storing it again later stores the same numbers
            log.error("job %d: spooled record stored, but %s cannot be deleted: %s",
                      info.job_id, path, exc.strerror)
        if applied:
            stored += 1
            log.warning("job %d: spooled record from %s stored in the database (%s)",
                        info.job_id, path, rec["state"])
        else:
            log.info("job %d: spooled record %s not needed (the run is not running here)", info.job_id, path)
    _remove_stale_temps(spool_dir, names)
    return stored


def _remove_stale_temps(spool_dir: Path, names: list[str]) -> None:
    """Temp files of spool writes that a crash interrupted (their epilog runs again)."""
    now = time.time()
    for name in (n for n in names if n.startswith(".tmp-") and n.endswith(".part")):
        try:
            if now - os.stat(spool_dir / name).st_mtime > _STALE_TMP_S:
                os.unlink(spool_dir / name)
        except OSError:
            pass

"""Job summaries from the ledger written into slurmdbd with sacctmgr, so that sacct shows them.

A summary is one word that survives what SLURM 22.05's sacctmgr does to the text it stores
(lower-cases it, turns double quotes into backticks): `na1:lan=IN/OUT,wan=IN/OUT`, the bytes
each class received (IN) and sent (OUT), summed over the job's nodes and runs. It is written
once every node of the job's last run has shipped its final record (the ledger has as many
nodes for the run as sacct's NNodes, none of them running, and SLURM has the job finished), and
only into a field that is empty or holds our own earlier summary: text another tool wrote
there (jobstats' `JS1:` in AdminComment, a site's note) is never overwritten or rewritten.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import LedgerError
from ..traffic import FIELDS
from .ledger import Ledger

TAG = "na1:"
_OURS = re.compile(r"na1:[a-z0-9_]+=\d+/\d+(,[a-z0-9_]+=\d+/\d+)*")
# SLURM job states after which a job's record is final (sacct's spelling, first word).
FINISHED = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                      "BOOT_FAIL", "DEADLINE", "PREEMPTED"})


def summary(traffic: dict[str, tuple[int, int]]) -> str:
    """`na1:<class>=<in bytes>/<out bytes>,...`, classes in name order."""
    return TAG + ",".join(f"{k}={i}/{o}" for k, (i, o) in sorted(traffic.items()))


def parse(text: str) -> dict[str, tuple[int, int]] | None:
    """A summary read back from sacct (None: the field holds no summary of ours)."""
    text = text.strip()
    if not _OURS.fullmatch(text):
        return None
    out = {}
    for part in text[len(TAG):].split(","):
        k, v = part.split("=")
        i, o = v.split("/")
        out[k] = (int(i), int(o))
    return out


def may_write(current: str) -> bool:
    """True if the field is empty or holds only a summary of ours (never another tool's text)."""
    return current.strip() == "" or parse(current) is not None


@dataclass
class Written:
    """What one run of netacct-sacct did."""

    written: int = 0
    not_finished: int = 0  # SLURM does not have the job finished, or nodes have not shipped yet
    foreign: list[int] = field(default_factory=list)  # jobs whose field holds another tool's text


def _candidates(led: Ledger, cluster: str, limit: int) -> dict[int, tuple[int, int]]:
    """Jobs with no running row whose rows arrived after their summary was written (or that
    have none): {job id: (nodes of the newest run, newest run)}."""
    rows = led.query(
        "SELECT j.job_id, MAX(j.restart) FROM jobs j LEFT JOIN sacct_summaries s ON s.cluster = j.cluster "
        "AND s.job_id = j.job_id WHERE j.cluster = %s GROUP BY j.job_id "
        "HAVING SUM(j.state = 'running') = 0 AND (MAX(s.written_at) IS NULL OR MAX(j.shipped_at) >= MAX(s.written_at)) "
        "ORDER BY j.job_id LIMIT %s", (cluster, limit))
    out: dict[int, tuple[int, int]] = {}
    for job_id, restart in rows:
        n = led.query("SELECT COUNT(*) FROM jobs WHERE cluster = %s AND job_id = %s AND restart = %s",
                      (cluster, job_id, restart))[0][0]
        out[int(job_id)] = (int(n), int(restart))
    return out


def _traffic(led: Ledger, cluster: str, job_id: int) -> dict[str, tuple[int, int]]:
    rows = led.query(f"SELECT class, SUM({FIELDS[0]}), SUM({FIELDS[1]}) FROM traffic WHERE cluster = %s "
                     "AND job_id = %s GROUP BY class", (cluster, job_id))
    return {str(k): (int(i), int(o)) for k, i, o in rows}


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise LedgerError(f"{argv[0]} is not installed (netacct-sacct runs where sacctmgr can "
                          "modify jobs: the slurmdbd host, as root or a SLURM admin)") from None
    except subprocess.TimeoutExpired:
        raise LedgerError(f"{argv[0]} did not answer in 120 s") from None


def sacct_jobs(cluster: str, job_ids: Sequence[int], field_: str) -> dict[int, tuple[int, str, str, str]]:
    """{job id: (NNodes, state, the field's text, sacct's JobID)} as slurmdbd has them. The
    JobID names an array task as ARRAY_TASK: sacctmgr's jobid=<raw id> of an array's first
    task would select every task of the array."""
    out: dict[int, tuple[int, str, str, str]] = {}
    for i in range(0, len(job_ids), 200):
        chunk = job_ids[i:i + 200]
        r = _run(["sacct", "-M", cluster, "-X", "-n", "-P", "-j", ",".join(map(str, chunk)),
                  "-o", f"JobIDRaw,JobID,NNodes,State,{field_}"])
        if r.returncode != 0:
            raise LedgerError(f"sacct: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        for line in r.stdout.splitlines():
            parts = line.split("|", 4)
            if len(parts) == 5 and parts[0].isdigit():
                out[int(parts[0])] = (int(parts[2] or 0), parts[3].split(" ")[0], parts[4], parts[1])
    return out


def write_summaries(led: Ledger, cluster: str, field_: str, limit: int = 1000) -> Written:
    """Write the summary of every finished, fully shipped job not yet written (or changed since)."""
    done = Written()
    cands = _candidates(led, cluster, limit)
    if not cands:
        return done
    slurm = sacct_jobs(cluster, sorted(cands), field_)
    for job_id, (nodes, _restart) in sorted(cands.items()):
        info = slurm.get(job_id)
        if info is None or info[1] not in FINISHED or nodes < info[0]:
            done.not_finished += 1
            continue
        if not may_write(info[2]):
            done.foreign.append(job_id)
            continue
        text = summary(_traffic(led, cluster, job_id))
        if info[2].strip() != text:
            r = _run(["sacctmgr", "-i", "modify", "job", "where", f"cluster={cluster}", f"jobid={info[3]}",
                      "set", f"{field_}={text}"])
            if r.returncode != 0:
                raise LedgerError(f"sacctmgr: job {job_id}: "
                                  f"{r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        with led.errors():
            cur = led.conn.cursor()
            cur.execute("INSERT INTO sacct_summaries (cluster, job_id, summary) VALUES (%s, %s, %s) "
                        "ON DUPLICATE KEY UPDATE summary = VALUES(summary), written_at = CURRENT_TIMESTAMP",
                        (cluster, job_id, text))
            led.conn.commit()
        done.written += 1
    return done

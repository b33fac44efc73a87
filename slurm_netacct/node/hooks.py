"""The prolog's and the epilog's work for one job, from SLURM's environment: lock, do, answer."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from .. import naming
from ..config import Config
from ..errors import JobIdError, NetacctError
from ..store import db as store
from . import lifecycle
from .lifecycle import Defer
from .locks import job_lock

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # SLURM runs hooks with none


def job_info(env: Mapping[str, str]) -> store.JobInfo:
    """The job as SLURM describes it to a prolog/epilog; JobIdError if SLURM_JOB_ID is bad."""
    raw = env.get("SLURM_JOB_ID", env.get("SLURM_JOBID"))
    try:
        job_id = naming.parse_job_id(raw)
    except ValueError as exc:
        raise JobIdError(f"SLURM_JOB_ID: {exc}") from None

    def opt(name: str) -> str | None:
        value = env.get(name)
        return value if value else None

    uid = opt("SLURM_JOB_UID")
    restart = opt("SLURM_JOB_RESTART_COUNT")
    node = opt("SLURMD_NODENAME") or naming.short_hostname()
    return store.JobInfo(
        job_id=job_id,
        node=node,
        restart=int(restart) if restart and restart.isdigit() else 0,
        user=opt("SLURM_JOB_USER"),
        uid=int(uid) if uid and uid.isdigit() else None,
        account=opt("SLURM_JOB_ACCOUNT"),
        partition=opt("SLURM_JOB_PARTITION"),
        host=opt("NETACCT_HOST"),  # set by netacct-hook: the daemon's host name may differ
    )


def show_job_id(value: str | None) -> str:
    """The job id as it may appear in a log line: digits as they are, anything else quoted."""
    if value is None:
        return "?"
    return value if value.isdigit() and len(value) <= 20 else repr(value)[:40]


def run_hook(which: str, env: Mapping[str, str], cfg: Config, log: logging.Logger,
             resolv_conf: Path | None = None, defer: Defer | None = None) -> tuple[int, str]:
    """Do the prolog's or the epilog's work for the job in env; (exit code, one-line error)."""
    ident = f"netacct-{which}"
    jid = show_job_id(env.get("SLURM_JOB_ID"))
    try:
        info = job_info(env)
        with job_lock(info.job_id):
            if which == "prolog":
                lifecycle.setup_job(cfg, info, resolv_conf=resolv_conf)
            else:
                done = lifecycle.teardown(cfg, info, defer=defer)
                if done.spooled is not None:  # not lost, and no reason to drain the node
                    return 0, (f"{ident}: job {jid}: {done.db_error}; record spooled to {done.spooled} "
                               "(stored when the database can be written again)")
        return 0, ""
    except NetacctError as exc:
        log.error("job %s: %s failed (exit %d): %s", jid, which, exc.exit_code, exc)
        return exc.exit_code, f"{ident}: job {jid}: {exc}"
    except Exception as exc:  # a bug: still one line, and a distinct exit code
        log.exception("job %s: %s crashed", jid, which)
        return 1, f"{ident}: job {jid}: internal error: {type(exc).__name__}: {exc}"

"""Entry points for SLURM's Prolog= and Epilog=: read the SLURM environment, log, exit codes."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from . import config as config_mod
from . import lifecycle, naming, store
from .errors import JobIdError, NetacctError
from .log import setup as setup_log

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


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
    )


def _show(value: str | None) -> str:
    """The job id as it may appear in a log line: digits as they are, anything else quoted."""
    if value is None:
        return "?"
    return value if value.isdigit() and len(value) <= 20 else repr(value)[:40]


def _run(which: str, env: Mapping[str, str]) -> int:
    os.environ.setdefault("PATH", SAFE_PATH)  # SLURM runs prologs with no PATH at all
    os.umask(0o077)
    ident = f"netacct-{which}"
    log = None
    try:
        cfg = config_mod.load()
        log = setup_log(cfg.log_file, ident)
        info = job_info(env)
        if which == "prolog":
            lifecycle.setup_job(cfg, info)
        else:
            lifecycle.teardown_job(cfg, info)
        return 0
    except NetacctError as exc:
        jid = _show(env.get("SLURM_JOB_ID"))
        msg = f"{ident}: job {jid}: {exc}"
        if log is not None:
            log.error("job %s: %s failed (exit %d): %s", jid, which, exc.exit_code, exc)
        print(msg, file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # a bug: still one line, and a distinct exit code
        jid = _show(env.get("SLURM_JOB_ID"))
        if log is not None:
            log.exception("job %s: %s crashed", jid, which)
        print(f"{ident}: job {jid}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def prolog_main() -> None:
    sys.exit(_run("prolog", os.environ))


def epilog_main() -> None:
    sys.exit(_run("epilog", os.environ))


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("prolog", "epilog"):
        print("usage: python -m slurm_netacct.hooks prolog|epilog", file=sys.stderr)
        sys.exit(2)
    sys.exit(_run(sys.argv[1], os.environ))

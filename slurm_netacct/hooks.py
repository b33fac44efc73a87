"""Entry points for SLURM's Prolog= and Epilog=: read the SLURM environment, log, exit codes."""

from __future__ import annotations

import fcntl
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from . import config as config_mod
from . import lifecycle, naming, store
from .errors import JobIdError, NetacctError, SetupError
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
        host=opt("NETACCT_HOST"),  # set by netacct-hook: the daemon's host name may differ
    )


def _show(value: str | None) -> str:
    """The job id as it may appear in a log line: digits as they are, anything else quoted."""
    if value is None:
        return "?"
    return value if value.isdigit() and len(value) <= 20 else repr(value)[:40]


LOCK_DIR = Path("/run/slurm-netacct/locks")
LOCK_STRIPES = 256


@contextmanager
def job_lock(info: store.JobInfo) -> Iterator[None]:
    """Serialise work on one job on one node (the daemon and a fallback hook may race).

    A fixed set of lock files (job id modulo 256): nothing accumulates in /run."""
    path = LOCK_DIR / f"stripe-{info.job_id % LOCK_STRIPES}"
    try:
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:  # e.g. /run read-only or full: nothing has been made yet
        raise SetupError(f"cannot create the job lock {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def run_hook(which: str, env: Mapping[str, str], cfg: config_mod.Config, log: logging.Logger,
             resolv_conf: Path | None = None,
             defer: Callable[[Callable[[], object]], None] | None = None) -> tuple[int, str]:
    """Do the prolog's or the epilog's work for the job in env; (exit code, one-line error)."""
    ident = f"netacct-{which}"
    jid = _show(env.get("SLURM_JOB_ID"))
    try:
        info = job_info(env)
        with job_lock(info):
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


def _run(which: str, env: Mapping[str, str]) -> int:
    os.environ.setdefault("PATH", SAFE_PATH)  # SLURM runs prologs with no PATH at all
    os.umask(0o077)
    ident = f"netacct-{which}"
    try:
        cfg = config_mod.load()
    except NetacctError as exc:
        print(f"{ident}: job {_show(env.get('SLURM_JOB_ID'))}: {exc}", file=sys.stderr)
        return exc.exit_code
    log = setup_log(cfg.log_file, ident)
    rc, msg = run_hook(which, env, cfg, log)
    if msg:
        print(msg, file=sys.stderr)
    return rc


def prolog_main() -> None:
    sys.exit(_run("prolog", os.environ))


def epilog_main() -> None:
    sys.exit(_run("epilog", os.environ))


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("prolog", "epilog"):
        print("usage: python -m slurm_netacct.hooks prolog|epilog", file=sys.stderr)
        sys.exit(2)
    sys.exit(_run(sys.argv[1], os.environ))

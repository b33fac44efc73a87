"""The Prolog= and Epilog= entry points (netacct-prolog, netacct-epilog, and the fallback of
client/netacct-hook: `python -m slurm_netacct.cli.hooks prolog|epilog`)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from .. import config as config_mod
from ..errors import NetacctError
from ..log import setup as setup_log
from ..node import hooks


def _run(which: str, env: Mapping[str, str]) -> int:
    os.environ.setdefault("PATH", hooks.SAFE_PATH)  # SLURM runs prologs with no PATH at all
    os.umask(0o077)
    ident = f"netacct-{which}"
    try:
        cfg = config_mod.load()
    except NetacctError as exc:
        print(f"{ident}: job {hooks.show_job_id(env.get('SLURM_JOB_ID'))}: {exc}", file=sys.stderr)
        return exc.exit_code
    log = setup_log(cfg.log_file, ident)
    rc, msg = hooks.run_hook(which, env, cfg, log)
    if msg:
        print(msg, file=sys.stderr)
    return rc


def prolog_main() -> None:
    sys.exit(_run("prolog", os.environ))


def epilog_main() -> None:
    sys.exit(_run("epilog", os.environ))


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("prolog", "epilog"):
        print("usage: python -m slurm_netacct.cli.hooks prolog|epilog", file=sys.stderr)
        sys.exit(2)
    sys.exit(_run(sys.argv[1], os.environ))

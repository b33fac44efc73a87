"""netacct-reconcile: store what jobs no longer on this node left behind, and remove the rest."""

from __future__ import annotations

import argparse
import os

from .. import config as config_mod
from ..log import setup as setup_log
from ..node import agreement, hooks, reaper
from .common import NODE_HELP_ASK, Command, Parser, job_ids, node_name

RECONCILE_FAILED = 7  # SetupError's code: something could not be removed


def _arguments(p: Parser) -> None:
    p.add_argument("--node", metavar="NAME", help=NODE_HELP_ASK)
    p.add_argument("--active", metavar="ID[,ID...]",
                   help="the jobs active on this node, instead of asking squeue ('' for none)")
    p.add_argument("--dry-run", action="store_true", help="only list what would be reconciled")
    p.add_argument("--remove-node", action="store_true",
                   help="then, if no job is left on this node, also remove what the prologs set up for "
                        "all jobs: the node's NAT rules, and forwarding where a prolog turned it on "
                        "(to uninstall slurm-netacct)")


def _body(args: argparse.Namespace) -> int | None:
    os.environ.setdefault("PATH", hooks.SAFE_PATH)
    os.umask(0o077)
    cfg = config_mod.load()
    log = setup_log(cfg.log_file, COMMAND.prog)
    for line in agreement.disagreements(cfg):  # run before slurmd starts: the place to say it
        log.warning("%s", line)
        COMMAND.complain(f"warning: {line}")
    node = node_name(args.node, str(cfg.db))
    if args.active is not None:
        active = (job_ids([args.active], "--active") or set()) if args.active.strip() else set()
    else:
        active = reaper.slurm_active_jobs(node)
    result = reaper.reconcile(cfg, node, active, dry_run=args.dry_run)
    if active is None:
        COMMAND.complain(f"SLURM cannot be asked which jobs run on {node}: nothing touched "
                         f"({len(result.found)} jobs with leftovers)")
        return RECONCILE_FAILED if args.remove_node else None
    for job, what in sorted(result.found.items()):
        if job in result.kept:
            continue
        done = result.reconciled.get(job) or (f"FAILED: {result.failed[job]}" if job in result.failed
                                              else "would be reconciled")
        print(f"job {job}: {'; '.join(what)} -> {done}")
    if result.failed:
        return RECONCILE_FAILED
    if args.remove_node and not args.dry_run:
        for what in reaper.remove_node(cfg, node):
            print(f"node {node}: removed {what}")
    return None


COMMAND = Command("netacct-reconcile",
                  "Find what slurm-netacct left on this node for jobs that are no longer here (crashes, "
                  "reboots), store the counters that still exist (state \"reconciled\") and remove the "
                  "rest. Asks SLURM (squeue) which jobs are active on the node; if SLURM cannot answer, "
                  "touches nothing.", _arguments, _body)
main = COMMAND.main

"""netacct-sacct: write each finished job's traffic summary from the ledger into slurmdbd."""

from __future__ import annotations

import argparse
import os

from .. import config as config_mod
from ..errors import ConfigError
from ..log import setup as setup_log
from ..store import ledger, sacct
from .common import Command, Parser

DESCRIPTION = """\
Write a compact traffic summary of every finished job whose nodes have all shipped their final
records into the job's record in slurmdbd (sacctmgr), in the [ledger] sacct_field (default
SystemComment), so that `sacct -j ID -o JobID,SystemComment` shows it:
na1:lan=IN/OUT,wan=IN/OUT (bytes received and sent per class). A field that holds another
tool's text is left alone (counted, and the first such job named). Run it where sacctmgr may
modify jobs (the slurmdbd host, as root), from a timer. Prints one summary line."""


def _arguments(p: Parser) -> None:
    p.add_argument("-M", "--clusters", metavar="CLUSTER", help="this cluster's jobs (default: [ledger] cluster)")
    p.add_argument("--limit", type=int, default=1000, metavar="N", help="at most N jobs a run (default 1000)")


def _body(args: argparse.Namespace) -> None:
    cfg = config_mod.load()
    os.umask(0o077)
    setup_log(cfg.log_file, COMMAND.prog)
    if cfg.ledger is None:
        raise ConfigError("no [ledger] in the configuration")
    cluster = args.clusters or cfg.ledger.cluster
    with ledger.connect(cfg.ledger, migrate=True) as led:
        done = sacct.write_summaries(led, cluster, cfg.ledger.sacct_field, max(1, args.limit))
    foreign = (f"; {len(done.foreign)} jobs left alone, their {cfg.ledger.sacct_field} holds another "
               f"tool's text (first: job {done.foreign[0]})") if done.foreign else ""
    print(f"{cluster}: {done.written} summaries written to {cfg.ledger.sacct_field}, "
          f"{done.not_finished} jobs not finished or not fully shipped{foreign}")


COMMAND = Command("netacct-sacct", DESCRIPTION, _arguments, _body,
                  summary="Write each finished job's traffic summary from the ledger into slurmdbd, "
                          "so that sacct shows it")
main = COMMAND.main

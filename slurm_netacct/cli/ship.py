"""netacct-ship: send this node's job records to the cluster ledger (MariaDB)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .. import config as config_mod
from ..errors import ConfigError
from ..log import setup as setup_log
from ..store import ship
from .common import NODE_HELP_ASK, Command, Parser, node_name

DESCRIPTION = """\
Send this node's job records (final ones, and the last sample of running jobs) to the cluster
ledger configured in [ledger]: every row that changed since the last run, in batches, one
transaction each. Sending a record twice stores it once, so an outage or a crash loses nothing
and counts nothing twice: the next run resumes at the node database's watermark. Run it from a
timer (contrib/netacct-ship.timer); netacct-daemon also ships every [ledger] interval seconds.
Prints one summary line."""


def _arguments(p: Parser) -> None:
    p.add_argument("--node", metavar="NAME", help=NODE_HELP_ASK + "; selects the database (`%%n` in db)")
    p.add_argument("--db", metavar="PATH", type=Path, help="the node database to ship (default: the configured db)")


def _body(args: argparse.Namespace) -> None:
    cfg = config_mod.load()
    node = node_name(args.node, str(cfg.db))
    os.umask(0o077)
    setup_log(cfg.log_file, COMMAND.prog)
    if cfg.ledger is None:
        raise ConfigError("no [ledger] in the configuration: nowhere to ship to")
    path = args.db or cfg.db_for(node)
    done = ship.ship(path, cfg.ledger)
    print(f"{node}: {done.rows} rows shipped in {done.batches} batches to {cfg.ledger.url} "
          f"(cluster {cfg.ledger.cluster}); watermark {done.watermark}")


COMMAND = Command("netacct-ship", DESCRIPTION, _arguments, _body,
                  summary="Send this node's job records to the cluster ledger (MariaDB), "
                          "exactly once in effect")
main = COMMAND.main

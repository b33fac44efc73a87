"""netacct-sample: store the current counters of every job running on this node."""

from __future__ import annotations

import argparse
import os

from .. import config as config_mod
from ..log import setup as setup_log
from ..node import sample
from .common import NODE_HELP_ASK, Command, Parser, node_name


def _arguments(p: Parser) -> None:
    p.add_argument("--node", metavar="NAME", help=NODE_HELP_ASK)


def _body(args: argparse.Namespace) -> int | None:
    cfg = config_mod.load()
    node = node_name(args.node, str(cfg.db))
    os.umask(0o077)
    setup_log(cfg.log_file, COMMAND.prog)
    result = sample.sample_node(cfg, node)
    print(f"{node}: {result.sampled} sampled, {result.skipped} skipped, {result.errors} errors")
    if not result.failures:
        return None
    job_id, exc = next(iter(result.failures.items()))
    more = f" (and {result.errors - 1} more jobs; see the log)" if result.errors > 1 else ""
    COMMAND.complain(f"job {job_id}: {exc}{more}")
    return exc.exit_code


COMMAND = Command("netacct-sample",
                  "Store the current counters of every job running on this node in the node database "
                  "(the job stays running; its epilog stores the final counters). Run it periodically: "
                  "after a node crash, only the traffic since the last sample is lost. Prints one "
                  "summary line.", _arguments, _body)
main = COMMAND.main

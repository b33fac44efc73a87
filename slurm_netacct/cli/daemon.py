"""netacct-daemon: the resident service that does the prolog's and epilog's work."""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

from .. import naming
from ..errors import UsageError
from ..node import hooks
from ..node.daemon import Daemon
from .common import Command, Parser

DESCRIPTION = """\
The resident service for the prolog and epilog: Python and its libraries are loaded once, so a
prolog costs the kernel's work and little else. The prolog and epilog executables
(client/netacct-hook) hand it their job over a root-only unix socket; if it is not running,
does not answer in time or runs with another configuration, they do the work themselves."""


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1 or int(text) > 256:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 1 to 256")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(text)


def _arguments(p: Parser) -> None:
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="config file (default: $NETACCT_CONFIG, /etc/slurm/netacct.toml)")
    p.add_argument("--socket", type=Path, metavar="PATH",
                   default=Path(os.environ.get("NETACCT_SOCKET", naming.DAEMON_SOCKET)),
                   help=f"the socket to listen on (default: $NETACCT_SOCKET, {naming.DAEMON_SOCKET})")
    p.add_argument("--workers", type=_positive, default=4, metavar="N",
                   help="worker threads: jobs worked on at once (default 4)")
    p.add_argument("--max-jobs", type=_count, default=0, metavar="N",
                   help="exit after N prolog/epilog requests, for the service manager to restart it "
                        "(0, the default: never; memory stays flat without it)")


def _body(args: argparse.Namespace) -> None:
    os.environ.setdefault("PATH", hooks.SAFE_PATH)
    os.umask(0o077)
    if str(args.socket) == "":
        raise UsageError("--socket: an empty path")
    # SIGTERM/SIGINT must reach the main thread, which is blocked in accept(): the kernel may
    # deliver a process signal to any thread that does not block it, and a worker receiving it
    # would leave accept() asleep (seen: a stop ignored until a second SIGTERM). The threads
    # start with both blocked (they inherit this mask); the main thread unblocks them below.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    d = Daemon(args.config, args.socket, args.workers, args.max_jobs)
    d.start()
    signal.signal(signal.SIGTERM, lambda *_: d.stop())
    signal.signal(signal.SIGINT, lambda *_: d.stop())
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)  # one that came meanwhile is handled now
    print(f"{COMMAND.prog}: listening on {args.socket}", flush=True)
    d.serve_forever()
    d.drain()


COMMAND = Command("netacct-daemon", DESCRIPTION, _arguments, _body,
                  summary="The resident service that does the prolog's and the epilog's work "
                          "(see \"Installing on a cluster\", step 6)")
main = COMMAND.main

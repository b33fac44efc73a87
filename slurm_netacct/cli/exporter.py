"""netacct-exporter: running jobs' live counters for Prometheus (a textfile, or /metrics)."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from .. import config as config_mod
from ..errors import UsageError
from ..log import setup as setup_log
from ..node import exporter
from .common import NODE_HELP, Command, Parser, node_name


def _arguments(p: Parser) -> None:
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--textfile", metavar="PATH", type=Path,
                      help="write the metrics to PATH (e.g. /var/lib/prometheus/node-exporter/netacct.prom)")
    mode.add_argument("--listen", metavar="[ADDR:]PORT",
                      help="serve http://ADDR:PORT/metrics until SIGTERM (default ADDR: 0.0.0.0, all IPv4 "
                           "interfaces; an IPv6 address in brackets: [::1]:9835)")
    p.add_argument("--node", metavar="NAME", help=NODE_HELP)


def parse_listen(value: str) -> tuple[str, int]:
    """'[ADDR:]PORT' -> (addr, port); IPv6 addresses in brackets; UsageError otherwise."""
    if value.startswith("["):
        addr, sep, port_s = value[1:].partition("]:")
        if not sep or not addr:
            raise UsageError(f"--listen {value!r}: expected [ADDR]:PORT")
    elif ":" in value:
        addr, _, port_s = value.rpartition(":")
        if not addr or ":" in addr:
            raise UsageError(f"--listen {value!r}: put an IPv6 address in brackets: [ADDR]:PORT")
    else:
        addr, port_s = "0.0.0.0", value
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise UsageError(f"--listen {value!r}: the port must be a number from 0 to 65535")
    return addr, int(port_s)


def _body(args: argparse.Namespace) -> None:
    node = node_name(args.node)
    listen = parse_listen(args.listen) if args.listen is not None else None
    cfg = config_mod.load()
    setup_log(cfg.log_file, COMMAND.prog)
    if listen is None:
        exporter.write_textfile(cfg, node, args.textfile)
        return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server, thread = exporter.serve(cfg, node, *listen)
    try:
        host, port = server.server_address[:2]
        shown = f"[{host}]" if ":" in str(host) else host
        print(f"{COMMAND.prog}: serving http://{shown}:{port}/metrics for node {node}", flush=True)
        while not stop.wait(1):
            pass
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


COMMAND = Command("netacct-exporter",
                  "Export the live counters of the jobs running on this node to Prometheus: write a file "
                  "for node_exporter's textfile collector (once, atomically; run it from a timer), or "
                  "serve /metrics over HTTP.", _arguments, _body)
main = COMMAND.main

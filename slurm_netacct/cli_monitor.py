"""Command-line entry points for live usage: netacct-sample and netacct-exporter."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from . import config as config_mod
from . import exporter, sample
from .cli import NODE_HELP, _epilog, _fail, _node, _Parser
from .errors import NetacctError, UsageError
from .log import setup as setup_log


# --------------------------------------------------------------------------- netacct-sample

def sample_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="netacct-sample",
                description="Store the current counters of every job running on this node in the "
                            "node database (the job stays running; its epilog stores the final "
                            "counters). Run it periodically: after a node crash, only the traffic "
                            "since the last sample is lost. Prints one summary line.",
                epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--node", metavar="NAME", help=NODE_HELP)
    return p


def sample_main(argv: Sequence[str] | None = None) -> None:
    prog = "netacct-sample"
    try:
        args = sample_parser().parse_args(argv)
        node = _node(prog, args.node)
        cfg = config_mod.load()
        os.umask(0o077)
        setup_log(cfg.log_file, prog)
        result = sample.sample_node(cfg, node)
        print(f"{node}: {result.sampled} sampled, {result.skipped} skipped, {result.errors} errors")
        if result.failures:
            job_id, exc = next(iter(result.failures.items()))
            more = f" (and {result.errors - 1} more jobs; see the log)" if result.errors > 1 else ""
            print(f"{prog}: job {job_id}: {exc}{more}", file=sys.stderr)
            sys.exit(exc.exit_code)
    except NetacctError as exc:
        sys.exit(_fail(prog, exc))


# --------------------------------------------------------------------------- netacct-exporter

def exporter_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="netacct-exporter",
                description="Export the live counters of the jobs running on this node to "
                            "Prometheus: write a file for node_exporter's textfile collector "
                            "(once, atomically; run it from a timer), or serve /metrics over HTTP.",
                epilog=_epilog(),
                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--textfile", metavar="PATH", type=Path,
                      help="write the metrics to PATH (e.g. /var/lib/prometheus/node-exporter/netacct.prom)")
    mode.add_argument("--listen", metavar="[ADDR:]PORT",
                      help="serve http://ADDR:PORT/metrics until SIGTERM (default ADDR: 0.0.0.0, all IPv4 "
                           "interfaces; an IPv6 address in brackets: [::1]:9835)")
    p.add_argument("--node", metavar="NAME", help=NODE_HELP)
    return p


def parse_listen(value: str) -> tuple[str, int]:
    """'[ADDR:]PORT' -> (addr, port); IPv6 addresses in brackets; UsageError otherwise."""
    prog = "netacct-exporter"
    if value.startswith("["):
        addr, sep, port_s = value[1:].partition("]:")
        if not sep or not addr:
            raise UsageError(f"{prog}: --listen {value!r}: expected [ADDR]:PORT")
    elif ":" in value:
        addr, _, port_s = value.rpartition(":")
        if not addr or ":" in addr:
            raise UsageError(f"{prog}: --listen {value!r}: put an IPv6 address in brackets: [ADDR]:PORT")
    else:
        addr, port_s = "0.0.0.0", value
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise UsageError(f"{prog}: --listen {value!r}: the port must be a number from 0 to 65535")
    return addr, int(port_s)


def exporter_main(argv: Sequence[str] | None = None) -> None:
    prog = "netacct-exporter"
    try:
        args = exporter_parser().parse_args(argv)
        node = _node(prog, args.node)
        listen = parse_listen(args.listen) if args.listen is not None else None
        cfg = config_mod.load()
        setup_log(cfg.log_file, prog)
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
            print(f"{prog}: serving http://{shown}:{port}/metrics for node {node}", flush=True)
            while not stop.wait(1):
                pass
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=10)
    except NetacctError as exc:
        sys.exit(_fail(prog, exc))

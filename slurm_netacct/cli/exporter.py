"""netacct-exporter: running jobs' live counters for Prometheus (a textfile, or /metrics)."""

from __future__ import annotations

import argparse
import signal
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

from .. import config as config_mod
from .. import log
from ..errors import NetacctError, UsageError
from ..log import setup as setup_log
from ..node import exporter, webconfig
from .common import NODE_HELP, Command, Parser, node_name


def _arguments(p: Parser) -> None:
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--textfile", metavar="PATH", type=Path,
                      help="write the metrics to PATH (e.g. /var/lib/prometheus/node-exporter/netacct.prom)")
    mode.add_argument("--listen", metavar="[ADDR:]PORT",
                      help="serve /metrics on ADDR:PORT until SIGTERM (default ADDR: 0.0.0.0, all IPv4 "
                           "interfaces; an IPv6 address in brackets: [::1]:9835). Beyond loopback it "
                           "needs --web-config with TLS and authentication, or --insecure-listen")
    p.add_argument("--web-config", metavar="FILE", type=Path,
                   help="with --listen: serve HTTPS and ask for basic auth as FILE says, in node_exporter's "
                        "web config format (tls_server_config: cert_file, key_file; basic_auth_users: "
                        "bcrypt hashes); re-read on SIGHUP")
    p.add_argument("--insecure-listen", action="store_true",
                   help="with --listen: serve beyond loopback without TLS or authentication (anyone who "
                        "reaches the port sees every running job's user and account)")
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
    if listen is None and (args.web_config is not None or args.insecure_listen):
        raise UsageError(f"{'--web-config' if args.web_config is not None else '--insecure-listen'} "
                         f"goes with --listen, not --textfile")
    cfg = config_mod.load()
    setup_log(cfg.log_file, COMMAND.prog)
    if listen is None:
        exporter.write_textfile(cfg, node, args.textfile)
        return
    web = webconfig.load(args.web_config) if args.web_config is not None else None
    exporter.check_exposure(listen[0], web, args.insecure_listen)
    _warn_expiry(web)
    stop, reload = threading.Event(), threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload.set())
    server, thread = exporter.serve(cfg, node, *listen, web=web)
    try:
        host, port = server.server_address[:2]
        shown = f"[{host}]" if ":" in str(host) else host
        scheme = "https" if web is not None and web.tls is not None else "http"
        how = ""
        if web is not None and web.authenticates:
            how = " (basic auth)" if web.users else " (client certificates)"
        print(f"{COMMAND.prog}: serving {scheme}://{shown}:{port}/metrics for node {node}{how}", flush=True)
        log.get().info("serving %s://%s:%s/metrics for node %s%s", scheme, shown, port, node, how)
        while not stop.wait(1):
            if reload.is_set():
                reload.clear()
                _reload(server, args.web_config, listen[0], args.insecure_listen)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _reload(server: exporter.MetricsServer, path: Path | None, addr: str, insecure: bool) -> None:
    """SIGHUP: read the web config again (a renewed certificate, changed users); on an error,
    keep serving with the one in force and say why."""
    if path is None:
        return
    try:
        web = webconfig.load(path)
        exporter.check_exposure(addr, web, insecure)
    except NetacctError as exc:
        msg = f"web config not reloaded, the previous one stays in force: {exc}"
        log.get().error("%s", msg)
        COMMAND.complain(msg)
        return
    server.web = web
    log.get().info("web config %s reloaded", path)
    _warn_expiry(web)


EXPIRY_WARNING = timedelta(days=14)


def _warn_expiry(web: webconfig.WebConfig | None) -> None:
    """A warning in the log when the server certificate expires within EXPIRY_WARNING (renew
    it, then SIGHUP): scrapes fail once it has expired."""
    if web is None or web.cert_not_after is None:
        return
    left = web.cert_not_after - datetime.now(UTC)
    if left < EXPIRY_WARNING:
        days = f"{left.days} day{'' if left.days == 1 else 's'}"
        log.get().warning("web config %s: the certificate expires on %s UTC, in %s: renew it, then "
                          "reload (SIGHUP)", web.path, web.cert_not_after.strftime("%Y-%m-%d %H:%M:%S"), days)


COMMAND = Command("netacct-exporter",
                  "Export the live counters of the jobs running on this node to Prometheus: write a file "
                  "for node_exporter's textfile collector (once, atomically; run it from a timer), or "
                  "serve /metrics over HTTP or HTTPS. Serving beyond loopback needs TLS and authentication "
                  "(--web-config) or --insecure-listen: refused otherwise (exit 2). A bad web config, "
                  "certificate or key exits 3; an address that cannot be bound exits 10.", _arguments, _body)
main = COMMAND.main

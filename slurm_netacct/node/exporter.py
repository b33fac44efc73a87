"""Prometheus export of running jobs' live counters: a node_exporter textfile, or /metrics over HTTP(S)."""

from __future__ import annotations

import ipaddress
import os
import socket
import socketserver
import ssl
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .. import log
from ..config import Config
from ..errors import ExportError, UsageError
from ..traffic import DIRECTIONS
from . import sample
from .webconfig import WebConfig

BYTES = "netacct_job_bytes"  # exposed as netacct_job_bytes_total
PACKETS = "netacct_job_packets"  # exposed as netacct_job_packets_total
RUNNING = "netacct_jobs_running"
READ_ERRORS = "netacct_job_read_errors"
JOB_LABELS = ("job_id", "user", "account", "node", "class", "direction")
TEXTFILE_MODE = 0o644
CONNECTION_TIMEOUT = 10.0  # seconds a client may take to finish its TLS handshake or request
TLS_HANDSHAKE = b"\x16"  # the first byte of a TLS record that opens a handshake
PLAIN_HTTP_REPLY = (b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
                    b"Connection: close\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")
REALM = "netacct-exporter"


class InsecureListenError(UsageError):
    """--listen beyond loopback without TLS and authentication, and without --insecure-listen."""


class JobCollector:
    """Counters of the jobs running on one node, read afresh at every collection.

    Only running jobs are exported: a job leaves the metrics when its epilog has run, so the
    number of series stays bounded by the jobs on the node (its final numbers are in the
    node database and in netacct-report).
    """

    def __init__(self, cfg: Config, node: str) -> None:
        self.cfg = cfg
        self.node = node

    def _families(self, live: sample.SampleResult | None) -> list[Metric]:
        nbytes = CounterMetricFamily(
            BYTES, "IP-layer bytes of a running job's traffic, by remote class and direction "
                   "(out: sent by the job, in: received by it)", labels=JOB_LABELS)
        npackets = CounterMetricFamily(
            PACKETS, "Packets of a running job's traffic, by remote class and direction "
                     "(out: sent by the job, in: received by it)", labels=JOB_LABELS)
        running = GaugeMetricFamily(RUNNING, "Jobs running on the node", labels=("node",))
        errors = GaugeMetricFamily(READ_ERRORS, "Running jobs whose counters could not be read "
                                                "(they are missing from netacct_job_*)", labels=("node",))
        if live is not None:
            for job_id in sorted(live.traffic):
                info = live.jobs[job_id]
                for klass, values in live.traffic[job_id].items():
                    for direction in DIRECTIONS:
                        labels = [str(job_id), info.user or "", info.account or "", self.node,
                                  klass, direction]
                        nbytes.add_metric(labels, values[f"{direction}_bytes"])
                        npackets.add_metric(labels, values[f"{direction}_packets"])
            running.add_metric([self.node], live.sampled + live.errors)
            errors.add_metric([self.node], live.errors)
        return [nbytes, npackets, running, errors]

    def describe(self) -> Iterator[Metric]:
        """The metric names, without reading any counters (used when registering)."""
        yield from self._families(None)

    def collect(self) -> Iterator[Metric]:
        yield from self._families(sample.read_live(self.cfg, self.node))


def registry(cfg: Config, node: str) -> CollectorRegistry:
    """A registry holding only the job collector (no process or Python metrics)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(JobCollector(cfg, node))
    return reg


def render(cfg: Config, node: str) -> bytes:
    """The metrics of node's running jobs in the Prometheus text format."""
    return generate_latest(registry(cfg, node))


def write_textfile(cfg: Config, node: str, path: Path) -> None:
    """Write the metrics for node_exporter's textfile collector, atomically.

    The text goes to a temporary file in the same directory (named so that the collector,
    which reads only `*.prom`, ignores it), is flushed to disk, made mode 0644 and renamed
    over `path`: a reader sees the old file or the new one, never a part of one.
    """
    data = render(cfg, node)  # read everything first: a failure leaves the old file alone
    directory = path.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc.strerror}") from None
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, TEXTFILE_MODE)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise ExportError(f"cannot write {path}: {exc.strerror}") from None
    try:  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass  # the new file is in place; only its survival of a crash is less certain


class _Handler(WSGIRequestHandler):
    """One connection: bounded in time (a client that stalls is dropped), logging nothing itself."""

    timeout = CONNECTION_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        pass


class MetricsServer(ThreadingMixIn, WSGIServer):
    """/metrics over HTTP or HTTPS, one thread per connection, basic auth if configured.

    The TLS handshake happens in the connection's thread (not in accept(), as with a wrapped
    listening socket), so a client that connects and says nothing delays no one else. `web`
    may be replaced while serving (a reloaded config): each connection uses the one current
    when it arrived."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily, web: WebConfig | None,
                 app: Callable[..., Iterable[bytes]]) -> None:
        self.address_family = family
        self.web = web
        super().__init__(address, _Handler)
        self.set_app(self._guard(app))

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup of the address (socket.getfqdn), which
        waits for the resolver's timeout on a node whose DNS does not answer for it."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), port
        self.setup_environ()

    def finish_request(self, request: Any, client_address: Any) -> None:
        web = self.web
        if web is None or web.tls is None:
            return super().finish_request(request, client_address)
        peer = _peer(client_address)
        request.settimeout(CONNECTION_TIMEOUT)
        try:
            first = request.recv(1, socket.MSG_PEEK)
            if first and first != TLS_HANDSHAKE:  # not TLS: a plain HTTP request, most likely
                if first.isalpha():
                    request.sendall(PLAIN_HTTP_REPLY)
                log.get().info("connection from %s refused: plain HTTP on the HTTPS port", peer)
                return
            conn = web.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.get().info("connection from %s: TLS handshake failed: %s", peer,
                           getattr(exc, "reason", None) or exc.strerror or exc)
            return
        try:
            super().finish_request(conn, client_address)
        finally:
            try:
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed (reset, timed out): one line in the log, not a traceback."""
        exc = sys.exc_info()[1]
        log.get().info("connection from %s: %s", _peer(client_address), one_line(str(exc)))

    def _guard(self, app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
        """app behind basic authentication (if the web config has users) and its headers."""

        def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            web = self.web
            extra = web.headers if web is not None else []

            def respond(status: str, headers: list[tuple[str, str]], *rest: Any) -> Any:
                return start_response(status, headers + extra, *rest)

            if web is not None and web.users:
                user, why = web.check(environ.get("HTTP_AUTHORIZATION"))
                if user is None:
                    log.get().warning("scrape from %s refused: %s", environ.get("REMOTE_ADDR", "?"), one_line(why))
                    respond("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8"),
                                                 ("WWW-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"')])
                    return [b"Unauthorized\n"]
            return app(environ, respond)

        return guarded


def one_line(text: str) -> str:
    """text with line breaks and other unprintable characters escaped, for one log line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _peer(client_address: Any) -> str:
    host, port = client_address[:2] if isinstance(client_address, tuple) else (client_address, 0)
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _family(addr: str, port: int) -> tuple[socket.AddressFamily, str]:
    try:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ExportError(f"cannot listen on {addr}:{port}: {exc.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr[0]


def is_loopback(addr: str) -> bool:
    """Whether every address addr stands for is a loopback one (127.0.0.0/8, ::1)."""
    try:
        infos = socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def check_exposure(addr: str, web: WebConfig | None, insecure: bool) -> None:
    """InsecureListenError unless addr is loopback, or the web config gives TLS and
    authentication, or the caller said explicitly (insecure) that anyone may scrape."""
    if insecure or is_loopback(addr):
        return
    missing = []
    if web is None or web.tls is None:
        missing.append("TLS (tls_server_config)")
    if web is None or not web.authenticates:
        missing.append("authentication (basic_auth_users or client_auth_type RequireAndVerifyClientCert)")
    if missing:
        shown = f"[{addr}]" if ":" in addr else addr
        raise InsecureListenError(
            f"refusing to serve every running job's user and account on {shown}, beyond loopback, without "
            f"{' and '.join(missing)}: give them in --web-config FILE, or pass --insecure-listen")


def serve(cfg: Config, node: str, addr: str, port: int,
          web: WebConfig | None = None) -> tuple[MetricsServer, threading.Thread]:
    """Serve /metrics on addr:port from a daemon thread (port 0: any free port), over TLS and
    with basic authentication as the web config says (None: plain HTTP, anyone).

    Every scrape reads the counters afresh. Returns the server (its server_address holds the
    port actually bound; stop it with shutdown() and server_close()) and its thread.
    """
    family, host = _family(addr, port)
    try:
        server = MetricsServer((host, port), family, web, make_wsgi_app(registry(cfg, node)))
    except OSError as exc:
        raise ExportError(f"cannot listen on {addr}:{port}: {exc.strerror or exc}") from None
    thread = threading.Thread(target=server.serve_forever, name="netacct-exporter", daemon=True)
    thread.start()
    return server, thread

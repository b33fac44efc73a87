"""Prometheus export of running jobs' live counters: a node_exporter textfile, or /metrics."""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..config import Config
from ..errors import ExportError
from ..traffic import DIRECTIONS
from . import sample

BYTES = "netacct_job_bytes"  # exposed as netacct_job_bytes_total
PACKETS = "netacct_job_packets"  # exposed as netacct_job_packets_total
RUNNING = "netacct_jobs_running"
READ_ERRORS = "netacct_job_read_errors"
JOB_LABELS = ("job_id", "user", "account", "node", "class", "direction")
TEXTFILE_MODE = 0o644


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


def serve(cfg: Config, node: str, addr: str, port: int) -> tuple[WSGIServer, threading.Thread]:
    """Serve /metrics on addr:port from a daemon thread (port 0: any free port).

    Every scrape reads the counters afresh. Returns the server (its server_address holds the
    port actually bound; stop it with shutdown() and server_close()) and its thread.
    """
    try:
        return start_http_server(port, addr, registry(cfg, node))
    except OSError as exc:
        raise ExportError(f"cannot listen on {addr}:{port}: {exc.strerror or exc}") from None

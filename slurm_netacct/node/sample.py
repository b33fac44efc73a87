"""Live counters of a node's running jobs: read them, and store them as periodic samples."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sqlite_utils

from .. import counting
from ..config import Config
from ..errors import NetacctError, SetupError
from ..kernel import netns
from ..log import get as get_log
from ..naming import JobNames
from ..states import State
from ..store import db as store
from ..store import spool as spooling
from ..traffic import Counters, Traffic, traffic_of


@dataclass
class SampleResult:
    """What one pass over a node's running jobs found.

    `traffic` holds the jobs whose counters were read (and, for sample_node, stored);
    `skipped_jobs` those that ended while being read (their epilog removed the namespace,
    or stored the final counters first); `failures` those whose counters could not be read
    although the job is still running.
    """

    node: str
    traffic: dict[int, Traffic] = field(default_factory=dict)
    jobs: dict[int, store.JobInfo] = field(default_factory=dict)  # the same keys as traffic
    skipped_jobs: list[int] = field(default_factory=list)
    failures: dict[int, NetacctError] = field(default_factory=dict)

    @property
    def sampled(self) -> int:
        return len(self.traffic)

    @property
    def skipped(self) -> int:
        return len(self.skipped_jobs)

    @property
    def errors(self) -> int:
        return len(self.failures)


def _info(row: dict[str, Any]) -> store.JobInfo:
    return store.JobInfo(job_id=int(row["job_id"]), node=str(row["node"]), restart=int(row["restart"]),
                         user=row["user"], uid=row["uid"], account=row["account"],
                         partition=row["partition"])


def _still_running(db: sqlite_utils.Database, info: store.JobInfo) -> bool:
    row = store.job_row(db, info)
    return row is not None and row["state"] == State.RUNNING


def _pass(cfg: Config, node: str, keep: bool) -> SampleResult:
    """Read every running job's counters on node; with keep, store them as samples."""
    log = get_log()
    result = SampleResult(node=node)
    path = cfg.db_for(node)
    spool = cfg.spool_for(node)
    if not path.exists() and not (keep and spooling.spool_pending(spool, node)):
        return result  # no job has ever run here: nothing is running either
    db = store.connect(path)
    try:
        if keep:  # records an epilog could not store (the database was broken) go in first
            spooling.replay_spool(db, spool, node)
        rows = store.running_jobs(db, node)
        latest: dict[int, dict[str, Any]] = {}
        for row in sorted(rows, key=lambda r: (r["job_id"], r["restart"])):
            if row["job_id"] in latest:  # an older run of a requeued job whose epilog failed:
                result.skipped_jobs.append(int(row["job_id"]))  # the namespace is the newest run's
            latest[row["job_id"]] = row
        # Each way of counting reads all its jobs in one go (nftables: each namespace joined
        # once; iptables: one child process per family), then each job is looked at.
        by_counter: dict[str, list[counting.Counted]] = {}
        jobs: dict[int, counting.Counted] = {}
        for job_id, row in latest.items():  # the name the prolog gave it (%h may differ here)
            names = JobNames.stored(cfg, job_id, row.get("netns") or JobNames.of(cfg, job_id).netns)
            jobs[job_id] = counting.Counted(names, store.row_classes(row) or tuple(cfg.class_names))
            by_counter.setdefault(row["backend"] or "", []).append(jobs[job_id])
        prefetched: dict[str, Counters | str] = {}
        for cname, group in by_counter.items():
            counter = counting.named(cname)
            try:
                prefetched.update(counter.read_many(cfg, group))
            except NetacctError as exc:
                log.error("reading the %s counters in bulk failed (%s); one by one", counter.name, exc)
                for one in group:
                    try:
                        prefetched[one.netns] = counter.read(cfg, one)
                    except NetacctError as err:
                        prefetched[one.netns] = str(err)
        for job_id, row in latest.items():
            info = _info(row)
            job = jobs[job_id]
            got = prefetched[job.netns]
            if isinstance(got, dict):
                result.traffic[job_id] = traffic_of(got, job.classes)
                result.jobs[job_id] = info
            elif row["backend"] != counting.CGROUP and not netns.is_netns(job.names.netns_path):
                log.info("job %d: no namespace %s to sample (the job is ending)", job_id, job.netns)
                result.skipped_jobs.append(job_id)
            elif not _still_running(db, info):
                log.info("job %d: ended while being sampled (%s)", job_id, got)
                result.skipped_jobs.append(job_id)
            else:
                log.error("job %d: cannot read its counters: %s", job_id, got)
                result.failures[job_id] = SetupError(got)
        if keep and result.traffic:  # one transaction for the whole node
            ids = list(result.traffic)
            try:
                stored = store.record_samples(db, [(result.jobs[j], result.traffic[j]) for j in ids])
            except NetacctError as exc:
                log.error("cannot store the samples of %d jobs: %s", len(ids), exc)
                for j in ids:
                    result.failures[j] = exc
                    del result.traffic[j], result.jobs[j]
                return result
            for job_id, ok in zip(ids, stored):
                if not ok:
                    log.info("job %d: ended while being sampled (its final counters are stored)", job_id)
                    result.skipped_jobs.append(job_id)
                    del result.traffic[job_id], result.jobs[job_id]
        return result
    finally:
        db.close()


def sample_node(cfg: Config, node: str) -> SampleResult:
    """Store the current counters of every job running on node in the node database.

    Each job stays `running`; its epilog later overwrites the sample with the final counters.
    A job whose epilog runs meanwhile is skipped, never an error, and its final counters are
    never overwritten. A job whose counters cannot be read is a failure; the others are still
    sampled. Raises StoreError if the database cannot be opened or listed.
    """
    return _pass(cfg, node, keep=True)


def read_live(cfg: Config, node: str) -> SampleResult:
    """The current counters of every job running on node, with its job info; stores nothing."""
    return _pass(cfg, node, keep=False)


def live_traffic(cfg: Config, node: str) -> dict[int, Traffic]:
    """job id -> class -> {in_bytes, out_bytes, in_packets, out_packets} of node's running jobs."""
    return read_live(cfg, node).traffic

"""Setting up and tearing down one job's accounted network: what the prolog and epilog do."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from .. import counting, naming
from ..config import Config
from ..errors import SetupError, StoreError
from ..kernel import links, netns
from ..log import get as get_log
from ..naming import JobNames
from ..states import State
from ..store import db as store
from ..store import spool
from ..traffic import Traffic, summary, traffic_of
from . import nat
from .plan import NodePlan, addresses, index_range, node_plan, rps_mask

FAILPOINT_ENV = "NETACCT_FAILPOINT"  # tests only: make setup fail (or die) at a named step
Defer = Callable[[Callable[[], object]], None]  # runs a piece of work later (the service does)


def failpoint(name: str) -> None:
    """If $NETACCT_FAILPOINT names this step, fail here (or, with kill:STEP, die by SIGKILL).

    Lets the tests prove rollback and crash recovery at every step; unset in production."""
    want = os.environ.get(FAILPOINT_ENV)
    if not want:
        return
    if want == name:
        raise SetupError(f"failpoint {name}")
    if want == f"kill:{name}":
        os.kill(os.getpid(), signal.SIGKILL)


def open_db(cfg: Config, node: str) -> sqlite_utils.Database:
    """The node database, with every record spooled for this node stored in it first."""
    db = store.connect(cfg.db_for(node))
    try:
        spool.replay_spool(db, cfg.spool_for(node), node)
    except BaseException:
        db.close()
        raise
    return db


# --------------------------------------------------------------------------- the prolog

def setup_job(cfg: Config, info: store.JobInfo, resolv_conf: Path | None = None) -> JobNames:
    """Build the job's namespace, link, addresses, routes and counters; record its start.

    Idempotent: a job that is already fully set up is left untouched. On any failure all
    that this call made is removed again before the error propagates. The engine (config
    `engine`) is chosen here, and only here: "cgroup" builds no network at all (_setup_cgroup).
    """
    if cfg.engine == counting.CGROUP:
        return _setup_cgroup(cfg, info)
    log = get_log()
    names = JobNames.of(cfg, info.job_id, info.host)
    jid = info.job_id
    counter = counting.choose(cfg)
    plan = node_plan(cfg, info.node, resolv_conf=resolv_conf)
    job = counting.Counted(names, tuple(cfg.class_names))
    db = open_db(cfg, info.node)
    try:
        row = store.job_row(db, info)
        if (row is not None and row["state"] == State.RUNNING and netns.is_netns(names.netns_path)
                and links.link_index(names.host_if) is not None):
            log.info("job %d: already set up (%s), nothing to do", jid, names.netns)
            return names
        # An earlier run of a requeued job whose epilog never ran here (the node rebooted):
        # close its row before its namespace, if any, is removed below.
        close_older_runs(cfg, db, info, names, read_namespace=True)
        # A leftover of a killed earlier run: a namespace, a link, or only the empty file a
        # prolog creates just before it mounts the namespace on it.
        if os.path.lexists(names.netns_path) or links.link_index(names.host_if) is not None:
            log.warning("job %d: removing a half-made setup left by an earlier run", jid)
            links.delete_link(names.host_if)
            netns.remove(names.netns_path)
        counter.remove(cfg, job)  # counters a killed prolog left outside its namespace, if any
        _build(cfg, db, info, job, counter, plan)
        return names
    finally:
        db.close()


def _build(cfg: Config, db: sqlite_utils.Database, info: store.JobInfo, job: counting.Counted,
           counter: counting.Counter, plan: NodePlan) -> None:
    """Make everything of the job, in order; on any failure undo what was made, in reverse."""
    log = get_log()
    jid = info.job_id
    names = job.names
    undo: list[tuple[str, Callable[[], object]]] = []
    try:
        first, last = index_range(plan)
        idx = store.lease(db, info.node, jid, names.netns, first, last)
        undo.append(("lease", lambda: store.release(db, info.node, jid)))
        failpoint("lease")
        addrs = addresses(plan, idx)
        rps = rps_mask(cfg)
        netns.create(names.netns_path, rps)  # its end of the link starts with rps_cpus
        undo.append(("netns", lambda: netns.remove(names.netns_path)))
        failpoint("netns")
        if rps is not None:  # and so does the node's end
            netns.set_sysctl("net/core/rps_default_mask", rps)
        undo.append(("link", lambda: links.delete_link(names.host_if)))
        # With a loopback resolver, both ends must route the queries redirected to 127/8.
        links.build_link(names.netns_path, names.host_if, naming.JOB_IFNAME, addrs,
                         route_localnet=plan.dns_stub is not None)
        failpoint("link")
        undo.append(("counters", lambda: counter.remove(cfg, job)))
        counter.install(cfg, job, plan)
        failpoint("rules")
        ensure_node(cfg, plan)
        failpoint("node")
        store.record_start(db, info, names.netns, str(addrs.ipv4),
                           str(addrs.ipv6) if addrs.ipv6 else None, counter.name, job.classes)
    except BaseException as exc:
        log.error("job %d: setup failed (%s); rolling back", jid, exc)
        for what, fn in reversed(undo):
            try:
                fn()
            except Exception as undo_exc:  # keep undoing the rest
                log.error("job %d: rollback of %s failed: %s", jid, what, undo_exc)
        raise
    log.info("job %d: set up %s, %s %s%s via %s (%s, %s%s)", jid, names.netns, names.host_if,
             addrs.ipv4, f" {addrs.ipv6}" if addrs.ipv6 else "", plan.uplink, counter.name,
             cfg.mode, f", DNS to {plan.dns_stub}" if plan.dns_stub else "")


def _setup_cgroup(cfg: Config, info: store.JobInfo) -> JobNames:
    """The cgroup engine's prolog: the job's counting programs and counters, pinned (and, in
    mode "own", its cgroup made and the programs attached); its start recorded. No namespace,
    link, address, route or NAT. Idempotent; rolls back what it made on failure."""
    from ..counting import cgroup as cgroup_counting

    log = get_log()
    jid = info.job_id
    names = JobNames.of(cfg, jid, info.host)
    counter = cgroup_counting.CgroupCounter()
    job = counting.Counted(names, tuple(cfg.class_names))
    db = open_db(cfg, info.node)
    try:
        row = store.job_row(db, info)
        if (row is not None and row["state"] == State.RUNNING and row["backend"] == counter.name
                and os.path.exists(naming.bpf_pin(cfg.bpffs, names.netns))):
            log.info("job %d: already set up (%s), nothing to do", jid, names.netns)
            return names
        # An earlier run whose epilog never ran here: its pinned counters are stored first.
        close_older_runs(cfg, db, info, names, read_namespace=True)
        counter.remove(cfg, job)  # what a killed prolog (or that run) left, if anything
        try:
            counter.install(cfg, job)
            failpoint("rules")
            store.record_start(db, info, names.netns, None, None, counter.name, job.classes)  # no address
        except BaseException as exc:
            log.error("job %d: setup failed (%s); rolling back", jid, exc)
            try:
                counter.remove(cfg, job)
            except Exception as undo_exc:
                log.error("job %d: rollback of counters failed: %s", jid, undo_exc)
            raise
    finally:
        db.close()
    log.info("job %d: set up %s (cgroup engine, mode %s)", jid, names.netns, cgroup_counting.mode(cfg))
    return names


def ensure_node(cfg: Config, plan: NodePlan) -> None:
    """Node-wide settings every job needs: forwarding on, NAT (and DNS redirect) rules."""
    nat.enable_forwarding(plan.pool6 is not None)
    nat.named(counting.firewall(cfg)).install(cfg, plan)


def close_older_runs(cfg: Config, db: sqlite_utils.Database, info: store.JobInfo,
                     names: JobNames, read_namespace: bool) -> list[int]:
    """Close the rows of older runs of this job on this node that still say `running`.

    Their epilog never ran here: the node rebooted (or the epilog failed) and SLURM requeued
    the job. With read_namespace, a namespace that still exists is the newest such run's: its
    counters are stored (`reconciled`); every other such run is recorded `lost` with its last
    sample. With the cgroup engine, its pinned counters play the namespace's part. Returns the
    runs closed."""
    log = get_log()
    older = sorted((int(r["restart"]) for r in store.running_jobs(db, info.node, info.job_id)
                    if int(r["restart"]) < info.restart), reverse=True)
    for i, restart in enumerate(older):
        run = store.JobInfo(job_id=info.job_id, node=info.node, restart=restart)
        row = (store.job_row(db, run) or {}) if i == 0 and read_namespace else {}
        if i == 0 and read_namespace and (netns.is_netns(names.netns_path) or (
                row.get("backend") == counting.CGROUP and os.path.exists(naming.bpf_pin(cfg.bpffs, names.netns)))):
            job = _counted(cfg, names, row)
            try:
                traffic = traffic_of(counting.named(row.get("backend")).read(cfg, job), job.classes)
            except SetupError as exc:
                log.error("job %d: run %d: cannot read its counters (%s)", info.job_id, restart, exc)
            else:
                store.record_end(db, run, State.RECONCILED, traffic)
                log.warning("job %d: run %d never had its epilog here; its counters are stored "
                            "(reconciled): %s", info.job_id, restart, summary(traffic))
                continue
        store.record_end(db, run, State.LOST, None)
        log.error("job %d: run %d never had its epilog here and its namespace is gone (a reboot?); "
                  "recorded as lost, with its last sample if any", info.job_id, restart)
    return older


# --------------------------------------------------------------------------- the epilog

@dataclass(frozen=True)
class Teardown:
    """What an epilog (or the reaper) did: the state recorded, and whether the record had to
    be spooled because the database could not be written (`db_error` says why)."""

    state: str
    spooled: Path | None = None
    db_error: str | None = None


class _Recorder:
    """Where a job's final record goes: the node database, or, if that cannot be written,
    the spool (stored later by whatever opens the database next)."""

    def __init__(self, cfg: Config, info: store.JobInfo) -> None:
        self.info = info
        self.db_path = cfg.db_for(info.node)
        self.spool_dir = cfg.spool_for(info.node)
        self.db: sqlite_utils.Database | None = None
        self.db_error: str | None = None
        self.row: dict[str, Any] | None = None
        self.spooled: Path | None = None
        try:
            self.db = open_db(cfg, info.node)
            self.row = store.job_row(self.db, info)
        except StoreError as exc:  # the record will be spooled
            self.db_error = _db_message(self.db_path, exc)

    @property
    def writable(self) -> bool:
        return self.db is not None and self.db_error is None

    def save(self, state: str, traffic: Traffic | None, if_running: bool = False) -> None:
        """record_end, or the spool; StoreError if neither can be written."""
        log = get_log()
        jid = self.info.job_id
        if self.db is not None and self.db_error is None:
            try:
                store.record_end(self.db, self.info, state, traffic)
                return
            except StoreError as exc:
                self.db_error = _db_message(self.db_path, exc)
        rec = spool.spool_record(self.info, state, traffic, self.row, if_running, self.db_path,
                                 self.db_error or "")
        try:
            self.spooled = spool.spool_write(self.spool_dir, rec)
        except OSError as exc:
            log.error("job %d: %s; the record cannot be spooled either (%s: %s): the namespace "
                      "and its counters are kept", jid, self.db_error, self.spool_dir, exc.strerror or exc)
            raise StoreError(f"{self.db_error}; spool {self.spool_dir}: {exc.strerror or exc}") from None
        log.error("job %d: %s; its record (%s) is spooled to %s and will be stored when the "
                  "database can be written again", jid, self.db_error, state, self.spooled)

    def already_spooled(self) -> str | None:
        """The state of this run's record already in the spool, if there is one."""
        existing = spool.spool_path(self.spool_dir, self.info)
        if not os.path.exists(existing):
            return None
        self.spooled = existing
        try:
            return str(json.loads(existing.read_text())["state"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            get_log().error("job %d: spooled record %s cannot be read (%s)", self.info.job_id, existing, exc)
            return State.LOST

    def close(self) -> None:
        if self.db is not None:
            self.db.close()


def teardown_job(cfg: Config, info: store.JobInfo, defer: Defer | None = None,
                 done_state: str = State.COMPLETED) -> str:
    """teardown() for callers that only need the state recorded."""
    return teardown(cfg, info, defer=defer, done_state=done_state).state


def teardown(cfg: Config, info: store.JobInfo, defer: Defer | None = None,
             done_state: str = State.COMPLETED) -> Teardown:
    """Snapshot the job's counters into the store, then remove all of the job's objects.

    The link is set down first (no packet can pass after the snapshot), then the counters are
    read and stored, and only then are the namespace and the link removed. If the database
    cannot be written, the record is spooled (cfg.spool_dir, stored later by whatever opens
    the database next) and the teardown goes on; if even the spool cannot be written, the
    namespace and its counters stay, StoreError propagates, and a later epilog run or the
    reaper can still record them. Deleting the link is the slow part (~15 ms in the kernel);
    `defer`, if given, runs it later (the daemon does, after it has answered). `done_state`
    is what a job whose counters were read is recorded as (the reaper records "reconciled").
    Idempotent.
    """
    log = get_log()
    names = JobNames.of(cfg, info.job_id, info.host)
    rec = _Recorder(cfg, info)
    try:
        # The cgroup engine's jobs have no link, address or namespace (its counter stops itself).
        networked = ((rec.row or {}).get("backend") or counting.choose(cfg).name) != counting.CGROUP
        if networked and links.stop_link(names.netns_path, naming.JOB_IFNAME, names.host_if):
            log.info("job %d: link %s down", info.job_id, names.host_if)
        failpoint("down")
        state = _record_final(cfg, info, names, rec, done_state)
        if rec.writable:
            try:
                close_older_runs(cfg, rec.db, info, names, read_namespace=False)  # type: ignore[arg-type]
            except StoreError as exc:  # this run's record is stored; the reaper retries
                log.error("job %d: cannot close its older runs: %s", info.job_id, exc)
        if not _remove_namespace(cfg, info, names):
            return Teardown(state, rec.spooled, rec.db_error)
        _let_go(cfg, info, rec)
        if networked:
            _finish_later(info, names, rec.db_path, defer)
        return Teardown(state, rec.spooled, rec.db_error)
    finally:
        rec.close()


def _record_final(cfg: Config, info: store.JobInfo, names: JobNames, rec: _Recorder, done_state: str) -> str:
    """Store the run's final record (or spool it); the state recorded."""
    log = get_log()
    jid = info.job_id
    counter = counting.named((rec.row or {}).get("backend") or counting.choose(cfg).name)
    job = _counted(cfg, names, rec.row)
    try:
        counter.stop(cfg, job)
    except SetupError as exc:  # the programs stay attached: read what they counted all the same
        log.error("job %d: cannot stop counting before the final read: %s", jid, exc)
    has_netns = netns.is_netns(names.netns_path)
    if has_netns or (counter.outlives_namespace and (rec.row or {}).get("state") == State.RUNNING):
        try:
            counters = counter.read(cfg, job)
        except SetupError as exc:  # e.g. someone deleted the job's table: nothing to read
            if has_netns:
                rec.save(State.LOST, None)
                log.error("job %d: cannot read its counters (%s); recorded as lost, with its "
                          "last sample if any", jid, exc)
                return State.LOST
            counters = None
        if counters is not None:
            traffic = traffic_of(counters, job.classes)
            rec.save(done_state, traffic)
            log.info("job %d: counters %s (%s)%s: %s", jid, "spooled" if rec.spooled else "stored",
                     done_state, "" if has_netns or counter.name == counting.CGROUP else f", its namespace {names.netns} gone",
                     summary(traffic))
            return done_state
    if rec.row is not None and rec.row["state"] == State.RUNNING:
        rec.save(State.LOST, None)
        log.error("job %d: namespace %s was gone; its counters are lost", jid, names.netns)
        return State.LOST
    if rec.db_error is not None:  # the database cannot say whether the job ran here
        state = rec.already_spooled()
        if state is not None:
            log.info("job %d: nothing to tear down; its record is already spooled (%s)", jid, rec.spooled)
            return state
        rec.save(State.LOST, None, if_running=True)  # stored only if the row says running then
        return State.LOST
    log.info("job %d: nothing to tear down (no prolog, or already done)", jid)
    return str(rec.row["state"]) if rec.row else "none"


def _counted(cfg: Config, names: JobNames, row: dict[str, Any] | None) -> counting.Counted:
    """The job's counters as its prolog recorded them (its classes; else the config's now)."""
    return counting.Counted(names, store.row_classes(row) or tuple(cfg.class_names))


def _let_go(cfg: Config, info: store.JobInfo, rec: _Recorder) -> None:
    """After the record is stored and the namespace gone: what the way of counting keeps
    outside the namespace (BPF: the pinned counters). A second epilog finds nothing."""
    counter = counting.named((rec.row or {}).get("backend") or counting.choose(cfg).name)
    try:
        counter.remove(cfg, _counted(cfg, JobNames.of(cfg, info.job_id, info.host), rec.row))
    except SetupError as exc:  # stored: what is left is the reaper's
        get_log().error("job %d: its counters are stored but cannot be let go: %s", info.job_id, exc)


def _remove_namespace(cfg: Config, info: store.JobInfo, names: JobNames) -> bool:
    """Remove the job's namespace; False if that failed and the policy says only to log it
    (teardown_failure = "log"); with "drain" the SetupError propagates."""
    log = get_log()
    try:
        failpoint("stored")
        if netns.remove(names.netns_path):
            log.info("job %d: namespace %s removed", info.job_id, names.netns)
        failpoint("removed")
    except SetupError as exc:  # the counters are safe; only the removal failed
        if cfg.teardown_failure == "drain":
            raise
        log.error("job %d: teardown failed after its counters were stored (%s); left for "
                  "netacct-reconcile (teardown_failure = \"log\")", info.job_id, exc)
        return False
    return True


def _finish_later(info: store.JobInfo, names: JobNames, db_path: Path, defer: Defer | None) -> None:
    """Delete the job's link, then free its address (not before: its routes go with the link),
    now or, with `defer`, later. Deferred, the link is deleted by its index: a later run of the
    job may meanwhile have made a link of the same name (the service runs this first for a new
    prolog of the job, so this is a second line of defence)."""
    log = get_log()
    jid = info.job_id
    host_index = links.link_index(names.host_if) if defer is not None else None

    def finish() -> None:
        if defer is not None and host_index is None:
            pass  # there was no link
        elif links.delete_link(names.host_if, host_index):
            log.info("job %d: link %s removed", jid, names.host_if)
        try:
            fdb = store.connect(db_path)
            try:
                store.release(fdb, info.node, jid)
            finally:
                fdb.close()
        except StoreError as exc:
            log.error("job %d: its address lease cannot be freed (%s); left for netacct-reconcile",
                      jid, exc)

    if defer is None:
        finish()
    else:
        defer(finish)


def _db_message(path: Path, exc: StoreError) -> str:
    """A database error as one line that names the database."""
    msg = str(exc)
    return msg if str(path) in msg else f"database {path}: {msg.removeprefix('database: ')}"

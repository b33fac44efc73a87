"""Setting up and tearing down one job's accounted network: what the prolog and epilog do."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ipaddress
import json
import os
import signal

import sqlite_utils

from . import accounting, naming, netns, store
from .accounting import NodePlan
from .config import Config
from .errors import SetupError, StoreError
from .log import get as get_log

STATE_COMPLETED = "completed"
RESOLV_CONF = Path("/etc/resolv.conf")
FAILPOINT_ENV = "NETACCT_FAILPOINT"  # tests only: make setup fail (or die) at a named step


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
STATE_LOST = "lost"  # the job's namespace was gone before its counters could be read


@dataclass(frozen=True)
class JobNames:
    """Every name of one job's objects, derived in one place."""

    job_id: int
    netns: str
    netns_path: Path
    host_if: str

    @classmethod
    def of(cls, cfg: Config, job_id: int, host: str | None = None) -> "JobNames":
        try:
            name = naming.netns_name(cfg.netns_prefix, job_id, host)
        except ValueError as exc:
            raise SetupError(str(exc)) from None
        return cls(job_id, name, cfg.netns_dir / name, naming.host_ifname(cfg.ifname_prefix, job_id))


def index_range(plan: NodePlan) -> tuple[int, int]:
    """Usable address indices: .0 is the network, .1 the gateway, the last the broadcast."""
    last = plan.pool4.num_addresses - 2
    if plan.pool6 is not None:
        last = min(last, plan.pool6.num_addresses - 1)
    return 2, last


def addresses(plan: NodePlan, idx: int) -> netns.JobAddresses:
    """The job's addresses for lease index idx (the same offset in both pools)."""
    v6 = plan.pool6[idx] if plan.pool6 is not None else None
    return netns.JobAddresses(ipv4=plan.pool4[idx], gateway4=plan.gateway4, ipv6=v6)


def resolve_uplink(cfg: Config) -> str:
    """The configured uplink, or the default route's interface; it must exist."""
    uplink = cfg.uplink or netns.default_uplink()
    if uplink is None:
        raise SetupError("no uplink: set 'uplink' in the config (this node has no default route)")
    if netns.link_index(uplink) is None:
        raise SetupError(f"uplink interface '{uplink}' does not exist")
    return uplink


def loopback_resolver(resolv_conf: Path = RESOLV_CONF) -> ipaddress.IPv4Address | None:
    """The first nameserver in resolv.conf if it is an IPv4 loopback address (a stub resolver
    such as systemd-resolved's 127.0.0.53, which a job namespace cannot reach by itself)."""
    try:
        text = resolv_conf.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                addr = ipaddress.ip_address(parts[1])
            except ValueError:
                continue
            return addr if isinstance(addr, ipaddress.IPv4Address) and addr.is_loopback else None
    return None


def node_plan(cfg: Config, node: str, uplink: str | None = None, resolv_conf: Path | None = None) -> NodePlan:
    """Everything node-wide a job on `node` is built from."""
    pool4, pool6 = cfg.node_pools(node)
    stub = loopback_resolver(resolv_conf or RESOLV_CONF) if cfg.dns == "auto" else None
    return NodePlan(node=node, uplink=uplink or resolve_uplink(cfg), pool4=pool4, pool6=pool6, dns_stub=stub)


def setup_job(cfg: Config, info: store.JobInfo, resolv_conf: Path | None = None) -> JobNames:
    """Build the job's namespace, link, addresses, routes and counters; record its start.

    Idempotent: a job that is already fully set up is left untouched. On any failure all
    that this call made is removed again before the error propagates.
    """
    log = get_log()
    names = JobNames.of(cfg, info.job_id, info.host)
    jid = info.job_id
    backend = accounting.backend(cfg)
    plan = node_plan(cfg, info.node, resolv_conf=resolv_conf)
    db = open_db(cfg, info.node)
    try:
        row = store.job_row(db, info)
        if (row is not None and row["state"] == "running" and netns.is_netns(names.netns_path)
                and netns.link_index(names.host_if) is not None):
            log.info("job %d: already set up (%s), nothing to do", jid, names.netns)
            return names
        # An earlier run of a requeued job whose epilog never ran here (the node rebooted):
        # close its row before its namespace, if any, is removed below.
        close_older_runs(cfg, db, info, names, read_namespace=True)
        # A leftover of a killed earlier run: a namespace, a link, or only the empty file a
        # prolog creates just before it mounts the namespace on it.
        if os.path.lexists(names.netns_path) or netns.link_index(names.host_if) is not None:
            log.warning("job %d: removing a half-made setup left by an earlier run", jid)
            _remove_objects(names)

        undo: list[tuple[str, Callable[[], object]]] = []
        try:
            first, last = index_range(plan)
            idx = store.lease(db, info.node, jid, names.netns, first, last)
            undo.append(("lease", lambda: store.release(db, info.node, jid)))
            failpoint("lease")
            addrs = addresses(plan, idx)
            rps = _rps_mask(cfg)
            netns.create(names.netns_path, rps)  # its end of the link starts with rps_cpus
            undo.append(("netns", lambda: netns.remove(names.netns_path)))
            failpoint("netns")
            if rps is not None:  # and so does the node's end
                netns.set_sysctl("net/core/rps_default_mask", rps)
            undo.append(("link", lambda: netns.delete_link(names.host_if)))
            # With a loopback resolver, both ends must route the queries redirected to 127/8.
            netns.build_link(names.netns_path, names.host_if, naming.JOB_IFNAME, addrs,
                             route_localnet=plan.dns_stub is not None)
            failpoint("link")
            backend.install(cfg, names.netns_path, plan)
            failpoint("rules")
            ensure_node(cfg, backend, plan)
            failpoint("node")
            store.record_start(db, info, names.netns, str(addrs.ipv4),
                               str(addrs.ipv6) if addrs.ipv6 else None, backend.name)
        except BaseException as exc:
            log.error("job %d: setup failed (%s); rolling back", jid, exc)
            for what, fn in reversed(undo):
                try:
                    fn()
                except Exception as undo_exc:  # keep undoing the rest
                    log.error("job %d: rollback of %s failed: %s", jid, what, undo_exc)
            raise
        log.info("job %d: set up %s, %s %s%s via %s (%s, %s%s)", jid, names.netns, names.host_if,
                 addrs.ipv4, f" {addrs.ipv6}" if addrs.ipv6 else "", plan.uplink, backend.name,
                 cfg.mode, f", DNS to {plan.dns_stub}" if plan.dns_stub else "")
        return names
    finally:
        db.close()


def _rps_mask(cfg: Config) -> str | None:
    """rps_cpus, checked against this node's CPUs (the kernel's own error is EOVERFLOW)."""
    if not cfg.rps_cpus:
        return None
    cpus = os.cpu_count() or 1
    if int(cfg.rps_cpus.replace(",", ""), 16) >> cpus:
        raise SetupError(f"rps_cpus {cfg.rps_cpus!r} names CPUs this node does not have (it has {cpus})")
    return cfg.rps_cpus


def ensure_node(cfg: Config, backend: accounting.Backend, plan: NodePlan) -> None:
    """Node-wide settings every job needs: forwarding on, NAT (and DNS redirect) rules."""
    netns.set_sysctl("net/ipv4/ip_forward", "1")
    if plan.pool6 is not None:
        netns.set_sysctl("net/ipv6/conf/all/forwarding", "1")
    backend.install_node(cfg, plan)


def _remove_objects(names: JobNames) -> None:
    netns.delete_link(names.host_if)
    netns.remove(names.netns_path)


def traffic_of(counters: accounting.Counters, cfg: Config) -> dict[str, dict[str, int]]:
    """Counters as class -> {in_bytes, out_bytes, in_packets, out_packets}."""
    out: dict[str, dict[str, int]] = {}
    for klass in cfg.class_names:
        cin = counters.get((klass, "in"), accounting.Count())
        cout = counters.get((klass, "out"), accounting.Count())
        out[klass] = {"in_bytes": cin.bytes, "out_bytes": cout.bytes,
                      "in_packets": cin.packets, "out_packets": cout.packets}
    return out


@dataclass(frozen=True)
class Teardown:
    """What an epilog (or the reaper) did: the state recorded, and whether the record had to
    be spooled because the database could not be written (`db_error` says why)."""

    state: str
    spooled: Path | None = None
    db_error: str | None = None


def open_db(cfg: Config, node: str) -> sqlite_utils.Database:
    """The node database, with every record spooled for this node stored in it first."""
    db = store.connect(cfg.db_for(node))
    try:
        store.replay_spool(db, cfg.spool_for(node), node)
    except BaseException:
        db.close()
        raise
    return db


def close_older_runs(cfg: Config, db: sqlite_utils.Database, info: store.JobInfo,
                     names: JobNames, read_namespace: bool) -> list[int]:
    """Close the rows of older runs of this job on this node that still say `running`.

    Their epilog never ran here: the node rebooted (or the epilog failed) and SLURM requeued
    the job. With read_namespace, a namespace that still exists is the newest such run's: its
    counters are stored (`reconciled`); every other such run is recorded `lost` with its last
    sample. Returns the runs closed."""
    log = get_log()
    older = sorted((int(r["restart"]) for r in store.running_jobs(db, info.node, info.job_id)
                    if int(r["restart"]) < info.restart), reverse=True)
    for i, restart in enumerate(older):
        run = store.JobInfo(job_id=info.job_id, node=info.node, restart=restart)
        if i == 0 and read_namespace and netns.is_netns(names.netns_path):
            row = store.job_row(db, run) or {}
            backend = accounting.Iptables() if row.get("backend") == "iptables" else accounting.Nftables()
            try:
                traffic = traffic_of(backend.read(cfg, names.netns_path), cfg)
            except SetupError as exc:
                log.error("job %d: run %d: cannot read its counters (%s)", info.job_id, restart, exc)
            else:
                store.record_end(db, run, "reconciled", traffic)
                log.warning("job %d: run %d never had its epilog here; its counters are stored "
                            "(reconciled): %s", info.job_id, restart, _summary(traffic))
                continue
        store.record_end(db, run, STATE_LOST, None)
        log.error("job %d: run %d never had its epilog here and its namespace is gone (a reboot?); "
                  "recorded as lost, with its last sample if any", info.job_id, restart)
    return older


def teardown_job(cfg: Config, info: store.JobInfo,
                 defer: Callable[[Callable[[], object]], None] | None = None,
                 done_state: str = "completed") -> str:
    """teardown() for callers that only need the state recorded."""
    return teardown(cfg, info, defer=defer, done_state=done_state).state


def teardown(cfg: Config, info: store.JobInfo,
             defer: Callable[[Callable[[], object]], None] | None = None,
             done_state: str = "completed") -> Teardown:
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
    jid = info.job_id
    db_path = cfg.db_for(info.node)
    spool_dir = cfg.spool_for(info.node)
    db: sqlite_utils.Database | None = None
    db_error: str | None = None
    row: dict[str, Any] | None = None
    spooled: Path | None = None

    def save(state: str, traffic: dict[str, dict[str, int]] | None, if_running: bool = False) -> None:
        """record_end, or if the database cannot be written, the spool (or StoreError)."""
        nonlocal db_error, spooled
        if db is not None and db_error is None:
            try:
                store.record_end(db, info, state, traffic)
                return
            except StoreError as exc:
                db_error = _db_message(db_path, exc)
        rec = store.spool_record(info, state, traffic, row, if_running, db_path, db_error or "")
        try:
            spooled = store.spool_write(spool_dir, rec)
        except OSError as exc:
            log.error("job %d: %s; the record cannot be spooled either (%s: %s): the namespace "
                      "and its counters are kept", jid, db_error, spool_dir, exc.strerror or exc)
            raise StoreError(f"{db_error}; spool {spool_dir}: {exc.strerror or exc}") from None
        log.error("job %d: %s; its record (%s) is spooled to %s and will be stored when the "
                  "database can be written again", jid, db_error, state, spooled)

    try:
        try:
            db = open_db(cfg, info.node)
            row = store.job_row(db, info)
        except StoreError as exc:  # the record will be spooled
            db_error = _db_message(db_path, exc)
        if netns.stop_link(names.netns_path, naming.JOB_IFNAME, names.host_if):
            log.info("job %d: link %s down", jid, names.host_if)
        failpoint("down")
        if netns.is_netns(names.netns_path):
            bname = (row or {}).get("backend") or accounting.backend(cfg).name
            backend = accounting.Iptables() if bname == "iptables" else accounting.Nftables()
            try:
                counters = backend.read(cfg, names.netns_path)
            except SetupError as exc:  # e.g. someone deleted the job's table: nothing to read
                save(STATE_LOST, None)
                log.error("job %d: cannot read its counters (%s); recorded as lost, with its "
                          "last sample if any", jid, exc)
                state = STATE_LOST
            else:
                traffic = traffic_of(counters, cfg)
                save(done_state, traffic)
                log.info("job %d: counters %s (%s): %s", jid, "spooled" if spooled else "stored",
                         done_state, _summary(traffic))
                state = done_state
        elif row is not None and row["state"] == "running":
            save(STATE_LOST, None)
            log.error("job %d: namespace %s was gone; its counters are lost", jid, names.netns)
            state = STATE_LOST
        elif db_error is not None:  # the database cannot say whether the job ran here
            existing = store.spool_path(spool_dir, info)
            state = STATE_LOST
            if os.path.exists(existing):
                log.info("job %d: nothing to tear down; its record is already spooled (%s)", jid, existing)
                spooled = existing
                try:
                    state = str(json.loads(existing.read_text())["state"])
                except (OSError, ValueError, KeyError, TypeError):
                    pass
            else:  # stored only if the run's row says running when the database works again
                save(STATE_LOST, None, if_running=True)
        else:
            log.info("job %d: nothing to tear down (no prolog, or already done)", jid)
            state = row["state"] if row else "none"
        if db is not None and db_error is None:
            try:
                close_older_runs(cfg, db, info, names, read_namespace=False)
            except StoreError as exc:  # this run's record is stored; the reaper retries
                log.error("job %d: cannot close its older runs: %s", jid, exc)
        try:
            failpoint("stored")
            if netns.remove(names.netns_path):
                log.info("job %d: namespace %s removed", jid, names.netns)
            failpoint("removed")
        except SetupError as exc:  # the counters are safe; only the removal failed
            if cfg.teardown_failure == "drain":
                raise
            log.error("job %d: teardown failed after its counters were stored (%s); left for "
                      "netacct-reconcile (teardown_failure = \"log\")", jid, exc)
            return Teardown(state, spooled, db_error)

        # Deferred, the link is deleted by its index: a later run of the job may meanwhile
        # have made a link of the same name (the service runs this first for a new prolog of
        # the job, so this is a second line of defence).
        host_index = netns.link_index(names.host_if) if defer is not None else None

        def finish() -> None:
            """Delete the link, then free the job's address (not before: its routes go with it)."""
            if defer is not None and host_index is None:
                pass  # there was no link
            elif netns.delete_link(names.host_if, host_index):
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
        return Teardown(state, spooled, db_error)
    finally:
        if db is not None:
            db.close()


def _db_message(path: Path, exc: StoreError) -> str:
    """A database error as one line that names the database."""
    msg = str(exc)
    return msg if str(path) in msg else f"database {path}: {msg.removeprefix('database: ')}"


def _summary(traffic: dict[str, dict[str, int]]) -> str:
    return ", ".join(f"{k} in={v['in_bytes']}B/{v['in_packets']}p out={v['out_bytes']}B/{v['out_packets']}p"
                     for k, v in traffic.items())

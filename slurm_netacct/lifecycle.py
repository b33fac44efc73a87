"""Setting up and tearing down one job's accounted network: what the prolog and epilog do."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import accounting, naming, netns, store
from .config import Config
from .errors import SetupError
from .log import get as get_log

STATE_COMPLETED = "completed"
STATE_LOST = "lost"  # the job's namespace was gone before its counters could be read


@dataclass(frozen=True)
class JobNames:
    """Every name of one job's objects, derived in one place."""

    job_id: int
    netns: str
    netns_path: Path
    host_if: str

    @classmethod
    def of(cls, cfg: Config, job_id: int) -> "JobNames":
        name = naming.netns_name(cfg.netns_prefix, job_id)
        return cls(job_id, name, cfg.netns_dir / name, naming.host_ifname(cfg.ifname_prefix, job_id))


def index_range(cfg: Config) -> tuple[int, int]:
    """Usable address indices: .0 is the network, .1 the gateway, the last the broadcast."""
    last = cfg.pool_ipv4.num_addresses - 2
    if cfg.pool_ipv6 is not None:
        last = min(last, cfg.pool_ipv6.num_addresses - 1)
    return 2, last


def addresses(cfg: Config, idx: int) -> netns.JobAddresses:
    """The job's addresses for lease index idx (the same offset in both pools)."""
    v6 = cfg.pool_ipv6[idx] if cfg.pool_ipv6 is not None else None
    return netns.JobAddresses(ipv4=cfg.pool_ipv4[idx], gateway4=cfg.pool_ipv4[1], ipv6=v6)


def resolve_uplink(cfg: Config) -> str:
    """The configured uplink, or the default route's interface; it must exist."""
    uplink = cfg.uplink or netns.default_uplink()
    if uplink is None:
        raise SetupError("no uplink: set 'uplink' in the config (this node has no default route)")
    if netns.link_index(uplink) is None:
        raise SetupError(f"uplink interface '{uplink}' does not exist")
    return uplink


def setup_job(cfg: Config, info: store.JobInfo) -> JobNames:
    """Build the job's namespace, link, addresses, routes and counters; record its start.

    Idempotent: a job that is already fully set up is left untouched. On any failure all
    that this call made is removed again before the error propagates.
    """
    log = get_log()
    names = JobNames.of(cfg, info.job_id)
    jid = info.job_id
    backend = accounting.backend(cfg)
    uplink = resolve_uplink(cfg)
    db = store.connect(cfg.db)
    try:
        row = store.job_row(db, info)
        if (row is not None and row["state"] == "running" and netns.is_netns(names.netns_path)
                and netns.link_index(names.host_if) is not None):
            log.info("job %d: already set up (%s), nothing to do", jid, names.netns)
            return names
        if netns.is_netns(names.netns_path) or netns.link_index(names.host_if) is not None:
            log.warning("job %d: removing a half-made setup left by an earlier run", jid)
            _remove_objects(names)

        undo: list[tuple[str, Callable[[], object]]] = []
        try:
            first, last = index_range(cfg)
            idx = store.lease(db, jid, names.netns, first, last)
            undo.append(("lease", lambda: store.release(db, jid)))
            addrs = addresses(cfg, idx)
            netns.create(names.netns_path)
            undo.append(("netns", lambda: netns.remove(names.netns_path)))
            undo.append(("link", lambda: netns.delete_link(names.host_if)))
            netns.build_link(names.netns_path, names.host_if, naming.JOB_IFNAME, addrs)
            backend.install(cfg, names.netns_path)
            ensure_node(cfg, backend, uplink)
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
        log.info("job %d: set up %s, %s %s%s via %s (%s)", jid, names.netns, names.host_if,
                 addrs.ipv4, f" {addrs.ipv6}" if addrs.ipv6 else "", uplink, backend.name)
        return names
    finally:
        db.close()


def ensure_node(cfg: Config, backend: accounting.Backend, uplink: str) -> None:
    """Node-wide settings every job needs: forwarding on, the pool masqueraded on the uplink."""
    netns.set_sysctl("net/ipv4/ip_forward", "1")
    if cfg.pool_ipv6 is not None:
        netns.set_sysctl("net/ipv6/conf/all/forwarding", "1")
    backend.install_node(cfg, uplink)


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


def teardown_job(cfg: Config, info: store.JobInfo) -> str:
    """Snapshot the job's counters into the store, then remove all of the job's objects.

    The link goes first (no packet can pass after the snapshot), then the counters are read
    and stored, and only then is the namespace removed: if the store cannot be written the
    namespace and its counters stay, the error propagates, and a later epilog run or the
    reaper can still record them. Idempotent; returns the state recorded.
    """
    log = get_log()
    names = JobNames.of(cfg, info.job_id)
    jid = info.job_id
    db = store.connect(cfg.db)
    try:
        row = store.job_row(db, info)
        if netns.delete_link(names.host_if):
            log.info("job %d: link %s removed", jid, names.host_if)
        if netns.is_netns(names.netns_path):
            bname = (row or {}).get("backend") or accounting.backend(cfg).name
            backend = accounting.Iptables() if bname == "iptables" else accounting.Nftables()
            counters = backend.read(cfg, names.netns_path)
            traffic = traffic_of(counters, cfg)
            store.record_end(db, info, STATE_COMPLETED, traffic)
            log.info("job %d: counters stored: %s", jid, _summary(traffic))
            state = STATE_COMPLETED
        elif row is not None and row["state"] == "running":
            store.record_end(db, info, STATE_LOST, None)
            log.error("job %d: namespace %s was gone; its counters are lost", jid, names.netns)
            state = STATE_LOST
        else:
            log.info("job %d: nothing to tear down (no prolog, or already done)", jid)
            state = row["state"] if row else "none"
        if netns.remove(names.netns_path):
            log.info("job %d: namespace %s removed", jid, names.netns)
        store.release(db, jid)
        return state
    finally:
        db.close()


def _summary(traffic: dict[str, dict[str, int]]) -> str:
    return ", ".join(f"{k} in={v['in_bytes']}B/{v['in_packets']}p out={v['out_bytes']}B/{v['out_packets']}p"
                     for k, v in traffic.items())

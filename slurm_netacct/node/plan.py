"""What one node's jobs are built from: its pools, uplink, DNS stub; each job's addresses."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..errors import SetupError
from ..kernel import links
from ..kernel.links import JobAddresses

RESOLV_CONF = Path("/etc/resolv.conf")


@dataclass(frozen=True)
class NodePlan:
    """What one node's jobs are built from: its pools, uplink, mode and DNS stub."""

    node: str
    uplink: str
    pool4: ipaddress.IPv4Network
    pool6: ipaddress.IPv6Network | None
    dns_stub: ipaddress.IPv4Address | None = None  # the node's loopback resolver, if any

    @property
    def gateway4(self) -> ipaddress.IPv4Address:
        """The node side of every job link on this node (the pool's first address)."""
        return self.pool4[1]


def index_range(plan: NodePlan) -> tuple[int, int]:
    """Usable address indices: .0 is the network, .1 the gateway, the last the broadcast."""
    last = plan.pool4.num_addresses - 2
    if plan.pool6 is not None:
        last = min(last, plan.pool6.num_addresses - 1)
    return 2, last


def addresses(plan: NodePlan, idx: int) -> JobAddresses:
    """The job's addresses for lease index idx (the same offset in both pools)."""
    v6 = plan.pool6[idx] if plan.pool6 is not None else None
    return JobAddresses(ipv4=plan.pool4[idx], gateway4=plan.gateway4, ipv6=v6)


def resolve_uplink(cfg: Config) -> str:
    """The configured uplink, or the default route's interface; it must exist."""
    uplink = cfg.uplink or links.default_uplink()
    if uplink is None:
        raise SetupError("no uplink: set 'uplink' in the config (this node has no default route)")
    if links.link_index(uplink) is None:
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


def rps_mask(cfg: Config) -> str | None:
    """rps_cpus, checked against this node's CPUs (the kernel's own error is EOVERFLOW)."""
    if not cfg.rps_cpus:
        return None
    cpus = os.cpu_count() or 1
    if int(cfg.rps_cpus.replace(",", ""), 16) >> cpus:
        raise SetupError(f"rps_cpus {cfg.rps_cpus!r} names CPUs this node does not have (it has {cpus})")
    return cfg.rps_cpus

"""Routed mode: routes to every node's job prefix, for compute nodes, controllers, login hosts."""

from __future__ import annotations

import ipaddress
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from ..config import Config
from ..errors import ConfigError, SetupError, UsageError

RTPROT_NETACCT = 222  # the routing protocol number that marks this project's routes


@dataclass(frozen=True)
class Route:
    """One route: a node's job prefix via that node's address."""

    node: str
    prefix: ipaddress.IPv4Network
    via: ipaddress.IPv4Address


def slurm_nodes(scontrol: str | None = None) -> dict[str, str]:
    """NodeName -> NodeAddr of every node SLURM knows (`scontrol -o show nodes`); SetupError
    carrying scontrol's own message if it cannot say (e.g. slurmctld is not up)."""
    from .identity import slurm_node_list

    return {n.name: n.addr for n in slurm_node_list(scontrol)}


def plan(cfg: Config, nodes: dict[str, str], self_node: str | None,
         local: Collection[ipaddress.IPv4Address | ipaddress.IPv6Address] = ()) -> list[Route]:
    """The routes this host needs: every other node's IPv4 job prefix via that node.

    A node whose NodeAddr is one of `local` (this host's addresses) is this host, whatever
    `self_node` says: a route to its own prefix through its own address would only loop.

    Every node, this one included, must have an index of its own: two names with the same
    trailing number (n1, n01), or a [routed.nodes] entry equal to another node's number,
    would share a job prefix (ConfigError naming both)."""
    if cfg.mode != "routed":
        raise UsageError("config 'mode' is not \"routed\"")
    owner: dict[int, str] = {}
    for name in sorted(set(nodes) | ({self_node} if self_node else set())):
        idx = cfg.node_index(name)
        if idx in owner:
            raise ConfigError(f"config key 'routed.nodes': nodes {owner[idx]!r} and {name!r} both have "
                              f"index {idx} (job prefix {cfg.node_pools(name)[0]}): give one of them an "
                              "index of its own under [routed.nodes]")
        owner[idx] = name
    routes = []
    for name in sorted(nodes):
        if name == self_node:
            continue
        try:
            via = ipaddress.IPv4Address(nodes[name])
        except ValueError:
            raise SetupError(f"node {name}: NodeAddr {nodes[name]!r} is not an IPv4 address") from None
        if via in local:
            continue
        routes.append(Route(name, cfg.node_pools(name)[0], via))
    return routes


RT_TABLE_MAIN = 254
_PROTOCOLS = {1: "redirect", 2: "kernel", 3: "boot", 4: "static", 16: "dhcp", RTPROT_NETACCT: "netacct"}


def _ipr() -> Any:
    from pyroute2 import IPRoute

    return IPRoute()


@dataclass(frozen=True)
class Existing:
    """A route of the main IPv4 table, as far as netacct-routes cares."""

    prefix: str
    via: str | None
    proto: int

    def __str__(self) -> str:
        via = f" via {self.via}" if self.via else ""
        return f"{self.prefix}{via} proto {_PROTOCOLS.get(self.proto, str(self.proto))}"


def _main_routes(ipr: Any) -> list[Existing]:
    out = []
    for r in ipr.get_routes(family=2, table=RT_TABLE_MAIN):
        if r.get_attr("RTA_TABLE", r["table"]) != RT_TABLE_MAIN:
            continue
        dst = r.get_attr("RTA_DST") or "0.0.0.0"
        gw = r.get_attr("RTA_GATEWAY")
        out.append(Existing(f"{dst}/{r['dst_len']}", str(gw) if gw else None, int(r["proto"])))
    return out


def installed() -> list[tuple[str, str]]:
    """(prefix, via) of every route of ours (protocol 222) in the main table of this namespace."""
    with _ipr() as ipr:
        return sorted((e.prefix, str(e.via)) for e in _main_routes(ipr) if e.proto == RTPROT_NETACCT)


def install(routes: list[Route]) -> tuple[int, int]:
    """Make our routes exactly `routes`: add or update those planned, delete our others.

    Only routes of protocol 222 are ever changed. A planned prefix that already has a route
    of anyone else's (an administrator's static route, a DHCP one) is refused before anything
    is changed: SetupError naming that route."""
    wanted = {str(r.prefix): r for r in routes}
    try:
        with _ipr() as ipr:
            existing = _main_routes(ipr)
            foreign = [e for e in existing if e.prefix in wanted and e.proto != RTPROT_NETACCT]
            if foreign:
                more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
                raise SetupError(f"route {foreign[0]}{more} is not netacct-routes' (protocol "
                                 f"{RTPROT_NETACCT}): refusing to replace it; remove it, or change "
                                 "pool.ipv4 or [routed.nodes] so that job prefixes do not collide with it")
            ours = {e.prefix: e for e in existing if e.proto == RTPROT_NETACCT}
            removed = 0
            for prefix in sorted(set(ours) - set(wanted)):
                ipr.route("del", dst=prefix, proto=RTPROT_NETACCT, table=RT_TABLE_MAIN)
                removed += 1
            for r in routes:
                mine = ours.get(str(r.prefix))
                if mine is None:  # "add" fails if a route appeared meanwhile: never overwrite it
                    ipr.route("add", dst=str(r.prefix), gateway=str(r.via), proto=RTPROT_NETACCT,
                              table=RT_TABLE_MAIN)
                elif mine.via != str(r.via):
                    ipr.route("replace", dst=str(r.prefix), gateway=str(r.via), proto=RTPROT_NETACCT,
                              table=RT_TABLE_MAIN)
    except SetupError:
        raise
    except Exception as exc:  # NetlinkError: e.g. the next hop is not on a connected network
        raise SetupError(f"route install failed: {exc}") from None
    return len(routes), removed


def remove() -> int:
    """Delete every route of ours (protocol 222), and nothing else."""
    n = 0
    with _ipr() as ipr:
        for e in _main_routes(ipr):
            if e.proto == RTPROT_NETACCT:
                ipr.route("del", dst=e.prefix, proto=RTPROT_NETACCT, table=RT_TABLE_MAIN)
                n += 1
    return n

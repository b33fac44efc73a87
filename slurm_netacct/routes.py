"""Routed mode: routes to every node's job prefix, for compute nodes, controllers, login hosts."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from .config import Config
from .errors import SetupError, UsageError

RTPROT_NETACCT = 222  # the routing protocol number that marks this project's routes


@dataclass(frozen=True)
class Route:
    """One route: a node's job prefix via that node's address."""

    node: str
    prefix: ipaddress.IPv4Network
    via: ipaddress.IPv4Address


def slurm_nodes(scontrol: str | None = None) -> dict[str, str]:
    """NodeName -> NodeAddr of every node SLURM knows (`scontrol -o show nodes`)."""
    exe = scontrol or shutil.which("scontrol") or shutil.which("scontrol", path="/usr/bin:/usr/local/bin")
    if exe is None:
        raise SetupError("scontrol not found: give the nodes with --node NAME=ADDR")
    try:
        out = subprocess.run([exe, "-o", "show", "nodes"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise SetupError(f"scontrol show nodes failed: {exc}") from None
    nodes: dict[str, str] = {}
    for line in out.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "NodeName" in fields:
            nodes[fields["NodeName"]] = fields.get("NodeAddr") or fields["NodeName"]
    return nodes


def plan(cfg: Config, nodes: dict[str, str], self_node: str | None) -> list[Route]:
    """The routes this host needs: every other node's IPv4 job prefix via that node."""
    if cfg.mode != "routed":
        raise UsageError("netacct-routes: config 'mode' is not \"routed\"")
    routes = []
    for name in sorted(nodes):
        if name == self_node:
            continue
        try:
            via = ipaddress.IPv4Address(nodes[name])
        except ValueError:
            raise SetupError(f"node {name}: NodeAddr {nodes[name]!r} is not an IPv4 address") from None
        routes.append(Route(name, cfg.node_pools(name)[0], via))
    prefixes = [r.prefix for r in routes]
    if len(set(prefixes)) != len(prefixes):
        raise SetupError("two nodes map to the same job prefix: set [routed.nodes]")
    return routes


def _ipr() -> Any:
    from pyroute2 import IPRoute

    return IPRoute()


def installed() -> list[tuple[str, str]]:
    """(prefix, via) of every route of ours (protocol 222) in this namespace."""
    out = []
    with _ipr() as ipr:
        for r in ipr.get_routes(family=2, proto=RTPROT_NETACCT):
            dst = r.get_attr("RTA_DST")
            out.append((f"{dst}/{r['dst_len']}", str(r.get_attr("RTA_GATEWAY"))))
    return sorted(out)


def install(routes: list[Route]) -> tuple[int, int]:
    """Make our routes exactly `routes`: replace those planned, delete our others."""
    wanted = {str(r.prefix): r for r in routes}
    removed = 0
    try:
        with _ipr() as ipr:
            for prefix, _via in installed():
                if prefix not in wanted:
                    ipr.route("del", dst=prefix, proto=RTPROT_NETACCT)
                    removed += 1
            for r in routes:
                ipr.route("replace", dst=str(r.prefix), gateway=str(r.via), proto=RTPROT_NETACCT)
    except Exception as exc:  # NetlinkError: e.g. the next hop is not on a connected network
        raise SetupError(f"route install failed: {exc}") from None
    return len(routes), removed


def remove() -> int:
    """Delete every route of ours, and nothing else."""
    n = 0
    with _ipr() as ipr:
        for prefix, _via in installed():
            ipr.route("del", dst=prefix, proto=RTPROT_NETACCT)
            n += 1
    return n

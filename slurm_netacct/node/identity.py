"""Which SLURM node this host is: SLURM's list of nodes, and the addresses of this host.

`netacct-routes install` must not route a node's job prefix to the node itself, and a
command run by hand (no `$SLURMD_NODENAME`) on a node whose SLURM name is not its host name
must still find its database (`db = ".../%n.db"`). Both ask the same question: which of the
nodes SLURM knows has a NodeAddr that is an address of this host (or a NodeHostname that is
this host's name)?
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass

from .. import naming
from ..errors import SetupError


@dataclass(frozen=True)
class SlurmNode:
    """One node as `scontrol -o show nodes` describes it."""

    name: str
    addr: str
    hostname: str


def _scontrol(scontrol: str | None) -> str:
    exe = scontrol or shutil.which("scontrol") or shutil.which("scontrol", path="/usr/bin:/usr/local/bin")
    if exe is None:
        raise SetupError("scontrol not found: give the nodes with --node NAME=ADDR")
    return exe


def slurm_node_list(scontrol: str | None = None) -> list[SlurmNode]:
    """Every node SLURM knows (`scontrol -o show nodes`); SetupError with scontrol's own
    message when it fails (slurmctld not up, no slurm.conf, munge down, ...)."""
    exe = _scontrol(scontrol)
    try:
        r = subprocess.run([exe, "-o", "show", "nodes"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SetupError(f"scontrol show nodes failed: {exc}") from None
    if r.returncode != 0:
        lines = [" ".join(line.split()) for line in (r.stderr or r.stdout).splitlines() if line.strip()]
        said = " / ".join(lines[-2:]) or "no message"  # the last lines say why (retries come first)
        raise SetupError(f"scontrol show nodes failed (exit {r.returncode}): {said[:400]} (is slurmctld up? "
                         "Or give the nodes with --node NAME=ADDR)")
    nodes = []
    for line in r.stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "NodeName" in fields:
            name = fields["NodeName"]
            nodes.append(SlurmNode(name, fields.get("NodeAddr") or name, fields.get("NodeHostName") or name))
    return nodes


def local_addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address of an interface of this host (its network namespace), loopback included."""
    from pyroute2 import IPRoute

    out: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    with IPRoute() as ipr:
        for a in ipr.get_addr():
            value = a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
            if value:
                out.add(ipaddress.ip_address(value.split("%")[0]))
    return out


def is_local(addr: str, mine: set[ipaddress.IPv4Address | ipaddress.IPv6Address] | None = None) -> bool:
    """True if `addr` (an IP address) is one of this host's (False for a name)."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return ip in (local_addresses() if mine is None else mine)


def local_nodes(nodes: dict[str, str]) -> list[str]:
    """The names among `nodes` (name -> NodeAddr) whose address is one of this host's."""
    mine = local_addresses()
    return sorted(name for name, addr in nodes.items() if is_local(addr, mine))


def this_node(db_pattern: str, scontrol: str | None = None) -> str:
    """This host's SLURM node name, for commands run by hand: $SLURMD_NODENAME; else, if the
    database path depends on it (`%n`), the one node SLURM lists with a NodeAddr of this host
    or this host's name as NodeHostname; else (or if SLURM cannot say) the short host name."""
    if os.environ.get("SLURMD_NODENAME") or "%n" not in db_pattern:
        return naming.default_node()
    try:
        nodes = slurm_node_list(scontrol)
    except SetupError:
        return naming.default_node()
    host = naming.short_hostname()
    if any(n.name == host for n in nodes):
        return host
    mine = local_addresses()
    found = sorted({n.name for n in nodes if is_local(n.addr, mine) or n.hostname.split(".")[0] == host})
    return found[0] if len(found) == 1 else naming.default_node()

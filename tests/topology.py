"""A hermetic test network, entirely in network namespaces made (and removed) by the tests.

    job ns(es) --veth-- node(s) ---- br0 in router --+-- lan server  10.77.0.10    fd00:77::10
      (made by the prolog)  10.77.1.2, .3, ...         +-- wan server  198.51.100.10 2001:db8:100::10
                            [controller 10.77.1.100]

Nothing is configured in the machine's root namespace; no packet can leave the machine.

The links between the router and the servers are wires: neither end offloads segmentation
(tso, gso and tx-udp-segmentation off), so every super-packet is cut into MTU-sized packets
there, each with its own headers, as a NIC cuts them. What came off a wire is the truth the
accuracy tests compare with: the server's input hook (uploads) and the router's forward hook
for packets from a server (downloads). A node's uplink merges what it receives (GRO with NAPI
on the node's end, its peer not offloading), as a real NIC does, so a job's downloads reach
its link as super-packets too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
PORT = 5001
LAN4, LAN6 = "10.77.0.10", "fd00:77::10"
WAN4, WAN6 = "198.51.100.10", "2001:db8:100::10"
NODE4, NODE6 = "10.77.1.2", "fd00:77:1::2"
UPLINK = "up0"

SERVER_COUNTERS = """
table inet srvcount {
  counter rx { }
  counter tx { }
  chain input { type filter hook prerouting priority -500; policy accept;
    iif "lo" return
    icmpv6 type { mld-listener-query, mld-listener-report, mld-listener-done, nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect, mld2-listener-report } return
    counter name "rx"
  }
  chain output { type filter hook output priority -300; policy accept;
    oif "lo" return
    icmpv6 type { mld-listener-query, mld-listener-report, mld-listener-done, nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect, mld2-listener-report } return
    counter name "tx"
  }
}
"""


# One table a server, so that reading (and resetting) one server's counters leaves the other's.
WIRE_COUNTERS = """
table inet wire_%(which)s {
  counter from_server { }
  counter to_server { }
  chain passing { type filter hook forward priority -300; policy accept;
    iifname "%(dev)s" counter name "from_server"
    oifname "%(dev)s" counter name "to_server"
  }
}
"""
SERVER_LINKS = {"lan": "l0", "wan": "w0"}  # the router's end of each server's wire
NO_SEGMENTATION_OFFLOAD = ("tso", "off", "gso", "off", "tx-udp-segmentation", "off")


def sh(*argv: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc


def in_ns(ns: str, *argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return sh("nsenter", f"--net=/run/netns/{ns}", *argv, **kw)  # type: ignore[arg-type]


CTL4 = "10.77.1.100"


@dataclass
class Topology:
    """The sandbox: names are prefixed with a per-run tag so parallel runs never collide.

    `nodes` are the names of the node namespaces (`<tag><name>`), each on the cluster LAN
    bridge 10.77.1.0/24 at .2, .3, ...; with `controller`, a host `<tag>ctl` at .100.
    """

    tag: str
    nodes: tuple[str, ...] = ("node",)
    controller: bool = False
    servers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def node(self) -> str:
        return self.node_ns(0)

    def node_ns(self, i: int) -> str:
        return f"{self.tag}{self.nodes[i]}"

    def node_addr(self, i: int) -> str:
        return f"10.77.1.{2 + i}"

    @property
    def ctl(self) -> str:
        return f"{self.tag}ctl"

    @property
    def hosts(self) -> list[tuple[str, str, str]]:
        """(namespace, IPv4, IPv6) of every host on the cluster LAN."""
        out = [(self.node_ns(i), self.node_addr(i), f"fd00:77:1::{2 + i:x}") for i in range(len(self.nodes))]
        if self.controller:
            out.append((self.ctl, CTL4, "fd00:77:1::100"))
        return out

    @property
    def bpffs(self) -> Path:
        """The bpf filesystem the sandbox's nodes pin BPF counters in (config `bpffs`): mounted
        before any prolog runs (a prolog in a private mount namespace then sees the same one)."""
        return Path(f"/run/netacct-{self.tag}bpf")

    @property
    def router(self) -> str:
        return f"{self.tag}rtr"

    @property
    def lan(self) -> str:
        return f"{self.tag}lan"

    @property
    def wan(self) -> str:
        return f"{self.tag}wan"

    @property
    def namespaces(self) -> list[str]:
        return [h[0] for h in self.hosts] + [self.router, self.lan, self.wan]

    def _pair(self, ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
        sh("ip", "-n", ns_a, "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
        sh("ip", "-n", ns_a, "link", "set", if_a, "up")
        sh("ip", "-n", ns_b, "link", "set", if_b, "up")

    def _addr(self, ns: str, dev: str, *addrs: str) -> None:
        for a in addrs:
            extra = ["nodad"] if ":" in a else []
            sh("ip", "-n", ns, "addr", "add", a, "dev", dev, *extra)

    def up(self) -> "Topology":
        try:
            for ns in self.namespaces:
                sh("ip", "netns", "add", ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", self.router, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.router, "link", "set", "br0", "up")
            self._addr(self.router, "br0", "10.77.1.1/24", "fd00:77:1::1/64")
            for i, (ns, a4, a6) in enumerate(self.hosts):
                self._pair(ns, UPLINK, self.router, f"p{i}")
                sh("ip", "-n", self.router, "link", "set", f"p{i}", "master", "br0")
                self._addr(ns, UPLINK, f"{a4}/24", f"{a6}/64")
                sh("ip", "-n", ns, "route", "add", "default", "via", "10.77.1.1")
                sh("ip", "-n", ns, "-6", "route", "add", "default", "via", "fd00:77:1::1")
            for i in range(len(self.hosts)):  # uplinks merge what they receive, as NICs do
                in_ns(self.router, "ethtool", "-K", f"p{i}", *NO_SEGMENTATION_OFFLOAD)
                in_ns(self.hosts[i][0], "ethtool", "-K", UPLINK, "gro", "on")
            self._pair(self.router, "l0", self.lan, "eth0")
            self._pair(self.router, "w0", self.wan, "eth0")
            for ns, dev in ((self.router, "l0"), (self.router, "w0"), (self.lan, "eth0"), (self.wan, "eth0")):
                in_ns(ns, "ethtool", "-K", dev, *NO_SEGMENTATION_OFFLOAD)  # wires
            for which, dev in SERVER_LINKS.items():
                in_ns(self.router, "nft", "-f", "-", input=WIRE_COUNTERS % {"which": which, "dev": dev})
            self._addr(self.router, "l0", "10.77.0.1/24", "fd00:77::1/64")
            self._addr(self.router, "w0", "198.51.100.1/24", "2001:db8:100::1/64")
            self._addr(self.lan, "eth0", f"{LAN4}/24", f"{LAN6}/64")
            self._addr(self.wan, "eth0", f"{WAN4}/24", f"{WAN6}/64")
            for ns, gw4, gw6 in ((self.lan, "10.77.0.1", "fd00:77::1"),
                                 (self.wan, "198.51.100.1", "2001:db8:100::1")):
                sh("ip", "-n", ns, "route", "add", "default", "via", gw4)
                sh("ip", "-n", ns, "-6", "route", "add", "default", "via", gw6)
                in_ns(ns, "nft", "-f", "-", input=SERVER_COUNTERS)
            in_ns(self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
            self.bpffs.mkdir(mode=0o700, exist_ok=True)
            sh("mount", "-t", "bpf", "bpf", str(self.bpffs))
            for ns in (self.lan, self.wan):
                p = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", sys.executable,
                                      str(HERE / "traffic.py"), "serve", str(PORT)],
                                     stdout=subprocess.PIPE)
                self.servers[ns] = p
                assert p.stdout is not None
                if p.stdout.readline().strip() != b"ready":
                    raise RuntimeError(f"traffic server in {ns} did not start")
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        for p in self.servers.values():
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=10)
        self.servers.clear()
        for ns, *_ in self.hosts:  # the prolog's "node table installed" marks for our nodes
            try:
                ino = os.stat(f"/run/netns/{ns}").st_ino
            except OSError:
                continue
            for mark in Path("/run/slurm-netacct").glob(f"node-{ino}-*"):
                mark.unlink(missing_ok=True)
        for ns in self.namespaces:
            if os.path.exists(f"/run/netns/{ns}"):
                sh("ip", "netns", "del", ns, check=False)
        if self.bpffs.exists():
            sh("umount", str(self.bpffs), check=False)
            self.bpffs.rmdir()

    def server_counts(self, which: str, reset: bool = True) -> dict[str, tuple[int, int]]:
        """What came off the wire at the lan or wan server, as {'rx': (packets, bytes), 'tx':
        ...}: rx what the server received (its prerouting hook, before IPv4 reassembles
        fragments, after the router's end of the wire cut super-packets), tx what it sent (the
        router's forward hook, after the server's end cut them).
        Bytes at the IP layer, headers of every segment included."""
        ns = self.lan if which == "lan" else self.wan
        verb = "reset" if reset else "list"
        srv = self._counters(ns, "srvcount", verb)
        wire = self._counters(self.router, f"wire_{which}", verb)
        return {"rx": srv["rx"], "tx": wire["from_server"]}

    def unsegmented(self, which: str, reset: bool = False) -> dict[str, tuple[int, int]]:
        """The same traffic before the wires cut it: {'rx': what the router forwarded towards
        the server, 'tx': what the server's output hook counted}: super-packets, as a counter
        beside the job's link sees them."""
        ns = self.lan if which == "lan" else self.wan
        verb = "reset" if reset else "list"
        return {"rx": self._counters(self.router, f"wire_{which}", verb)["to_server"],
                "tx": self._counters(ns, "srvcount", verb)["tx"]}

    def _counters(self, ns: str, table: str, verb: str) -> dict[str, tuple[int, int]]:
        out = in_ns(ns, "nft", "-j", verb, "counters", "table", "inet", table).stdout
        res: dict[str, tuple[int, int]] = {}
        for item in json.loads(out)["nftables"]:
            c = item.get("counter")
            if c:
                res[c["name"]] = (int(c["packets"]), int(c["bytes"]))
        return res

    def reset_servers(self) -> None:
        for which in ("lan", "wan"):
            self.server_counts(which, reset=True)
            self.unsegmented(which, reset=True)

    def wait_quiet(self, settle: float = 0.15, timeout: float = 10) -> None:
        """Wait until neither server's counters move any more (last ACKs have landed)."""
        last = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = (self.server_counts("lan", reset=False), self.server_counts("wan", reset=False))
            if now == last:
                return
            last = now
            time.sleep(settle)

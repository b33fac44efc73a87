"""Classes in the configured order, first match wins: what the kernel really does, both backends.

Real traffic to the sandbox's LAN server under overlapping classes in several orders, and a
property test that sends one packet to (and from) each of many addresses and reads which
counter the kernel's installed rules charged it to, against a plain first-match loop over the
configuration as written.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TAG, Node, project_leftovers
from slurm_netacct import config, counting, naming
from slurm_netacct.kernel import links, netns
from slurm_netacct.node.plan import NodePlan
from slurm_netacct.traffic import Count, Counters
from topology import LAN4, LAN6, PORT, Topology, sh

# ----------------------------------------------------------------------------- real traffic

SITE = ["10.77.0.10/32", "fd00:77::10/128"]  # the LAN server alone
CAMPUS = ["10.0.0.0/8", "fd00::/8"]  # the pool's class ("lan"): the cluster and the pool
BACKUP = ["10.77.0.0/24", "fd00:77::/64"]  # the server's subnet
PREFIXES = {"site": SITE, "lan": CAMPUS, "backup": BACKUP}
ORDERS = [(["site", "lan", "backup"], "site"),  # a class before the pool's class wins
          (["lan", "site", "backup"], "lan"),  # the pool's class first wins
          (["backup", "site", "lan"], "backup"),  # a class after the pool's class loses... to none
          (["lan", "backup", "site"], "lan")]


@pytest.mark.parametrize("order,expected", ORDERS, ids=["-".join(o) for o, _ in ORDERS])
def test_overlapping_classes_count_in_the_first_listed_class(
        topo: Topology, tmp_path: Path, backend: str, order: list[str], expected: str) -> None:
    node = Node(topo, tmp_path, backend, daemon=(backend == "nftables"), default_class="internet",
                classes={k: PREFIXES[k] for k in order})
    topo.reset_servers()
    try:
        job = 5100
        node.prolog(job)
        assert node.traffic(job, "tcp-up", LAN4, str(PORT), "700000").strip() == "700000"
        assert node.traffic(job, "udp-down", LAN6, str(PORT), "900", "1000").strip() == "900"
        topo.wait_quiet()
        server = node.seen("lan")
        node.epilog(job)
        [rec] = node.report("-j", str(job))
        t = rec["traffic"]
        assert set(t) == {"site", "lan", "backup", "internet"}
        got = t[expected]
        assert (got["out_packets"], got["out_bytes"]) == server["rx"]
        assert (got["in_packets"], got["in_bytes"]) == server["tx"]
        assert got["out_bytes"] > 700_000 and got["in_bytes"] > 900_000 and got["in_packets"] >= 900
        for other in set(t) - {expected}:
            assert t[other] == {"in_bytes": 0, "out_bytes": 0, "in_packets": 0, "out_packets": 0}, other
    finally:
        node.cleanup()
    assert project_leftovers(topo) == []


# ----------------------------------------------------------------------------- the kernel's rules

POOL4, POOL6 = "100.64.0.0/16", "fd00:6e61:cafe::/64"


def first_match(data: dict[str, Any], addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The class of a remote address by the configuration as written: the pool is its class's,
    then each class in the order listed, each prefix in turn; else the default class."""
    classes: dict[str, list[str]] = data["classes"]
    if any(addr in ipaddress.ip_network(p) for p in (POOL4, POOL6)):
        return str(data["pool"].get("class", "lan" if "lan" in classes else next(iter(classes))))
    for name, prefixes in classes.items():
        for p in prefixes:
            if addr in ipaddress.ip_network(p):
                return name
    return str(data.get("default_class", "wan"))


# Prefixes drawn from a few nested blocks, so that classes overlap a lot.
_V4_BASES = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "198.51.100.0/24", "203.0.113.0/24")]
_V6_BASES = [ipaddress.ip_network(n) for n in ("2001:db8::/32", "fd12:3456::/32")]


@st.composite
def _prefix(draw: st.DrawFn) -> str:
    base = draw(st.sampled_from(_V4_BASES + _V6_BASES))
    max_len = 32 if base.version == 4 else 128
    length = draw(st.integers(base.prefixlen, min(max_len, base.prefixlen + 10)))
    width = max_len - base.prefixlen
    offset = draw(st.integers(0, (1 << width) - 1)) if width else 0
    addr = int(base.network_address) + offset
    return str(ipaddress.ip_network((addr, length), strict=False))


@st.composite
def class_configs(draw: st.DrawFn) -> dict[str, Any]:
    """An ordered [classes] table of 2-4 overlapping classes; maybe the pool's class among them."""
    names = draw(st.lists(st.sampled_from(["lan", "site", "backup", "hpc", "peer"]), min_size=2,
                          max_size=4, unique=True))
    classes = {n: draw(st.lists(_prefix(), min_size=1, max_size=4)) for n in names}
    pool_class = draw(st.sampled_from(names))
    return {"default_class": "internet", "classes": classes,
            "pool": {"ipv4": POOL4, "ipv6": POOL6, "class": pool_class}}


def _addresses(data: dict[str, Any], draw: st.DrawFn) -> list[Any]:
    """Addresses at the edges of and inside every prefix, and some outside them all."""
    out = []
    for prefixes in data["classes"].values():
        for p in map(ipaddress.ip_network, prefixes):
            out += [p.network_address, p.broadcast_address,
                    p.network_address + draw(st.integers(0, p.num_addresses - 1))]
            if p.prefixlen > 8:  # just outside it
                out += [p.network_address - 1, p.broadcast_address + 1]
    out += [ipaddress.ip_address(a) for a in ("192.0.2.77", "2001:db9::1", "100.64.3.3", "fd00:6e61:cafe::99")]
    return [a for a in dict.fromkeys(out)
            if not (a.is_multicast or a.is_loopback or a.is_unspecified or a.is_link_local
                    or (a.version == 4 and (int(a) >> 24 in (0, 127) or int(a) >= 0xE0000000)))]


class Lab:
    """A node namespace of the test's own; in it, job namespaces built and ruled by the real code.

    Packets out of a job: UDP datagrams from a socket inside it, to any address (the lab node
    drops them: it has no route anywhere and forwards nothing). Packets into a job: UDP
    datagrams written as whole frames onto the node's end of the link, from any source address,
    to a socket listening in the job (so it sends nothing back)."""

    NODE_IF = "lab0"

    def __init__(self) -> None:
        self.node = f"{TAG}clsnode"
        self.job_path = Path(f"/run/netns/{TAG}clsjob")
        self.bpffs = Path(f"/run/netacct-{TAG}clsbpf")  # for the BPF way of counting
        sh("ip", "netns", "add", self.node)
        self.node_path = Path(f"/run/netns/{self.node}")
        try:  # nothing the job sends comes back (no ICMP errors): only what the test writes
            sh("nsenter", f"--net={self.node_path}", "nft", "-f", "-", input=(
                "table inet lab {\n  chain pre { type filter hook prerouting priority -500; policy accept;\n"
                "    icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit } accept\n"
                "    drop\n  }\n}\n"))
        except BaseException:
            sh("ip", "netns", "del", self.node, check=False)
            raise

    def close(self) -> None:
        self.drop_job()
        sh("ip", "netns", "del", self.node, check=False)
        if self.bpffs.exists():
            sh("umount", str(self.bpffs), check=False)
            self.bpffs.rmdir()

    def drop_job(self) -> None:
        if os.path.lexists(self.job_path):
            with netns.entered(self.node_path):
                links.delete_link(self.NODE_IF)
            netns.remove(self.job_path)

    def job(self, cfg: config.Config) -> counting.Counted:
        return counting.Counted(naming.JobNames(1, self.job_path.name, self.job_path, self.NODE_IF),
                                tuple(cfg.class_names))

    def make_job(self, cfg: config.Config, be: counting.Counter) -> "JobEnds":
        plan = NodePlan(node="n1", uplink="lo", pool4=cfg.pool_ipv4, pool6=cfg.pool_ipv6)
        addrs = links.JobAddresses(ipv4=plan.pool4[2], gateway4=plan.gateway4,
                                   ipv6=plan.pool6[2] if plan.pool6 else None)
        with netns.entered(self.node_path):
            netns.create(self.job_path)
            links.build_link(self.job_path, self.NODE_IF, "eth0", addrs)
            be.install(cfg, self.job(cfg), plan)
        return JobEnds(self, addrs)


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _csum(data: bytes) -> int:
    return ~_sum16(data) & 0xFFFF


class JobEnds:
    """Sockets at both ends of one lab job's link."""

    PORT = 9
    PAYLOAD = b"x" * 32

    def __init__(self, lab: Lab, addrs: links.JobAddresses) -> None:
        self.addrs = addrs
        with netns.entered(lab.job_path):  # sockets stay bound to the namespace they were made in
            self.out4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.out6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            self.sink = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            self.sink.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            self.sink.bind(("::", self.PORT))
            self.sink.setblocking(False)
        job_mac = _mac_in(lab.job_path, "eth0")
        with netns.entered(lab.node_path):
            self.raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            self.raw.bind((lab.NODE_IF, 0))
            node_mac = self.raw.getsockname()[4]
        self.eth = job_mac + node_mac

    def close(self) -> None:
        for s in (self.out4, self.out6, self.sink, self.raw):
            s.close()

    def send_out(self, addr: Any) -> int:
        """One datagram from the job to addr; its IP-layer size."""
        s = self.out4 if addr.version == 4 else self.out6
        s.sendto(self.PAYLOAD, (str(addr), self.PORT))
        return len(self.PAYLOAD) + (28 if addr.version == 4 else 48)

    def send_in(self, src: Any) -> int:
        """One datagram from src to the job, written onto the node's end of the link; its size."""
        try:  # keep the sink's queue short (what it drops was counted all the same)
            while self.sink.recv(64):
                pass
        except BlockingIOError:
            pass
        dst = self.addrs.ipv4 if src.version == 4 else self.addrs.ipv6
        assert dst is not None
        udp_len = 8 + len(self.PAYLOAD)
        if src.version == 4:
            udp = struct.pack("!HHHH", 40000, self.PORT, udp_len, 0) + self.PAYLOAD
            hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 1, 0, 64, 17, 0, src.packed, dst.packed)
            hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
            self.raw.send(self.eth + b"\x08\x00" + hdr + udp)
            return 20 + udp_len
        pseudo = src.packed + dst.packed + struct.pack("!I3xB", udp_len, 17)
        udp = struct.pack("!HHHH", 40000, self.PORT, udp_len, 0) + self.PAYLOAD
        csum = _csum(pseudo + udp) or 0xFFFF
        udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
        hdr = struct.pack("!IHBB16s16s", 6 << 28, udp_len, 17, 64, src.packed, dst.packed)
        self.raw.send(self.eth + b"\x86\xdd" + hdr + udp)
        return 40 + udp_len


def _mac_in(ns: Path, ifname: str) -> bytes:
    """The MAC address of a link in the namespace at ns (by netlink: sysfs shows our own)."""
    out = subprocess.run(["ip", "-n", ns.name, "-o", "link", "show", ifname],
                         capture_output=True, text=True, check=True).stdout
    return bytes.fromhex(out.split("link/ether ")[1].split()[0].replace(":", ""))


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces)", pytrace=False)
    lab_ = Lab()
    try:
        yield lab_
    finally:
        lab_.close()


def _charged(before: Counters, after: Counters, direction: str) -> dict[str, tuple[int, int]]:
    """The counters of one direction that moved: class -> (packets, bytes)."""
    out = {}
    for (klass, d), c in after.items():
        b = before.get((klass, d), Count())
        if d == direction and (c.packets, c.bytes) != (b.packets, b.bytes):
            out[klass] = (c.packets - b.packets, c.bytes - b.bytes)
    return out


def _read_until_moved(be: counting.Counter, cfg: config.Config, job: counting.Counted, before: Counters,
                      timeout: float = 2.0) -> Counters:
    """The counters once any has moved since `before` (or, after timeout, as they are): a
    frame written onto the node's end of the link reaches the job's stack from a queue, and a
    datagram the job sends may wait for its neighbour entry."""
    deadline = time.monotonic() + timeout
    while True:
        now = be.read(cfg, job)
        if now != before or time.monotonic() > deadline:
            return now
        time.sleep(0.001)


def _check_classification(lab: Lab, backend_name: str, data: dict[str, Any], draw: st.DrawFn) -> None:
    cfg = config.parse({**data, "bpffs": str(lab.bpffs)})
    be = counting.named(backend_name)
    ends = lab.make_job(cfg, be)
    job = lab.job(cfg)
    try:
        for addr in _addresses(data, draw):
            want = first_match(data, addr)
            before = be.read(cfg, job)
            size = ends.send_out(addr)
            # an IPv6 datagram may wait in the job's stack for neighbour discovery (slow under load)
            after = _read_until_moved(be, cfg, job, before)
            assert _charged(before, after, "out") == {want: (1, size)}, f"to {addr}: expected {want}"
            size = ends.send_in(addr)
            final = _read_until_moved(be, cfg, job, after)  # the frame is taken in asynchronously
            assert _charged(after, final, "in") == {want: (1, size)}, f"from {addr}: expected {want}"
    finally:
        ends.close()
        be.remove(cfg, job)
        lab.drop_job()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=class_configs(), draw=st.data())
def test_bpf_classifies_like_first_match(lab: Lab, data: dict[str, Any], draw: st.DataObject) -> None:
    _check_classification(lab, "bpf", data, draw.draw)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=class_configs(), draw=st.data())
def test_nftables_classifies_like_first_match(lab: Lab, data: dict[str, Any], draw: st.DataObject) -> None:
    _check_classification(lab, "nftables", data, draw.draw)


@pytest.mark.slow
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=class_configs(), draw=st.data())
def test_iptables_classifies_like_first_match(lab: Lab, data: dict[str, Any], draw: st.DataObject) -> None:
    _check_classification(lab, "iptables", data, draw.draw)

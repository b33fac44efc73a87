"""Real traffic through real namespaces, counted against what the wire carried.

The sandbox's links to the servers are wires (no segmentation offload at either end) and the
node's uplink merges what it receives, as NICs do (tests/topology.py): a job's TCP leaves its
link as super-packets and its downloads reach it as super-packets, and the truth is taken
where the packets come off a wire. The default way of counting (BPF) must equal it, bytes and
packets; the legacy netfilter ways count the super-packets, and how far they fall short is
measured here and in the README ("What is counted"). Traffic that never crosses a wire (to
the node, to another job) is compared with a capture of the job's link, segmented in software
(tests/wire.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import EXACT, ROOT, Node, fast_few
from slurm_netacct.counting.bpfcore import read_pinned
from topology import LAN4, LAN6, NODE4, PORT, WAN4, WAN6, in_ns
from wire import Capture

TARGETS = {("lan", 4): LAN4, ("lan", 6): LAN6, ("wan", 4): WAN4, ("wan", 6): WAN6}
OTHER = {"lan": "wan", "wan": "lan"}
ZERO = {"in_bytes": 0, "out_bytes": 0, "in_packets": 0, "out_packets": 0}
# How far below the wire the legacy (netfilter) counts of bulk TCP may fall (README: 3.4-4.7%).
LEGACY_BYTES_FLOOR = 0.93


@pytest.fixture(params=["bpf", "cgroup", pytest.param("nftables", marks=pytest.mark.slow),
                        pytest.param("iptables", marks=pytest.mark.slow)])
def backend(request: pytest.FixtureRequest) -> str:
    """Here the cgroup engine is one more way of counting: every case for it too."""
    return str(request.param)


def _traffic_of(node: Node, job: int) -> dict[str, dict[str, int]]:
    [rec] = node.report("-j", str(job))
    assert rec["job_id"] == str(job) and rec["state"] == "completed"
    return rec["traffic"]


def _pair(t: dict[str, int], direction: str) -> tuple[int, int]:
    return t[f"{direction}_packets"], t[f"{direction}_bytes"]


def _check(node: Node, counted: tuple[int, int], wire: tuple[int, int], segmented: bool) -> None:
    """Counted (packets, bytes) against the wire's: equal for BPF; for the netfilter ways equal
    when nothing was segmented, else short by at most the documented margin."""
    if node.backend in EXACT or not segmented:
        assert counted == wire
    else:
        assert LEGACY_BYTES_FLOOR * wire[1] <= counted[1] <= wire[1], (counted, wire)
        assert counted[0] <= wire[0], (counted, wire)


@pytest.mark.parametrize("kind", fast_few(["tcp-up", "tcp-down", "udp-up", "udp-down"], ["tcp-up", "tcp-down"]))
@pytest.mark.parametrize("family", fast_few([4, 6], [6]))
@pytest.mark.parametrize("klass", fast_few(["lan", "wan"], ["wan"]))
def test_counts_equal_what_came_off_the_wire(node: Node, klass: str, family: int, kind: str) -> None:
    job = 1000 + family * 10 + (klass == "wan")
    node.prolog(job)
    host = TARGETS[(klass, family)]
    if kind.startswith("tcp"):
        payload = 3_000_000
        assert node.traffic(job, kind, host, str(PORT), str(payload)).strip() == str(payload)
    else:
        count, size = 1000, 1200
        assert node.traffic(job, kind, host, str(PORT), str(count), str(size)).strip() == str(count)
        payload = count * size
    node.topo.wait_quiet()
    before_wire = node.topo.unsegmented(klass)  # (read first: reading the truth resets both)
    wire = node.topo.server_counts(klass)
    other = node.topo.server_counts(OTHER[klass])
    diag = read_pinned(str(node.pin(job)), node.cfg.class_names) if node.backend in EXACT else None
    node.epilog(job)
    t = _traffic_of(node, job)

    tcp = kind.startswith("tcp")
    if tcp:  # the test means something: the wire cut what the job's side had as super-packets
        up = kind == "tcp-up"
        assert (before_wire["rx"] if up else before_wire["tx"])[0] < wire["rx" if up else "tx"][0] / 5
        if diag is not None:  # ... and the job's link saw them so, both ways (GRO on the uplink)
            assert diag.gso_skbs["out" if up else "in"] > 0
    _check(node, _pair(t[klass], "out"), wire["rx"], segmented=tcp and kind == "tcp-up")
    _check(node, _pair(t[klass], "in"), wire["tx"], segmented=tcp and kind == "tcp-down")
    if node.backend not in EXACT and kind == "tcp-up":  # netfilter sees what reached the wire uncut
        assert _pair(t[klass], "out") == before_wire["rx"]
    # The payload is in there (plus headers, handshake, ACKs) ...
    assert t[klass]["out_bytes" if kind.endswith("up") else "in_bytes"] > payload
    # ... and nothing went to, or was counted in, the other class.
    assert t[OTHER[klass]] == ZERO
    assert other == {"rx": (0, 0), "tx": (0, 0)}


def test_200_short_lived_processes(node: Node) -> None:
    job = 2001
    node.prolog(job)
    # 200 forked subshells, each lives just long enough to send one 100-byte datagram.
    script = (f"for i in $(seq 200); do ( printf '%100s' x > /dev/udp/{LAN4}/{PORT} ) & done; wait")
    node.run_in_job(job, "bash", "-c", script)
    node.topo.wait_quiet()
    wire = node.topo.server_counts("lan")
    node.epilog(job)
    t = _traffic_of(node, job)
    assert wire["rx"] == (200, 200 * (100 + 28))  # IPv4 + UDP headers: 28 bytes
    assert _pair(t["lan"], "out") == wire["rx"]
    assert t["wan"] == ZERO


def test_daemon_outliving_its_parent(node: Node, tmp_path: Path) -> None:
    job = 2002
    node.prolog(job)
    done = tmp_path / "daemon.done"
    node.traffic(job, "daemon-up", WAN4, str(PORT), "500000", str(done))  # returns at once
    deadline = time.monotonic() + 30
    while not done.exists():
        assert time.monotonic() < deadline, "daemon never finished"
        time.sleep(0.05)
    node.topo.wait_quiet()
    wire = node.topo.server_counts("wan")
    node.epilog(job)
    t = _traffic_of(node, job)
    assert wire["rx"][1] > 500_000
    _check(node, _pair(t["wan"], "out"), wire["rx"], segmented=True)
    _check(node, _pair(t["wan"], "in"), wire["tx"], segmented=False)
    assert t["lan"] == ZERO


def test_icmp_both_families_and_fragments(node: Node) -> None:
    """ping (no ping binary here: raw ICMP from Python as root in the job), 1000-byte echoes
    and 3000-byte ones that IP fragments: every fragment is a packet on the wire."""
    job = 2007
    node.prolog(job)
    code = ("import socket, struct, sys\n"
            "def csum(b):\n"
            "    b += b'\\0' * (len(b) % 2); s = sum(struct.unpack(f'!{len(b)//2}H', b))\n"
            "    while s >> 16: s = (s & 0xffff) + (s >> 16)\n"
            "    return ~s & 0xffff\n"
            "for host, fam, proto, typ in ((sys.argv[1], socket.AF_INET, 1, 8), (sys.argv[2], socket.AF_INET6, 58, 128)):\n"
            "    s = socket.socket(fam, socket.SOCK_RAW, proto); s.settimeout(5)\n"
            "    for i, size in enumerate([1000] * 5 + [3000] * 5):\n"
            "        body = struct.pack('!HH', 7, i) + b'p' * size\n"
            "        msg = struct.pack('!BBH', typ, 0, 0) + body\n"
            "        if fam == socket.AF_INET: msg = struct.pack('!BBH', typ, 0, csum(msg)) + body\n"
            "        s.sendto(msg, (host, 0))\n"
            "        while True:\n"
            "            data = s.recv(65536)\n"
            "            if fam == socket.AF_INET6 and data[0] == 129 or fam == socket.AF_INET and data[20] == 0: break\n")
    node.run_in_job(job, sys.executable, "-c", code, WAN4, WAN6)
    node.topo.wait_quiet()
    wire = node.topo.server_counts("wan")
    node.epilog(job)
    t = _traffic_of(node, job)
    # 10 echoes each way per family; the 3000-byte ones in 3 fragments each (MTU 1500).
    # Netfilter in the job sees the datagram before it is fragmented (and, IPv4, after it is
    # reassembled): one packet where the wire carries three.
    assert wire["rx"][0] == wire["tx"][0] == 2 * (5 + 5 * 3)
    if node.backend == "cgroup":  # the job's socket's datagrams, before IP fragments them (out)
        for direction, seen in (("out", wire["rx"]), ("in", wire["tx"])):  # and after reassembly (in)
            packets, nbytes = _pair(t["wan"], direction)
            assert packets == 2 * (5 + 5), (direction, packets)
            assert LEGACY_BYTES_FLOOR * seen[1] <= nbytes < seen[1], (direction, nbytes, seen)
        return
    _check(node, _pair(t["wan"], "out"), wire["rx"], segmented=True)
    _check(node, _pair(t["wan"], "in"), wire["tx"], segmented=True)


NODE_COUNTERS = """
table inet nodecount {
  counter rx { }
  counter tx { }
  chain input { type filter hook input priority -300; policy accept;
    iifname "%(ifname)s" meta l4proto tcp counter name "rx"
  }
  chain output { type filter hook output priority -300; policy accept;
    oifname "%(ifname)s" meta l4proto tcp counter name "tx"
  }
}
"""


def test_traffic_to_the_nodes_own_address(node: Node) -> None:
    """It goes through the node's INPUT, not FORWARD; counted all the same, as LAN. No wire:
    BPF's count equals a capture of the link segmented in software; netfilter's equals the
    node's own netfilter counters (the same super-packets)."""
    job = 2003
    node.prolog(job)
    ns = node.topo.node
    if node.backend == "cgroup":
        _node_local_is_not_counted(node, job, NODE4)
        return
    in_ns(ns, "nft", "-f", "-", input=NODE_COUNTERS % {"ifname": f"na{job}"})
    srv = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", sys.executable,
                            str(ROOT / "tests" / "traffic.py"), "serve", "5002"], stdout=subprocess.PIPE)
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == b"ready"
        with Capture(Path(f"/run/netns/{ns}"), f"na{job}") as cap:
            node.traffic(job, "tcp-up", NODE4, "5002", "1000000")
            node.traffic(job, "tcp-down", NODE4, "5002", "700000")
            time.sleep(0.3)
        live = node.live(job)
        seen = {c["counter"]["name"]: (c["counter"]["packets"], c["counter"]["bytes"])
                for c in json.loads(in_ns(ns, "nft", "-j", "list", "counters", "table", "inet", "nodecount").stdout)["nftables"]
                if "counter" in c}
    finally:
        srv.terminate()
        srv.wait(timeout=10)
        in_ns(ns, "nft", "delete", "table", "inet", "nodecount")
    if node.backend == "bpf":
        assert tuple(live[("lan", "out")]) == cap.totals()["out"]
        assert tuple(live[("lan", "in")]) == cap.totals()["in"]
        assert live[("lan", "out")].packets > seen["rx"][0]  # the node's stack saw super-packets
    else:
        assert tuple(live[("lan", "out")]) == seen["rx"]
        assert tuple(live[("lan", "in")]) == seen["tx"]
    assert live[("lan", "out")].bytes > 1_000_000 and live[("lan", "in")].bytes > 700_000
    assert live[("wan", "out")].bytes == 0 and live[("wan", "in")].bytes == 0
    node.epilog(job)


def _node_local_is_not_counted(node: Node, job: int, addr: str, server_job: int | None = None) -> None:
    """The cgroup engine: a job shares the node's network namespace, so what it exchanges with
    the node's own addresses (or with another job of the node: the same addresses) goes over
    the node's loopback interface, which the cgroup programs do not count (README, "Choosing an
    engine"). Checked with real traffic both ways; the job's counters stay at zero."""
    ns = node.topo.node
    serve = [sys.executable, str(ROOT / "tests" / "traffic.py"), "serve", "5002"]
    if server_job is not None:
        serve = [str(Path(sys.executable).parent / "netacct-exec"), "--job", str(server_job), "--", *serve]
    srv = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", *serve], stdout=subprocess.PIPE,
                           env=dict(os.environ, NETACCT_CONFIG=str(node.config_path)))
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == b"ready"
        node.traffic(job, "tcp-up", addr, "5002", "1000000")
        node.traffic(job, "tcp-down", addr, "5002", "700000")
    finally:
        srv.terminate()
        srv.wait(timeout=10)
    for j in (job,) if server_job is None else (job, server_job):
        assert all(c.bytes == 0 and c.packets == 0 for c in node.live(j).values()), j
    node.epilog(job)


def test_two_jobs_on_one_node_talk_to_each_other(node: Node) -> None:
    a, b = 2004, 2005
    node.prolog(a)
    node.prolog(b)
    if node.backend == "cgroup":
        _node_local_is_not_counted(node, b, NODE4, server_job=a)
        node.epilog(a)
        return
    addr_a = re.search(r"inet (100\.64\.\d+\.\d+)/32", node.run_in_job(a, "ip", "-o", "-4", "addr").stdout)
    assert addr_a
    srv = subprocess.Popen([str(Path(sys.executable).parent / "netacct-exec"), "--job", str(a), "--",
                            sys.executable, str(ROOT / "tests" / "traffic.py"), "serve", "5003"],
                           stdout=subprocess.PIPE, env=dict(os.environ, NETACCT_CONFIG=str(node.config_path)))
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == b"ready"
        with Capture(Path(f"/run/netns/{node.topo.node}"), f"na{b}") as cap:
            node.traffic(b, "tcp-up", addr_a.group(1), "5003", "2000000")
            node.traffic(b, "tcp-down", addr_a.group(1), "5003", "1000000")
            time.sleep(0.3)
    finally:
        srv.terminate()
        srv.wait(timeout=10)
    node.epilog(a)
    node.epilog(b)
    ta, tb = _traffic_of(node, a), _traffic_of(node, b)
    # What one sent, the other received: exactly, and as LAN (job addresses are pool_class).
    assert tb["lan"]["out_bytes"] == ta["lan"]["in_bytes"] > 2_000_000
    assert tb["lan"]["in_bytes"] == ta["lan"]["out_bytes"] > 1_000_000
    assert tb["lan"]["out_packets"] == ta["lan"]["in_packets"]
    assert tb["lan"]["in_packets"] == ta["lan"]["out_packets"]
    if node.backend == "bpf":  # and as a wire between them would carry it
        assert (_pair(tb["lan"], "out"), _pair(tb["lan"], "in")) == (cap.totals()["out"], cap.totals()["in"])
    assert ta["wan"] == ZERO and tb["wan"] == ZERO


def test_loopback_inside_the_job_is_not_counted(bpf_node: Node) -> None:
    job = 2006
    bpf_node.prolog(job)
    bpf_node.run_in_job(job, "bash", "-c", "for i in $(seq 20); do printf '%1000s' x > /dev/udp/127.0.0.1/9; done")
    live = bpf_node.live(job)
    assert all(c.bytes == 0 and c.packets == 0 for c in live.values())
    bpf_node.epilog(job)

"""Real traffic through real namespaces: counted bytes equal what the other side saw."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, Node, fast_few
from topology import LAN4, LAN6, NODE4, PORT, WAN4, WAN6, in_ns

TARGETS = {("lan", 4): LAN4, ("lan", 6): LAN6, ("wan", 4): WAN4, ("wan", 6): WAN6}
OTHER = {"lan": "wan", "wan": "lan"}
ZERO = {"in_bytes": 0, "out_bytes": 0, "in_packets": 0, "out_packets": 0}


def _traffic_of(node: Node, job: int) -> dict[str, dict[str, int]]:
    [rec] = node.report("-j", str(job))
    assert rec["job_id"] == str(job) and rec["state"] == "completed"
    return rec["traffic"]


@pytest.mark.parametrize("kind", fast_few(["tcp-up", "tcp-down", "udp-up", "udp-down"], ["tcp-up", "udp-down"]))
@pytest.mark.parametrize("family", fast_few([4, 6], [6]))
@pytest.mark.parametrize("klass", fast_few(["lan", "wan"], ["wan"]))
def test_exact_payload(node: Node, klass: str, family: int, kind: str) -> None:
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
    server = node.topo.server_counts(klass)
    other = node.topo.server_counts(OTHER[klass])
    node.epilog(job)
    t = _traffic_of(node, job)

    # The job's bytes and packets equal the server's IP-layer counts, both ways.
    assert t[klass]["out_bytes"] == server["rx"][1]
    assert t[klass]["in_bytes"] == server["tx"][1]
    assert t[klass]["out_packets"] == server["rx"][0]
    assert t[klass]["in_packets"] == server["tx"][0]
    # ... the payload is in there (plus headers, handshake, ACKs) ...
    sent_by_job = kind.endswith("up")
    assert t[klass]["out_bytes" if sent_by_job else "in_bytes"] > payload
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
    server = node.topo.server_counts("lan")
    node.epilog(job)
    t = _traffic_of(node, job)
    assert server["rx"] == (200, 200 * (100 + 28))  # IPv4 + UDP headers: 28 bytes
    assert (t["lan"]["out_packets"], t["lan"]["out_bytes"]) == server["rx"]
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
    server = node.topo.server_counts("wan")
    node.epilog(job)
    t = _traffic_of(node, job)
    assert server["rx"][1] > 500_000
    assert (t["wan"]["out_packets"], t["wan"]["out_bytes"]) == server["rx"]
    assert (t["wan"]["in_packets"], t["wan"]["in_bytes"]) == server["tx"]
    assert t["lan"] == ZERO


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
    """It goes through the node's INPUT, not FORWARD; counted all the same, as LAN."""
    job = 2003
    node.prolog(job)
    ns = node.topo.node
    in_ns(ns, "nft", "-f", "-", input=NODE_COUNTERS % {"ifname": f"na{job}"})
    srv = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", sys.executable,
                            str(ROOT / "tests" / "traffic.py"), "serve", "5002"], stdout=subprocess.PIPE)
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == b"ready"
        node.traffic(job, "tcp-up", NODE4, "5002", "1000000")
        node.traffic(job, "tcp-down", NODE4, "5002", "700000")
        time.sleep(0.3)
        live = node.live(job)
        import json
        seen = {c["counter"]["name"]: (c["counter"]["packets"], c["counter"]["bytes"])
                for c in json.loads(in_ns(ns, "nft", "-j", "list", "counters", "table", "inet", "nodecount").stdout)["nftables"]
                if "counter" in c}
    finally:
        srv.terminate()
        srv.wait(timeout=10)
        in_ns(ns, "nft", "delete", "table", "inet", "nodecount")
    assert (live[("lan", "out")].packets, live[("lan", "out")].bytes) == seen["rx"]
    assert (live[("lan", "in")].packets, live[("lan", "in")].bytes) == seen["tx"]
    assert live[("lan", "out")].bytes > 1_000_000 and live[("lan", "in")].bytes > 700_000
    assert live[("wan", "out")].bytes == 0 and live[("wan", "in")].bytes == 0
    node.epilog(job)


def test_two_jobs_on_one_node_talk_to_each_other(node: Node) -> None:
    a, b = 2004, 2005
    node.prolog(a)
    node.prolog(b)
    addr_a = re.search(r"inet (100\.64\.\d+\.\d+)/32", node.run_in_job(a, "ip", "-o", "-4", "addr").stdout)
    assert addr_a
    srv = subprocess.Popen([str(Path(sys.executable).parent / "netacct-exec"), "--job", str(a), "--",
                            sys.executable, str(ROOT / "tests" / "traffic.py"), "serve", "5003"],
                           stdout=subprocess.PIPE, env=dict(os.environ, NETACCT_CONFIG=str(node.config_path)))
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == b"ready"
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
    assert ta["wan"] == ZERO and tb["wan"] == ZERO


def test_loopback_inside_the_job_is_not_counted(nft_node: Node) -> None:
    job = 2006
    nft_node.prolog(job)
    nft_node.run_in_job(job, "bash", "-c", "for i in $(seq 20); do printf '%1000s' x > /dev/udp/127.0.0.1/9; done")
    live = nft_node.live(job)
    assert all(c.bytes == 0 and c.packets == 0 for c in live.values())
    nft_node.epilog(job)

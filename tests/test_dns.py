"""Name resolution inside a job when the node's resolver is a loopback stub (127.0.0.53)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT, VENV_BIN, Node
from topology import LAN4, in_ns


def test_job_resolves_names_through_the_nodes_loopback_stub(node: Node, tmp_path: Path) -> None:
    job = 4001
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.53\noptions timeout:2 attempts:1\n")
    stub = subprocess.Popen(["nsenter", f"--net=/run/netns/{node.topo.node}", sys.executable,
                             str(ROOT / "tests" / "dnsstub.py"), "127.0.0.53", f"lanserver.netacct.test={LAN4}"],
                            stdout=subprocess.PIPE)
    try:
        assert stub.stdout is not None and stub.stdout.readline().strip() == b"ready"
        # The node's /etc/resolv.conf points at the stub: give the prolog and the job a mount
        # namespace of their own where it does (slave: nothing made here leaks out).
        script = f"""
set -e
mount --bind {resolv} /etc/resolv.conf
nsenter --net=/run/netns/{node.topo.node} {ROOT}/prolog
{VENV_BIN}/netacct-exec --job {job} --user nobody -- getent ahostsv4 lanserver.netacct.test
nsenter --net=/run/netns/{node.topo.node} {ROOT}/epilog
"""
        env = node.env(job)
        env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
        node.started.add(job)
        r = subprocess.run(["unshare", "-m", "--propagation", "slave", "bash", "-c", script],
                           env=env, capture_output=True, text=True, timeout=120)
    finally:
        stub.terminate()
        stub.wait(timeout=10)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == LAN4
    assert "DNS to 127.0.0.53" in node.log.read_text()
    [rec] = node.report("-j", str(job))
    t = rec["traffic"]
    # The queries went to the node (the job's gateway, a pool address): LAN, nothing as WAN.
    assert t["lan"]["out_packets"] >= 1 and t["lan"]["in_packets"] >= 1
    assert t["wan"]["out_packets"] == 0 and t["wan"]["in_packets"] == 0
    # The redirect rules are the node's (one set for all jobs), in the backend's own form.
    if node.backend != "iptables":  # BPF counting too: its node rules are nftables'
        rules = in_ns(node.topo.node, "nft", "list", "table", "inet", "netacct_node").stdout
        assert "ip daddr 100.64.0.1 meta l4proto { tcp, udp } th dport 53 dnat ip to 127.0.0.53" in rules
    else:  # python-iptables writes legacy x_tables
        rules = in_ns(node.topo.node, "iptables-legacy", "-t", "nat", "-S", "NETACCT_DNS").stdout
        for proto in ("udp", "tcp"):
            assert (f"-A NETACCT_DNS -d 100.64.0.1/32 -i na+ -p {proto} -m {proto} --dport 53 "
                    "-j DNAT --to-destination 127.0.0.53") in rules, rules

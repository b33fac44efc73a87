"""End to end with real SLURM daemons and the cgroup engine: slurmctld + three slurmd, the SPANK
plugin with engine=cgroup, no network change anywhere (no job namespace, link, route or NAT).

This machine runs SLURM with cgroup v1 beside the unified hierarchy (SLURM's cgroup/v2 plugin
refuses hybrid hosts), so the engine counts a cgroup of its own per job (mode "own"), under a
subtree of the tests' own; the SPANK plugin moves every task, the batch script included, into
it before it execs. Mode "slurm" is tested on SLURM's exact cgroup/v2 layout in test_cgroup.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ROOT, need_root
from e2e import USER, Cluster, running_cluster
from slurm_netacct.kernel import cgroup
from slurmharness import ensure_user, make_workdir
from topology import LAN4, PORT, WAN4, WAN6, Topology, in_ns

pytestmark = pytest.mark.e2e

BASE = f"nsc{os.getpid() % 100000}-"
JOB_PREFIX = f"{BASE}%h-"  # several slurmd on this host: the host name keeps their jobs apart
CG_ROOT = Path("/sys/fs/cgroup/unified") / f"{BASE}cg"


def _leftovers(topo: Topology) -> list[str]:
    pins = topo.bpffs / "slurm-netacct"
    found = [f"pin {p.name}" for p in (pins.iterdir() if pins.is_dir() else ()) if p.name.startswith(BASE)]
    found += [f"cgroup {p}" for p in (CG_ROOT.iterdir() if CG_ROOT.is_dir() else ()) if p.is_dir()]
    found += [f"netns {n}" for n in os.listdir("/run/netns") if n.startswith(BASE)]
    for i in range(len(topo.nodes)):
        found += [f"link {m}" for m in re.findall(r"^\d+: (na\d+)[@:]", in_ns(topo.node_ns(i), "ip", "-o", "link").stdout, re.M)]
        if "100.64." in in_ns(topo.node_ns(i), "ip", "route").stdout:
            found.append(f"route in {topo.node_ns(i)}")
    return found


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    need_root()
    ensure_user(USER)
    subprocess.run(["make", "-s", "-C", str(ROOT / "spank")], check=True)
    topo = Topology(f"sc{os.getpid() % 10000}-", nodes=("n1", "n2", "n3"), controller=True)
    work = make_workdir("netacct-e2e-cg")
    for f in ("traffic.py", "pairs.py", "cgtamper.py", "tamper.py"):
        shutil.copy(ROOT / "tests" / f, work / f)
    config = work / "netacct.toml"
    config.write_text(f'engine = "cgroup"\nnetns_prefix = "{JOB_PREFIX}"\n'
                      f'db = "{work}/%n.db"\nlog_file = "{work}/netacct-%n.log"\nspool_dir = "{work}/spool-%n"\n'
                      f'bpffs = "{topo.bpffs}"\n[cgroup]\nmode = "own"\nroot = "{CG_ROOT}"\n')
    topo.up()
    leftovers: list[str] = []
    plug = (f"required {ROOT}/spank/netacct.so engine=cgroup cgroup=own cgroup_root={CG_ROOT} "
            f"bpffs={topo.bpffs} prefix={JOB_PREFIX}")
    try:
        with running_cluster(topo, work, config, plug) as c:
            yield c
    finally:
        try:
            leftovers = _leftovers(topo)
        finally:
            topo.down()
            cgroup.remove_tree(CG_ROOT)  # (what is left was reported above) then removed
        assert leftovers == [], f"left behind: {leftovers}"
        shutil.rmtree(work, ignore_errors=True)


def _pair(t: dict[str, int], direction: str) -> tuple[int, int]:
    return t[f"{direction}_packets"], t[f"{direction}_bytes"]


def test_batch_script_from_its_first_packet_and_srun_steps_are_counted(cluster: Cluster) -> None:
    cluster.topo.reset_servers()
    script = f"""#!/usr/bin/python3
#SBATCH -N1 -w n1
import socket, subprocess, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)   # the script's first packets
for i in range(7):
    s.sendto(b"f" * 333, ("{WAN4}", {PORT}))
print("cgroup", open("/proc/self/cgroup").read().split("0::")[1].strip(), flush=True)
def run(*argv):
    sys.stdout.flush()
    subprocess.run(argv, check=True)
run("python3", "{cluster.work}/traffic.py", "tcp-up", "{LAN4}", "{PORT}", "3000000")
run("srun", "-n1", "python3", "{cluster.work}/traffic.py", "tcp-down", "{WAN4}", "{PORT}", "2000000")
run("srun", "-n1", "python3", "{cluster.work}/traffic.py", "udp-down", "{WAN6}", "{PORT}", "50", "1200")
run("srun", "-n1", "sh", "-c", "echo step $(grep '^0::' /proc/self/cgroup | cut -c4-)")
"""
    job, out = cluster.submit(script)
    assert out.startswith("COMPLETED"), out + cluster.slurm.dump_logs(40)
    mine = f"/{CG_ROOT.name}/{BASE}n1-{job}"
    assert f"cgroup {mine}\n" in out and f"step {mine}\n" in out, out  # the script and its steps
    cluster.topo.wait_quiet()
    lan, wan = cluster.topo.server_counts("lan"), cluster.topo.server_counts("wan")
    [rec] = cluster.report("-j", str(job))
    assert rec["user"] == USER and rec["nodes"] == ["n1"] and rec["state"] == "completed"
    t = rec["traffic"]
    # WAN: the script's first 7 datagrams, the download, the IPv6 datagrams: all of it, exactly.
    assert (_pair(t["wan"], "out"), _pair(t["wan"], "in")) == (wan["rx"], wan["tx"])
    assert wan["rx"][0] >= 7 + 1 and t["wan"]["in_bytes"] > 2_000_000 + 50 * 1200
    # LAN: the upload, plus srun's own traffic with slurmctld (the node's address), as LAN.
    assert t["lan"]["out_bytes"] > lan["rx"][1] > 3_000_000
    assert t["lan"]["in_bytes"] > lan["tx"][1]


def test_two_node_job_exchanges_an_exact_payload_as_lan(cluster: Cluster) -> None:
    cluster.topo.reset_servers()
    script = f"""#!/bin/bash
#SBATCH -N2 -n2 --ntasks-per-node=1 -w n1,n2
set -e
srun -N2 -n2 python3 {cluster.work}/pairs.py rendezvous-$SLURM_JOB_ID 4000000 up0
"""
    job, out = cluster.submit(script)
    assert out.startswith("COMPLETED"), out + cluster.slurm.dump_logs(40)
    assert re.search(r"received 4000000 from 10\.77\.1\.[23]\b", out), out  # node to node: no route added
    [rec] = cluster.report("-j", str(job))
    per = rec["per_node"]
    sent = max(per["n1"]["lan"]["out_bytes"], per["n2"]["lan"]["out_bytes"])
    got = max(per["n1"]["lan"]["in_bytes"], per["n2"]["lan"]["in_bytes"])
    assert sent > 4_000_000 and got > 4_000_000, json.dumps([out, rec])
    for n in ("n1", "n2"):
        assert per[n]["wan"] == {"in_bytes": 0, "out_bytes": 0, "in_packets": 0, "out_packets": 0}


def test_job_array_of_20_every_task_counted(cluster: Cluster) -> None:
    cluster.topo.reset_servers()
    script = f"""#!/bin/bash
#SBATCH --array=0-19 -n1
set -e
python3 {cluster.work}/traffic.py tcp-up {WAN4} {PORT} 100000 > /dev/null
"""
    array = cluster.slurm.sbatch(script, "-o", "arr-%A_%a.txt", user=USER)
    states = cluster.slurm.wait_array(array, timeout=180)
    assert len(states) == 20 and set(states.values()) == {"COMPLETED"}, states
    cluster.topo.wait_quiet()
    wan = cluster.topo.server_counts("wan")
    ids = {rec["JobId"] for rec in cluster.slurm.jobcomp_records() if rec.get("ArrayJobId") == str(array)}
    recs = [r for r in cluster.report() if r["job_id"] in ids]
    assert len(recs) == 20 and all(r["state"] == "completed" for r in recs)
    assert sum(r["traffic"]["wan"]["out_packets"] for r in recs) == wan["rx"][0]
    assert sum(r["traffic"]["wan"]["out_bytes"] for r in recs) == wan["rx"][1]
    assert sum(r["traffic"]["wan"]["in_bytes"] for r in recs) == wan["tx"][1]
    assert all(r["traffic"]["wan"]["out_bytes"] > 100_000 for r in recs)


def test_dns_through_the_nodes_loopback_stub(cluster: Cluster) -> None:
    """No redirect needed: the job is in the node's namespace. Its queries to the stub go over
    the node's loopback interface, which the cgroup engine does not count (README)."""
    script = f"""#!/bin/bash
#SBATCH -N1 -w n3
set -e
getent ahostsv4 lanserver.netacct.test | head -n1
python3 {cluster.work}/traffic.py tcp-up lanserver.netacct.test {PORT} 100000
"""
    job, out = cluster.submit(script)
    assert out.startswith("COMPLETED"), out + cluster.slurm.dump_logs(40)
    assert re.search(rf"^{re.escape(LAN4)}\s+STREAM\s+lanserver.netacct.test", out, re.M), out
    [rec] = cluster.report("-j", str(job))
    assert rec["nodes"] == ["n3"] and rec["traffic"]["lan"]["out_bytes"] > 100_000
    assert rec["traffic"]["wan"]["out_packets"] == 0


def test_a_job_cannot_escape_or_tamper_with_its_cgroup(cluster: Cluster) -> None:
    cluster.topo.reset_servers()
    script = f"""#!/bin/bash
#SBATCH -N1 -w n1
python3 {cluster.work}/cgtamper.py {CG_ROOT}/{BASE}n1-$SLURM_JOB_ID {cluster.topo.bpffs}/slurm-netacct {BASE}n1-$SLURM_JOB_ID
python3 {cluster.work}/traffic.py tcp-up {WAN4} {PORT} 250000 > /dev/null && echo "upload: done"
"""
    job, out = cluster.submit(script)
    assert out.startswith("COMPLETED"), out
    unpriv = Path("/proc/sys/kernel/unprivileged_bpf_disabled").read_text().strip() == "0"
    lines = [line for line in out.splitlines() if line.endswith((": refused", ": ALLOWED"))
             and not (unpriv and line.startswith("bpf PROG_LOAD"))]
    assert len(lines) == 21 - unpriv and all(line.endswith(": refused") for line in lines), out
    assert "upload: done" in out
    cluster.topo.wait_quiet()
    wan = cluster.topo.server_counts("wan")
    [rec] = cluster.report("-j", str(job))
    assert _pair(rec["traffic"]["wan"], "out") == wan["rx"] and wan["rx"][1] > 250_000


def test_the_daemon_did_the_work_and_nothing_of_the_network_changed(cluster: Cluster) -> None:
    job, out = cluster.submit("#!/bin/bash\n#SBATCH -N1 -w n2\ntrue\n")
    assert out.startswith("COMPLETED"), out
    lines = [line for p in cluster.work.glob("netacct-*.log") for line in p.read_text().splitlines()
             if f"job {job}:" in line]
    assert any(" netacct-daemon[" in line and "cgroup engine, mode own" in line for line in lines), lines
    assert any(" netacct-daemon[" in line and "counters stored" in line for line in lines), lines
    for i in range(3):  # no NAT table, no job link, no forwarding turned on
        ns = cluster.topo.node_ns(i)
        assert "netacct" not in in_ns(ns, "nft", "list", "tables").stdout
        assert in_ns(ns, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "0"

"""What the end-to-end tests with real SLURM share (test_slurm.py, test_slurm_cgroup.py): the
cluster they run, reports of its node databases, jobs submitted as the test user, and the
service and the loopback DNS stub they start beside it."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from conftest import ROOT, VENV_BIN
from slurmharness import NodeSpec, SlurmCluster
from topology import CTL4, LAN4, Topology

USER = "netacct-test"
STUB_NAME = "lanserver.netacct.test"  # what the DNS stub answers (with the LAN server's address)


@dataclass
class Cluster:
    topo: Topology
    slurm: SlurmCluster
    work: Path
    config: Path

    def report(self, *args: str) -> list[dict]:
        dbs = [a for p in sorted(self.work.glob("n*.db")) for a in ("--db", str(p))]
        r = subprocess.run([str(VENV_BIN / "netacct-report"), "--json", "--per-node", *dbs, *args],
                           capture_output=True, text=True, env=dict(os.environ, NETACCT_CONFIG=str(self.config)))
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def submit(self, script: str, *args: str) -> tuple[int, str]:
        """Submit as the unprivileged user, wait for the end; (job id, its output)."""
        job = self.slurm.sbatch(script, "-o", "out-%j.txt", *args, user=USER)
        state = self.slurm.wait_job(job, timeout=120)
        out = self.slurm.job_dir(USER) / f"out-{job}.txt"
        text = out.read_text() if out.exists() else ""
        return job, f"{state}\n{text}"


def start_daemon(config: Path, work: Path) -> subprocess.Popen[str]:
    """One netacct-daemon for the prologs and epilogs of all nodes (each request carries its
    node's network namespace)."""
    daemon = subprocess.Popen([str(VENV_BIN / "netacct-daemon"), "--config", str(config),
                               "--socket", str(work / "daemon.sock")], stdout=subprocess.PIPE, text=True)
    assert daemon.stdout is not None and daemon.stdout.readline().startswith("netacct-daemon: listening")
    return daemon


def start_dns_stub(topo: Topology, node: int) -> subprocess.Popen[bytes]:
    """A loopback stub resolver at 127.0.0.53 in a node's namespace, answering STUB_NAME."""
    stub = subprocess.Popen(["nsenter", f"--net=/run/netns/{topo.node_ns(node)}", "python3",
                             str(ROOT / "tests" / "dnsstub.py"), "127.0.0.53", f"{STUB_NAME}={LAN4}"],
                            stdout=subprocess.PIPE)
    assert stub.stdout is not None and stub.stdout.readline().strip() == b"ready"
    return stub


@contextmanager
def running_cluster(topo: Topology, work: Path, config: Path, plugstack_line: str) -> Iterator[Cluster]:
    """slurmctld and one slurmd per node of topo (n1, n2, n3; n3 resolving names through a
    loopback stub in a mount namespace of its own), the prolog and epilog through one
    netacct-daemon; all stopped again, in reverse order."""
    (work / "resolv.conf").write_text("nameserver 127.0.0.53\noptions timeout:2 attempts:2\n")
    slurm = stub = daemon = None
    try:
        daemon = start_daemon(config, work)
        stub = start_dns_stub(topo, 2)
        nodes = [NodeSpec(f"n{i + 1}", topo.node_ns(i), topo.node_addr(i), cpus=16) for i in range(len(topo.nodes))]
        nodes[2].mount_setup = f"mount --bind {work}/resolv.conf /etc/resolv.conf"
        slurm = SlurmCluster(work, topo.ctl, CTL4, nodes, prolog=str(ROOT / "prolog"), epilog=str(ROOT / "epilog"),
                             plugstack_lines=[plugstack_line],
                             extra_env={"NETACCT_CONFIG": str(config), "NETACCT_SOCKET": str(work / "daemon.sock")})
        slurm.start()
        yield Cluster(topo, slurm, work, config)
    finally:
        if slurm is not None:
            slurm.stop()
        if stub is not None:
            stub.terminate()
            stub.wait(timeout=10)
        if daemon is not None:
            daemon.terminate()  # it finishes its deferred work (link deletions) first
            assert daemon.wait(timeout=30) == 0

"""netacct-doctor on the sandbox node: each check passes on a good setup and fails, with its
own line and exit code 20, on a broken one; --self-test is exact on a good node and fails on
one whose accounting is broken (another tool's tc filter in front of the counting programs)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import JOB_PREFIX, ROOT, VENV_BIN, Node
from slurm_netacct import naming
from slurmharness import NodeSpec, SlurmCluster
from topology import CTL4, Topology, in_ns

FAILED = 20
# A classic BPF filter that matches every packet (return -1) and has no action: the packet
# passes (TC_ACT_OK) and no filter after it runs, slurm-netacct's counting programs neither.
PASS_ALL = "bpf bytecode '1,6 0 0 4294967295,'"
NODES = {"n1": "10.77.1.2", "n2": "10.77.1.3", "n3": "10.77.1.4"}  # n1: the sandbox node


@dataclass
class Site:
    """A routed sandbox node n1 with the service, its slurm.conf (as the tests' SLURM clusters
    write it: Prolog and Epilog through wrappers that export NETACCT_CONFIG), plugstack.conf
    and an sshd PAM stack with pam_slurm_adopt and pam_netacct."""

    node: Node
    topo: Topology
    slurm_conf: Path
    plugstack: Path
    pam: Path

    def doctor(self, *args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
        argv = ["nsenter", f"--net=/run/netns/{self.topo.node}", str(VENV_BIN / "netacct-doctor"),
                "--config", str(config or self.node.config_path), "--slurm-conf", str(self.slurm_conf),
                "--pam", str(self.pam), "--socket", str(self.node.socket), "--node", "n1", "--role", "compute",
                *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "NETACCT_"))}
        return subprocess.run(argv, capture_output=True, text=True, timeout=180, env=env)

    def write_conf(self, **settings: str) -> None:
        """slurm.conf as the harness writes it, with `settings` replacing its lines."""
        extra = "\n".join(f"{k}={v}" for k, v in settings.items())
        cluster = SlurmCluster(self.slurm_conf.parent, self.topo.ctl, CTL4,
                               [NodeSpec(n, self.topo.node, a) for n, a in NODES.items()],
                               prolog=str(ROOT / "prolog"), epilog=str(ROOT / "epilog"),
                               extra_env={"NETACCT_CONFIG": str(self.node.config_path),
                                          "NETACCT_SOCKET": str(self.node.socket)},
                               slurm_conf_extra=extra)
        text = cluster.slurm_conf_text().replace(f"PlugStackConfig={cluster.plugstack_path}",
                                                 f"PlugStackConfig={self.plugstack}")
        if "Prolog=" in settings and not settings["Prolog"]:
            text = "\n".join(line for line in text.splitlines() if not line.startswith("Prolog=")) + "\n"
        self.slurm_conf.write_text(text)


def _line(r: subprocess.CompletedProcess[str], name: str) -> str:
    found = [line for line in r.stdout.splitlines() if line[6:].startswith(f"{name}: ")]
    assert len(found) == 1, r.stdout + r.stderr
    return found[0]


@pytest.fixture
def site(topo: Topology, tmp_path: Path) -> Iterator[Site]:
    node = Node(topo, tmp_path, "bpf", daemon=True, mode="routed", pool={"ipv4": "100.64.0.0/16"})
    conf_dir = tmp_path / "slurm"
    conf_dir.mkdir()
    plugstack = conf_dir / "plugstack.conf"
    plugstack.write_text(f"required {ROOT}/spank/netacct.so netns_dir=/run/netns prefix={JOB_PREFIX}\n")
    pam = conf_dir / "sshd"
    pam.write_text("account required pam_slurm_adopt.so\n"
                   f"session required pam_netacct.so netns_dir=/run/netns prefix={JOB_PREFIX}\n")
    s = Site(node, topo, conf_dir / "slurm.conf", plugstack, pam)
    s.write_conf(PrologFlags="Alloc,Contain")
    argv = ["nsenter", f"--net=/run/netns/{topo.node}", str(VENV_BIN / "netacct-routes")]
    env = dict(os.environ, NETACCT_CONFIG=str(node.config_path))
    subprocess.run([*argv, "install", "--self", "n1", *(f"--node={n}={a}" for n, a in NODES.items())],
                   check=True, capture_output=True, env=env)
    in_ns(topo.node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    try:
        yield s
    finally:
        subprocess.run([*argv, "remove"], check=True, capture_output=True, env=env)
        node.cleanup()


def test_a_good_node_passes_every_check_and_exits_0(site: Site) -> None:
    r = site.doctor()
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr == ""
    for name in ("config", "plugstack", "pam", "prolog", "epilog", "prologflags", "service", "routes",
                 "forwarding", "uplink", "store"):
        assert _line(site_r := r, name).startswith("OK  "), site_r.stdout
    assert _line(r, "self-test") == "SKIP  self-test: not asked for (--self-test)"
    assert "prolog-wrapper runs slurm-netacct's prolog" in _line(r, "prolog")  # through the wrapper's exec
    assert r.stdout.splitlines()[-1] == "netacct-doctor: 11 OK, 0 FAIL, 0 WARN, 1 SKIP"


def test_self_test_counts_a_throwaway_job_exactly_and_leaves_nothing(site: Site) -> None:
    before = in_ns(site.topo.node, "ip", "-o", "link").stdout.count("\n")
    r = site.doctor("--self-test", "--check", "service")
    assert r.returncode == 0, r.stdout + r.stderr
    line = _line(r, "self-test")
    # 20 datagrams of 64, 200, 512, 1000 and 1400 bytes each way: 3176 * 4 + 28 * 20 IP bytes.
    assert line == (f"OK    self-test: job {naming.SELFTEST_JOB_ID} (prolog, 20 datagrams to and 20 from 192.0.2.2, "
                    "epilog): wan in 20 pkts/13264 B, out 20 pkts/13264 B, exact; its record deleted"), r.stdout
    site.node.settle()
    assert in_ns(site.topo.node, "ip", "-o", "link").stdout.count("\n") == before
    assert not [n for n in os.listdir("/run/netns") if n.startswith("netacct-doctor-")]
    assert site.node.report("-j", str(naming.SELFTEST_JOB_ID)) == []  # its record is gone
    assert "192.0.2." not in in_ns(site.topo.node, "ip", "-4", "addr").stdout


def test_self_test_fails_where_something_bypasses_the_counting(site: Site, tmp_path: Path) -> None:
    """Another tool's prolog (a wrapper around slurm-netacct's) puts a tc filter in front of
    slurm-netacct's programs on the job's link: the job's traffic flows, uncounted. The
    self-test's counters say so."""
    wrapper = tmp_path / "prolog-with-shaper"
    dev = naming.host_ifname(site.node.cfg.ifname_prefix, naming.SELFTEST_JOB_ID)
    wrapper.write_text(f"#!/bin/sh\nexport NETACCT_CONFIG={site.node.config_path}\n"
                       f"{site.slurm_conf.parent}/prolog-wrapper || exit $?\n"
                       f"/usr/sbin/tc filter add dev {dev} ingress prio 1 protocol all {PASS_ALL}\n"
                       f"exec /usr/sbin/tc filter add dev {dev} egress prio 1 protocol all {PASS_ALL}\n")
    wrapper.chmod(0o755)
    site.write_conf(PrologFlags="Alloc,Contain", Prolog=str(wrapper))
    r = site.doctor("--self-test", "--check", "prolog")
    assert r.returncode == FAILED, r.stdout + r.stderr
    assert _line(r, "self-test").startswith(
        f"FAIL  self-test: job {naming.SELFTEST_JOB_ID} counted nothing; it exchanged wan in 20 pkts/13264 B "
        "out 20 pkts/13264 B with 192.0.2.2; fix: accounting is wrong on this node"), r.stdout
    site.node.settle()
    assert not [n for n in os.listdir("/run/netns") if n.startswith("netacct-doctor-")]


@pytest.mark.parametrize("breakage,check,says", [
    ("plugstack-prefix", "plugstack", "the SPANK plugin's prefix=other- differs from the config's"),
    ("plugstack-none", "plugstack", "does not load netacct.so: jobs' tasks run outside their namespace"),
    ("pam-prefix", "pam", "the PAM module's prefix=other- differs from the config's"),
    ("no-prolog", "prolog", "has no Prolog=: no job is accounted"),
    ("swapped", "epilog", "is slurm-netacct's prolog"),
    ("no-contain", "prologflags", "PrologFlags=Alloc lacks Contain, which pam_slurm_adopt"),
    ("no-alloc", "prologflags", "PrologFlags=(none) lacks Alloc"),
    ("service-down", "service", "netacct-daemon is not running"),
    ("config-changed", "service", "netacct-daemon read"),
    ("route-missing", "routes", "no route to n3's job prefix 100.64.3.0/24 via 10.77.1.4"),
    ("route-to-self", "routes", "a route to this host's own job prefix 100.64.1.0/24 via 10.77.1.2 (it loops)"),
    ("forwarding-off", "forwarding", "net.ipv4.ip_forward = 0: jobs' packets are not forwarded"),
    ("no-uplink", "uplink", "uplink interface 'nosuch0' does not exist"),
    ("db-dir-world-writable", "store", "has mode 0777: others may replace what is in it"),
    ("bad-config", "config", "config key 'mode'"),
])
def test_a_broken_setup_fails_its_check_with_exit_20(site: Site, breakage: str, check: str, says: str) -> None:
    node, topo = site.node, site.topo
    config = None
    ns = ["nsenter", f"--net=/run/netns/{topo.node}"]
    routes_env = dict(os.environ, NETACCT_CONFIG=str(node.config_path))
    if breakage == "plugstack-prefix":
        site.plugstack.write_text(f"required {ROOT}/spank/netacct.so netns_dir=/run/netns prefix=other-\n")
    elif breakage == "plugstack-none":
        site.plugstack.write_text("")
    elif breakage == "pam-prefix":
        site.pam.write_text("account required pam_slurm_adopt.so\nsession required pam_netacct.so prefix=other-\n")
    elif breakage == "no-prolog":
        site.write_conf(PrologFlags="Alloc,Contain", Prolog="")
    elif breakage == "swapped":
        site.write_conf(PrologFlags="Alloc,Contain", Epilog=str(ROOT / "prolog"))
    elif breakage == "no-contain":
        site.write_conf(PrologFlags="Alloc")
    elif breakage == "no-alloc":
        site.write_conf(PrologFlags="")
    elif breakage == "service-down":
        node.stop_daemon()
    elif breakage == "config-changed":
        node.config_path.write_text("# edited after the service started\n" + node.config_path.read_text())
    elif breakage == "route-missing":
        subprocess.run([*ns, str(VENV_BIN / "netacct-routes"), "install", "--self", "n1", "--node=n2=10.77.1.3"],
                       check=True, capture_output=True, env=routes_env)
    elif breakage == "route-to-self":
        in_ns(topo.node, "ip", "route", "add", "100.64.1.0/24", "via", "10.77.1.2", "proto", "222")
    elif breakage == "forwarding-off":
        in_ns(topo.node, "sysctl", "-qw", "net.ipv4.ip_forward=0")
    elif breakage == "no-uplink":
        config = node.tmp / "other.toml"
        config.write_text(node.config_path.read_text().replace('uplink = "up0"', 'uplink = "nosuch0"'))
    elif breakage == "db-dir-world-writable":
        node.db.parent.chmod(0o777)
    elif breakage == "bad-config":
        config = node.tmp / "other.toml"
        config.write_text(node.config_path.read_text().replace('mode = "routed"', 'mode = "bridged"'))
    try:
        r = site.doctor(config=config)
    finally:
        node.db.parent.chmod(0o700)
        in_ns(topo.node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    assert r.returncode == FAILED, r.stdout + r.stderr
    failed = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    line = _line(r, check)
    assert line.startswith(f"FAIL  {check}: ") and says in line and "; fix: " in line, r.stdout
    # Only the broken thing fails (a config that does not parse fails the uplink and the
    # service's comparison too, which is fair; the others fail one check alone).
    assert failed == [line] or breakage in ("bad-config", "no-uplink"), r.stdout
    assert r.stdout.splitlines()[-1].startswith("netacct-doctor: ")


def test_a_login_node_skips_what_only_compute_nodes_need(site: Site) -> None:
    nodes = [f"--cluster-node={n}={a}" for n, a in {**NODES, "n4": "10.77.1.5"}.items()]
    r = site.doctor("--role", "login", "--node", "login1", *nodes)
    # This host has n1's address: it is n1 and needs no route to it; n4 came after the routes.
    assert r.returncode == FAILED, r.stdout
    assert _line(r, "routes") == ("FAIL  routes: no route to n4's job prefix 100.64.4.0/24 via 10.77.1.5; "
                                  "fix: netacct-routes install (README, step 3)"), r.stdout
    for name in ("plugstack", "pam", "service", "forwarding", "uplink", "store"):
        assert _line(r, name).startswith("SKIP  "), r.stdout
    assert [line[:4] for line in r.stdout.splitlines() if line.startswith("FAIL")] == ["FAIL"]


def test_an_unknown_check_is_a_usage_error() -> None:
    r = subprocess.run([str(VENV_BIN / "netacct-doctor"), "--check", "nosuch"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("netacct-doctor: argument --check: invalid choice: 'nosuch'")



def test_self_test_with_the_cgroup_engine_is_exact_too(topo: Topology, tmp_path: Path) -> None:
    """Mode "own": the throwaway job's process is moved into the job's cgroup (netacct-exec), and
    its datagrams leave the node's namespace through the self-test's pair, not loopback."""
    from slurm_netacct.node import agreement

    node = Node(topo, tmp_path, "cgroup", daemon=True)
    try:
        conf_dir = tmp_path / "slurm"
        conf_dir.mkdir()
        plugstack = conf_dir / "plugstack.conf"
        plugstack.write_text(f"required {ROOT}/spank/netacct.so {agreement.wanted_arguments(node.cfg)}\n")
        site = Site(node, topo, conf_dir / "slurm.conf", plugstack, conf_dir / "no-pam")
        site.write_conf(PrologFlags="Alloc")
        r = site.doctor("--self-test")
        assert r.returncode == 0, r.stdout + r.stderr
        assert _line(r, "routes") == "SKIP  routes: the cgroup engine needs no routes"
        assert _line(r, "self-test").startswith(f"OK    self-test: job {naming.SELFTEST_JOB_ID} (prolog, 20 datagrams"), r.stdout
        assert "wan in 20 pkts/13264 B, out 20 pkts/13264 B, exact" in _line(r, "self-test")
    finally:
        node.cleanup()


def test_self_test_reports_a_failing_prolog_and_leaves_nothing(site: Site) -> None:
    """Without the service, with an uplink that does not exist: the prolog fails as it would for
    every real job (exit 7); the self-test says so, runs the epilog and removes all it made."""
    node = site.node
    node.stop_daemon()
    node.config_path.write_text(node.config_path.read_text().replace('uplink = "up0"', 'uplink = "nosuch0"'))
    r = site.doctor("--self-test", "--check", "uplink")
    assert r.returncode == FAILED, r.stdout + r.stderr
    assert _line(r, "uplink").startswith("FAIL  uplink: uplink interface 'nosuch0' does not exist")
    assert _line(r, "self-test") == (
        f"FAIL  self-test: the prolog failed (exit 7): netacct-prolog: job {naming.SELFTEST_JOB_ID}: uplink "
        "interface 'nosuch0' does not exist; fix: the same failure drains the node for real jobs: fix what it says")
    assert not [n for n in os.listdir("/run/netns") if n.startswith("netacct-doctor-")]
    assert not (node.cfg.netns_dir / naming.netns_name(JOB_PREFIX, naming.SELFTEST_JOB_ID)).exists()
    assert node.report("-j", str(naming.SELFTEST_JOB_ID)) == []

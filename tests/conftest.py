"""Shared fixtures: the sandbox topology and a configured 'node' inside it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from slurm_netacct import config, counting, naming
from slurm_netacct.kernel import cgroup
from slurm_netacct.traffic import Counters
from topology import UPLINK, Topology, in_ns

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TAG = f"nt{os.getpid() % 100000}-"
JOB_PREFIX = f"{TAG}j-"
POOL6 = "fd00:6e61:6363::/64"
# The cgroup engine's own subtree for the tests' jobs (mode "own"), in the unified hierarchy;
# made by the first prolog, removed at the end of the session.
CG_ROOT = Path("/sys/fs/cgroup/unified") / f"{TAG}cg"
EXACT = ("bpf", "cgroup")  # the ways of counting that count what the wire carries


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that builds on the sandbox network is marked `sandbox` (a tier of its own)."""
    for item in items:
        if "topo" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.sandbox)


def fast_few(values: list[Any], keep: list[Any]) -> list[Any]:
    """Parameters for a test whose every case runs in CI, but only `keep` in the fast tier
    (`-m "not slow and not e2e"`): the others are marked slow."""
    return [v if v in keep else pytest.param(v, marks=pytest.mark.slow) for v in values]


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces); run the suite as root", pytrace=False)


@pytest.fixture(scope="session")
def topo() -> Iterator[Topology]:
    need_root()
    t = Topology(TAG).up()
    try:
        yield t
        leftovers = project_leftovers(t)
        assert leftovers == [], f"the suite left objects behind: {leftovers}"
    finally:
        t.down()
        cgroup.remove_tree(CG_ROOT)  # (a job's cgroup left here was reported above) removed all the same
    assert not [n for n in os.listdir("/run/netns") if n.startswith(TAG)]


def project_leftovers(t: Topology) -> list[str]:
    """Every namespace, link, route or nft table of the project still present."""
    found = [f"netns {n}" for n in os.listdir("/run/netns") if n.startswith(JOB_PREFIX)]
    links = in_ns(t.node, "ip", "-o", "link").stdout
    found += [f"link {m}" for m in re.findall(r"^\d+: (na\d+)[@:]", links, re.M)]
    for fam in ("-4", "-6"):
        routes = in_ns(t.node, "ip", fam, "route").stdout
        found += [f"route {r}" for r in routes.splitlines() if "100.64." in r or "fd00:6e61" in r]
    tables = in_ns(t.node, "nft", "list", "tables").stdout
    found += [f"nft {line}" for line in tables.splitlines() if "netacct" in line and "netacct_node" not in line]
    pins = t.bpffs / "slurm-netacct"
    found += [f"pin {p.name}" for p in (pins.iterdir() if pins.is_dir() else ()) if p.name.startswith(JOB_PREFIX)]
    found += [f"cgroup {p}" for p in (CG_ROOT.iterdir() if CG_ROOT.is_dir() else ())
              if p.is_dir() and p.name.startswith(JOB_PREFIX)]
    return found


class Node:
    """The sandbox node with a config of its own; runs the real prolog/epilog executables."""

    def __init__(self, topo: Topology, tmp: Path, backend: str, daemon: bool = False, **overrides: Any) -> None:
        self.topo = topo
        self.socket = tmp / "daemon.sock"  # without a daemon: nobody listens, the hooks do the work
        self.daemon: subprocess.Popen[str] | None = None
        self.tmp = tmp
        self.backend = backend
        self.db = tmp / "netacct.db"
        self.log = tmp / "netacct.log"
        self.config_path = tmp / "netacct.toml"
        self.started: set[int] = set()
        body = {
            "uplink": UPLINK, "netns_prefix": JOB_PREFIX, "db": str(self.db),
            "log_file": str(self.log), "spool_dir": str(tmp / "spool"), **backend_settings(backend),
            "bpffs": str(topo.bpffs),
        }
        cgroup_table = overrides.get("cgroup", {"mode": "own", "root": str(CG_ROOT)} if backend == "cgroup" else None)
        tables = ("pool", "classes", "cgroup")  # written as [tables], in the order given
        body.update({k: v for k, v in overrides.items() if k not in tables})
        lines = [f"{k} = {json.dumps(v)}" for k, v in body.items()]
        pool = overrides.get("pool", {"ipv6": POOL6})
        lines.append("[pool]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in pool.items()]
        if "classes" in overrides:
            lines.append("[classes]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in overrides["classes"].items()]
        if cgroup_table:
            lines.append("[cgroup]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in cgroup_table.items()]
        self.config_path.write_text("\n".join(lines) + "\n")
        self.cfg = config.load(self.config_path)
        if daemon:
            self.start_daemon()

    def start_daemon(self) -> None:
        self.daemon = subprocess.Popen([str(VENV_BIN / "netacct-daemon"), "--config", str(self.config_path),
                                        "--socket", str(self.socket)], stdout=subprocess.PIPE, text=True)
        assert self.daemon.stdout is not None
        assert self.daemon.stdout.readline().startswith("netacct-daemon: listening")

    def stop_daemon(self) -> None:
        if self.daemon is not None:
            self.daemon.terminate()
            assert self.daemon.wait(timeout=30) == 0
            self.daemon = None

    def settle(self) -> None:
        """Wait until the daemon has done its deferred work (deleting links, freeing leases)."""
        if self.daemon is None:
            return
        import socket as _socket
        with _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM) as c:
            c.settimeout(60)
            try:
                c.connect(str(self.socket))
            except (FileNotFoundError, ConnectionRefusedError):  # it has stopped: it drains before exiting
                self.daemon.wait(timeout=60)
                return
            c.sendall(b"netacct/1\0flush\0\0")
            assert c.recv(64).startswith(b"0")

    def env(self, job_id: int | str, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
        env.pop("PATH", None)  # as SLURM runs prologs: no PATH at all
        env.update(NETACCT_CONFIG=str(self.config_path), NETACCT_SOCKET=str(self.socket), SLURM_JOB_ID=str(job_id),
                   SLURM_JOB_USER="alice", SLURM_JOB_UID="1234", SLURMD_NODENAME="n1",
                   SLURM_JOB_ACCOUNT="physics", SLURM_JOB_PARTITION="batch")
        env.update(extra)
        return env

    def hook(self, which: str, job_id: int | str, direct: bool = False,
             **extra: str) -> subprocess.CompletedProcess[str]:
        """Run the real prolog/epilog executable (direct: the Python module, keeping PATH)."""
        argv = [sys.executable, "-m", "slurm_netacct.cli.hooks", which] if direct else [str(ROOT / which)]
        if which == "prolog":
            try:
                self.started.add(int(job_id))
            except ValueError:
                pass
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.topo.node}", *argv],
                              env=self.env(job_id, **extra), capture_output=True, text=True,
                              timeout=60, cwd="/")

    def prolog(self, job_id: int, **extra: str) -> None:
        r = self.hook("prolog", job_id, **extra)
        assert r.returncode == 0, f"prolog failed ({r.returncode}): {r.stderr}"

    def epilog(self, job_id: int, **extra: str) -> None:
        r = self.hook("epilog", job_id, **extra)
        assert r.returncode == 0, f"epilog failed ({r.returncode}): {r.stderr}"
        self.settle()

    def netns_path(self, job_id: int) -> Path:
        return self.cfg.netns_dir / naming.netns_name(self.cfg.netns_prefix, job_id)

    def run_in_job(self, job_id: int, *argv: str, user: str | None = None,
                   check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [str(VENV_BIN / "netacct-exec"), "--job", str(job_id)]
        if self.backend == "cgroup":  # the job's cgroup, in the node's network namespace
            cmd = ["nsenter", f"--net=/run/netns/{self.topo.node}", *cmd]
        if user:
            cmd += ["--user", user]
        r = subprocess.run(cmd + ["--", *argv], capture_output=True, text=True, timeout=timeout,
                           env=dict(os.environ, NETACCT_CONFIG=str(self.config_path)))
        if check:
            assert r.returncode == 0, f"{argv} in job {job_id} failed: {r.stderr}"
        return r

    def traffic(self, job_id: int, *args: str) -> str:
        return self.run_in_job(job_id, sys.executable, str(ROOT / "tests" / "traffic.py"), *args).stdout

    def live(self, job_id: int) -> Counters:
        job = counting.Counted(naming.JobNames.of(self.cfg, job_id), tuple(self.cfg.class_names))
        return counting.named(self.backend).read(self.cfg, job)

    def seen(self, which: str, reset: bool = False) -> dict[str, tuple[int, int]]:
        """What the lan or wan server exchanged with jobs, as this node's way of counting
        counts it: {'rx': (packets, bytes) the server received, 'tx': ... it sent}. BPF counts
        what came off the wires. The netfilter ways count a job's TCP super-packets as the job's
        stack made them: what the router forwarded towards the server before its end of the
        wire cut them (exact for what jobs send); what a server sends reaches a job merged by
        the node's uplink (GRO) in no fixed way, so tests that use this oracle send plain
        datagrams or acknowledgements towards jobs, never bulk TCP."""
        wire = self.topo.server_counts(which, reset=False)
        if self.backend not in EXACT:
            wire["rx"] = self.topo.unsegmented(which)["rx"]
        if reset:
            self.topo.server_counts(which, reset=True)
            self.topo.unsegmented(which, reset=True)
        return wire

    def pin(self, job_id: int) -> Path:
        """Where the job's BPF counters are pinned (the bpf backend)."""
        return naming.bpf_pin(self.cfg.bpffs, naming.netns_name(self.cfg.netns_prefix, job_id))

    def lose_counters(self, job_id: int) -> str:
        """Take a running job's counters away, as an administrator's mistake would (its nft
        table deleted, its pin removed); what reading them then says."""
        if self.backend in EXACT:
            self.pin(job_id).unlink()
            return f"bpf OBJ_GET (open {self.pin(job_id)}): No such file or directory [ENOENT]"
        assert self.backend == "nftables", "not for iptables"
        subprocess.run(["nsenter", f"--net={self.netns_path(job_id)}", "nft", "delete", "table", "inet",
                        "netacct"], check=True)
        return f"counter lan_out is missing from {self.netns_path(job_id)}"

    def report(self, *args: str) -> Any:
        r = subprocess.run([str(VENV_BIN / "netacct-report"), "--json", "--db", str(self.db), *args],
                           capture_output=True, text=True, env=dict(os.environ, NETACCT_CONFIG=str(self.config_path)))
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def cleanup(self) -> None:
        for job in sorted(self.started):
            self.hook("epilog", job)
        self.settle()
        self.stop_daemon()


BACKENDS = ("bpf", "nftables", "iptables")  # the namespace engine's ways of counting: BPF (the default), the legacy two


def backend_settings(backend: str) -> dict[str, str]:
    """The config that makes the node count with `backend` (BPF with nftables for the node's
    NAT, or one of the two netfilter ways, each with its own firewall)."""
    if backend == "bpf":
        return {"counting": "bpf", "firewall": "nftables"}
    if backend == "cgroup":  # the cgroup engine (its [cgroup] table: Node)
        return {"engine": "cgroup", "counting": "bpf", "firewall": "nftables"}
    return {"counting": "netfilter", "firewall": backend}


@pytest.fixture(params=["bpf", pytest.param("nftables", marks=pytest.mark.slow),
                        pytest.param("iptables", marks=pytest.mark.slow)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def node(topo: Topology, tmp_path: Path, backend: str) -> Iterator[Node]:
    """The BPF and nftables nodes work through netacct-daemon, the iptables one without: both paths."""
    n = Node(topo, tmp_path, backend, daemon=(backend != "iptables"))
    topo.reset_servers()
    yield n
    n.cleanup()
    assert project_leftovers(topo) == []


def _plain_node(topo: Topology, tmp_path: Path, backend: str) -> Iterator[Node]:
    """A node that counts with `backend`, without the service; nothing of it left afterwards."""
    n = Node(topo, tmp_path, backend)
    topo.reset_servers()
    yield n
    n.cleanup()
    assert project_leftovers(topo) == []


@pytest.fixture
def bpf_node(topo: Topology, tmp_path: Path) -> Iterator[Node]:
    """A node that counts the default way (BPF), without the service."""
    yield from _plain_node(topo, tmp_path, "bpf")


@pytest.fixture
def cg_node(topo: Topology, tmp_path: Path) -> Iterator[Node]:
    """A node with the cgroup engine (its own cgroups under CG_ROOT), without the service."""
    yield from _plain_node(topo, tmp_path, "cgroup")


@pytest.fixture
def nft_node(topo: Topology, tmp_path: Path) -> Iterator[Node]:
    """A node that counts with nftables, without the service."""
    yield from _plain_node(topo, tmp_path, "nftables")


def cluster_routes(topo: Topology, config: Path, action: str) -> None:
    """`netacct-routes install|remove` on every host of a routed sandbox cluster, as a site
    runs it: each node with --self, the controller and the router without."""
    nodes = [f"--node=n{i + 1}={topo.node_addr(i)}" for i in range(len(topo.nodes))]
    hosts = [(topo.node_ns(i), f"n{i + 1}") for i in range(len(topo.nodes))] + [(topo.ctl, None), (topo.router, None)]
    for ns, self_name in hosts:
        argv = ["nsenter", f"--net=/run/netns/{ns}", str(VENV_BIN / "netacct-routes"), action]
        if action == "install":
            argv += nodes + ([f"--self={self_name}"] if self_name else [])
        subprocess.run(argv, check=True, capture_output=True, text=True, env=dict(os.environ, NETACCT_CONFIG=str(config)))

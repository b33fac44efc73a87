"""Prolog and epilog behaviour: idempotence, rollback, bad input, privileges, the store."""

from __future__ import annotations

import ipaddress
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import JOB_PREFIX, TAG, Node, fast_few, project_leftovers
from slurm_netacct import naming
from topology import LAN4, PORT, WAN6, in_ns


def _rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def _addr(node: Node, job: int) -> str:
    return node.run_in_job(job, "ip", "-o", "-4", "addr", "show", "dev", "eth0").stdout.split()[3]


def test_prolog_is_idempotent_and_keeps_counters(node: Node) -> None:
    job = 3001
    node.prolog(job)
    first = _addr(node, job)
    node.run_in_job(job, "bash", "-c", "printf '%100s' x > /dev/udp/198.51.100.10/5001")
    before = node.live(job)
    node.prolog(job)  # SLURM may run it again (e.g. a retried launch): nothing changes
    assert _addr(node, job) == first
    assert node.live(job) == before
    assert before[("wan", "out")].packets == 1
    assert "already set up" in node.log.read_text()
    node.epilog(job)
    node.epilog(job)  # and the epilog twice: the second finds nothing and succeeds
    assert _rows(node.db, "SELECT state FROM jobs WHERE job_id=3001") == [("completed",)]
    assert _rows(node.db, "SELECT class, out_packets FROM traffic WHERE job_id=3001 ORDER BY class") == [
        ("lan", 0), ("wan", 1)]
    assert _rows(node.db, "SELECT * FROM leases") == []


def test_epilog_without_prolog_succeeds(node: Node) -> None:
    r = node.hook("epilog", 3002)
    assert r.returncode == 0, r.stderr
    assert "nothing to tear down" in node.log.read_text()


@pytest.mark.slow
def test_concurrent_jobs_get_distinct_addresses(node: Node) -> None:
    jobs = [3010 + i for i in range(6)]
    procs = [subprocess.Popen(["nsenter", f"--net=/run/netns/{node.topo.node}", str(Path(__file__).parents[1] / "prolog")],
                              env=node.env(j), stderr=subprocess.PIPE, text=True) for j in jobs]
    node.started.update(jobs)
    for p in procs:
        assert p.wait(timeout=60) == 0, p.stderr.read() if p.stderr else ""
    addrs = {_addr(node, j) for j in jobs}
    assert len(addrs) == len(jobs)
    procs = [subprocess.Popen(["nsenter", f"--net=/run/netns/{node.topo.node}", str(Path(__file__).parents[1] / "epilog")],
                              env=node.env(j), stderr=subprocess.PIPE, text=True) for j in jobs]
    for p in procs:
        assert p.wait(timeout=60) == 0, p.stderr.read() if p.stderr else ""
    node.settle()
    assert len(_rows(node.db, "SELECT * FROM jobs WHERE state='completed'")) == len(jobs)
    assert len(_rows(node.db, "SELECT DISTINCT job_id FROM traffic")) == len(jobs)
    assert _rows(node.db, "SELECT * FROM leases") == []


@pytest.mark.parametrize("step", fast_few(["lease", "netns", "link", "rules", "node"], ["rules"]))
def test_a_failure_midway_rolls_back_everything(node: Node, step: str) -> None:
    r = node.hook("prolog", 3020, NETACCT_FAILPOINT=step)
    assert r.returncode == 7, r.stderr
    assert r.stderr.strip() == f"netacct-prolog: job 3020: failpoint {step}"
    assert "rolling back" in node.log.read_text()
    assert not os.path.lexists(node.netns_path(3020))
    assert project_leftovers(node.topo) == []
    assert _rows(node.db, "SELECT * FROM leases") == []
    assert _rows(node.db, "SELECT * FROM jobs") == []
    node.prolog(3020)  # and the node is fine for the next attempt
    node.epilog(3020)


def test_a_broken_iptables_rolls_back(topo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A real failure, not a failpoint: python-iptables finds no extensions."""
    node = Node(topo, tmp_path, "iptables")
    empty = tmp_path / "empty"
    empty.mkdir()
    r = node.hook("prolog", 3021, direct=True, XTABLES_LIBDIR=str(empty), PATH="/usr/sbin:/usr/bin:/sbin:/bin")
    assert r.returncode == 7, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not os.path.lexists(node.netns_path(3021))
    assert project_leftovers(topo) == []


@pytest.mark.parametrize("job_id", fast_few(["", "abc", "../x", "12/../../etc", "0", "007", "-1", "4294967296",
                                             "99999999999999999999999", " 42", "42\n"], ["../x", "42\n"]))
def test_bad_job_ids_are_refused_and_nothing_is_made(bpf_node: Node, job_id: str) -> None:
    for which in ("prolog", "epilog"):
        r = bpf_node.hook(which, job_id)
        assert r.returncode == 4, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "SLURM_JOB_ID" in lines[0]
    assert not bpf_node.db.exists()
    assert project_leftovers(bpf_node.topo) == []


def test_missing_job_id_is_refused(bpf_node: Node) -> None:
    env = bpf_node.env(1)
    del env["SLURM_JOB_ID"]
    r = subprocess.run(["nsenter", f"--net=/run/netns/{bpf_node.topo.node}", str(Path(__file__).parents[1] / "prolog")],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 4 and "job id is missing" in r.stderr


def test_missing_uplink_is_a_clear_error(topo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node = Node(topo, tmp_path, "nftables", uplink="nosuch0")
    r = node.hook("prolog", 3030)
    assert r.returncode == 7
    assert r.stderr.strip() == "netacct-prolog: job 3030: uplink interface 'nosuch0' does not exist"
    assert project_leftovers(topo) == []


@pytest.mark.parametrize("body, key", [
    ("bogus = 1\n", "bogus"),
    ("firewall = 'pf'\n", "firewall"),
    ("[pool]\nipv4 = '100.64.0.0/33'\n", "pool.ipv4"),
    ("[pool]\nipv4 = '100.64.0.0/31'\n", "pool.ipv4"),
    ("[classes]\nlan = ['10.0.0.0/8']\n[pool]\nipv4 = '10.1.0.0/16'\nclass = 'wan'\n", "pool.ipv4"),
    ("netns_prefix = '../x'\n", "netns_prefix"),
    ("this is not toml", None),
])
def test_config_errors_exit_3_and_create_nothing(topo, tmp_path: Path, body: str, key: str | None) -> None:  # type: ignore[no-untyped-def]
    node = Node(topo, tmp_path, "nftables")
    node.config_path.write_text(body)
    for which in ("prolog", "epilog"):
        r = node.hook(which, 3040)
        assert r.returncode == 3, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1
        if key:
            assert f"config key '{key}'" in lines[0]
    assert not os.path.lexists(node.netns_path(3040))
    assert project_leftovers(topo) == []


def _rps(ns: str, dev: str) -> int:
    """The RPS CPU mask of dev's receive queue in namespace ns (its own sysfs: ip netns exec)."""
    r = subprocess.run(["ip", "netns", "exec", ns, "cat", f"/sys/class/net/{dev}/queues/rx-0/rps_cpus"],
                       capture_output=True, text=True, check=True)
    return int(r.stdout.strip().replace(",", ""), 16)


@pytest.mark.parametrize("setting, daemon", [("1", True), ("3", False), ("", True)])
def test_rps_cpus_steers_both_ends_of_the_job_link(topo, tmp_path: Path, setting: str,  # type: ignore[no-untyped-def]
                                                   daemon: bool) -> None:
    """rps_cpus reaches the receive queues of both ends of a job's veth pair, through the
    service and without it; unset, the node is left as it was."""
    node_mask = Path("/proc/sys/net/core/rps_default_mask")
    before = subprocess.run(["ip", "netns", "exec", topo.node, "cat", str(node_mask)], capture_output=True,
                            text=True, check=True).stdout.strip()
    assert int(before.replace(",", ""), 16) == 0  # the sandbox node starts with the kernel's default
    node = Node(topo, tmp_path, "bpf", daemon=daemon, rps_cpus=setting)
    job = 3045
    want = int(setting or "0", 16)
    try:
        node.prolog(job)
        host_if = naming.host_ifname(node.cfg.ifname_prefix, job)
        assert _rps(topo.node, host_if) == want
        assert _rps(naming.netns_name(node.cfg.netns_prefix, job), naming.JOB_IFNAME) == want
        # Traffic still flows and is counted (the steering changes where, not whether).
        assert node.traffic(job, "tcp-up", LAN4, str(PORT), "300000").strip() == "300000"
        assert node.live(job)[("lan", "out")].bytes > 300_000
        node.epilog(job)
    finally:
        node.cleanup()
        subprocess.run(["ip", "netns", "exec", topo.node, "sh", "-c", f"echo {before} > {node_mask}"], check=True)
    assert project_leftovers(topo) == []


def test_job_links_have_no_automatic_link_local_address_and_ipv6_works(bpf_node: Node) -> None:
    """Neither end of a job's veth makes itself an IPv6 link-local address (no DAD, router
    solicitations or their timers per job): the node's end has only fe80::1, the job's end
    only its own address, and IPv6 to the WAN still works and is counted."""
    job = 3047
    bpf_node.prolog(job)
    host_if = naming.host_ifname(bpf_node.cfg.ifname_prefix, job)
    node_addrs = in_ns(bpf_node.topo.node, "ip", "-6", "-o", "addr", "show", "dev", host_if).stdout
    assert [line.split()[3] for line in node_addrs.splitlines()] == ["fe80::1/64"]
    job_ns = naming.netns_name(bpf_node.cfg.netns_prefix, job)
    job_addrs = in_ns(job_ns, "ip", "-6", "-o", "addr", "show", "dev", naming.JOB_IFNAME).stdout
    [only] = [line.split()[3] for line in job_addrs.splitlines()]
    assert only.endswith("/128") and not only.startswith("fe80")
    assert bpf_node.traffic(job, "tcp-up", WAN6, str(PORT), "200000").strip() == "200000"
    assert bpf_node.live(job)[("wan", "out")].bytes > 200_000
    bpf_node.epilog(job)


def test_rps_cpus_naming_a_cpu_the_node_lacks_fails_the_prolog_cleanly(topo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    absent = f"{1 << (os.cpu_count() or 1):x}"  # the first CPU past the last one
    node = Node(topo, tmp_path, "bpf", rps_cpus=absent)
    r = node.hook("prolog", 3046)
    assert r.returncode == 7, r.stderr
    assert r.stderr.strip() == (f"netacct-prolog: job 3046: rps_cpus '{absent}' names CPUs this node does "
                                f"not have (it has {os.cpu_count()})")
    assert not os.path.lexists(node.netns_path(3046))
    assert project_leftovers(topo) == []


def test_exec_runs_as_the_user_inside_the_namespace(bpf_node: Node) -> None:
    job = 3050
    bpf_node.prolog(job)
    r = bpf_node.run_in_job(job, "sh", "-c", "id -u; id -g; cat /proc/self/status | grep CapEff; ip -o -4 addr show dev eth0",
                            user="nobody")
    uid, gid, caps, addr = r.stdout.strip().splitlines()
    assert (uid, gid) == ("65534", "65534")
    assert caps.split()[1] == "0000000000000000"
    assert "100.64." in addr
    # The job's user cannot touch the counters: no CAP_NET_ADMIN in the job's namespace.
    r = bpf_node.run_in_job(job, "nft", "flush", "ruleset", user="nobody", check=False)
    assert r.returncode != 0 and "Operation not permitted" in r.stderr
    bpf_node.epilog(job)


def test_exec_errors(bpf_node: Node) -> None:
    exe = str(Path(sys.executable).parent / "netacct-exec")
    env = dict(os.environ, NETACCT_CONFIG=str(bpf_node.config_path))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe, *args], capture_output=True, text=True, env=env)

    r = run("--job", "3060", "--", "true")
    assert r.returncode == 5 and r.stderr.startswith("netacct-exec: job 3060 has no network namespace")
    r = run("--job", "../x", "--", "true")
    assert r.returncode == 4
    r = run("--job", "3060")
    assert r.returncode == 2
    bpf_node.prolog(3060)
    assert run("--job", "3060", "--user", "no-such-user-x", "--", "true").returncode == 2
    r = run("--job", "3060", "--", "/no/such/cmd")
    assert r.returncode == 127 and "command not found" in r.stderr
    bpf_node.epilog(3060)


def test_database_is_private_and_in_wal_mode(bpf_node: Node) -> None:
    bpf_node.prolog(3070)
    bpf_node.epilog(3070)
    assert stat.S_IMODE(bpf_node.db.stat().st_mode) == 0o600
    assert _rows(bpf_node.db, "PRAGMA journal_mode") == [("wal",)]
    rows = _rows(bpf_node.db, "SELECT job_id, node, user, uid, account, partition, state FROM jobs")
    assert rows == [(3070, "n1", "alice", 1234, "physics", "batch", "completed")]


def test_job_namespace_names_follow_the_prefix(bpf_node: Node) -> None:
    bpf_node.prolog(3080)
    assert os.path.exists(f"/run/netns/{JOB_PREFIX}3080")
    assert "na3080" in in_ns(bpf_node.topo.node, "ip", "-o", "link").stdout
    bpf_node.epilog(3080)


def test_a_prolog_killed_between_creating_and_mounting_its_namespace_file(bpf_node: Node) -> None:
    """What the random-kill test once hit: an empty namespace file is a leftover, not a
    namespace "made by something else"; the next prolog replaces it."""
    bpf_node.netns_path(3090).parent.mkdir(parents=True, exist_ok=True)
    bpf_node.netns_path(3090).touch()
    bpf_node.started.add(3090)
    bpf_node.prolog(3090)
    assert "removing a half-made setup" in bpf_node.log.read_text()
    bpf_node.epilog(3090)
    assert not os.path.lexists(bpf_node.netns_path(3090))


def test_the_node_table_follows_the_last_ruleset_installed(tmp_path: Path) -> None:
    """A job with another pool (or DNS stub) replaces the node table; a job with the first
    one's must get it back, not find a stale "already installed" mark of it."""
    from slurm_netacct import config
    from slurm_netacct.kernel import netns
    from slurm_netacct.node.nat import NftNat
    from slurm_netacct.node.plan import NodePlan
    from topology import sh

    ns = f"{TAG}nattab"
    sh("ip", "netns", "add", ns)
    try:
        cfg = config.parse({})
        with6 = NodePlan("n1", "up0", ipaddress.IPv4Network("100.64.0.0/16"), ipaddress.IPv6Network("fd00:1::/64"))
        without6 = NodePlan("n1", "up0", ipaddress.IPv4Network("100.64.0.0/30"), None)
        with netns.entered(Path(f"/run/netns/{ns}")):
            for plan in (with6, without6, with6, without6):
                NftNat().install(cfg, plan)
                table = sh("nft", "list", "table", "inet", "netacct_node").stdout
                assert ("ip6 saddr fd00:1::/64 masquerade" in table) == (plan is with6), table
                assert f"ip saddr {plan.pool4} masquerade" in table
            assert NftNat().remove(cfg)
    finally:
        sh("ip", "netns", "del", ns, check=False)


def test_the_marks_of_deleted_node_namespaces_do_not_pile_up() -> None:
    """Was: /run/slurm-netacct/node-<inode>-* of every node namespace ever used stayed until
    the next boot (and a new namespace given a dead one's inode inherited its marks).

    The namespaces are held by a process each, not bind-mounted: on this machine /run/netns
    is mounted over itself several times (every `ip netns add` of every tool may add one), so
    a namespace deleted with `ip netns del` can live on in a shadowed copy of its mount."""
    import time

    from conftest import need_root

    need_root()
    turn_on = "from slurm_netacct.node import nat; nat.enable_forwarding(False)"
    own = os.stat("/proc/self/ns/net").st_ino
    holders = [subprocess.Popen(["unshare", "--net", "sleep", "300"]) for _ in range(2)]
    try:
        inodes = []
        for h in holders:
            deadline = time.monotonic() + 10
            while os.stat(f"/proc/{h.pid}/ns/net").st_ino == own and time.monotonic() < deadline:
                time.sleep(0.01)
            inodes.append(os.stat(f"/proc/{h.pid}/ns/net").st_ino)
        assert own not in inodes
        mark_a, mark_b = (naming.forwarding_mark(i, 4) for i in inodes)
        try:
            subprocess.run(["nsenter", f"--net=/proc/{holders[0].pid}/ns/net", sys.executable, "-c", turn_on],
                           check=True)
            assert mark_a.read_text() == "0"  # what a prolog found there (a new namespace does not forward)
            holders[0].kill()
            holders[0].wait()  # namespace a is gone
            assert mark_a.exists()
            subprocess.run(["nsenter", f"--net=/proc/{holders[1].pid}/ns/net", sys.executable, "-c", turn_on],
                           check=True)  # the next mark written prunes those of dead namespaces
            assert not mark_a.exists()
            assert mark_b.read_text() == "0"
        finally:
            mark_a.unlink(missing_ok=True)
            mark_b.unlink(missing_ok=True)
    finally:
        for h in holders:
            h.kill()
            h.wait()

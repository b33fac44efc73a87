"""Crashes, leftovers and load: the reaper, SIGKILL at every step, 64 jobs landing at once."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import TAG, VENV_BIN, Node, fast_few, project_leftovers
from slurm_netacct import naming
from topology import PORT, WAN4, in_ns

SETUP_STEPS = ["lease", "netns", "link", "rules", "node"]
TEARDOWN_STEPS = ["down", "stored", "removed"]


def reconcile(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, NETACCT_CONFIG=str(node.config_path), SLURMD_NODENAME="n1")
    return subprocess.run(["nsenter", f"--net=/run/netns/{node.topo.node}", str(VENV_BIN / "netacct-reconcile"),
                           *args], capture_output=True, text=True, env=env, timeout=120)


def _state(node: Node, job: int) -> str | None:
    with sqlite3.connect(node.db) as conn:
        row = conn.execute("SELECT state FROM jobs WHERE job_id = ? ORDER BY restart DESC", (job,)).fetchone()
    return row[0] if row else None


def _traffic(node: Node, job: int) -> dict[str, tuple[int, int, int, int]]:
    with sqlite3.connect(node.db) as conn:
        return {k: (a, b, c, d) for k, a, b, c, d in conn.execute(
            "SELECT class, in_bytes, out_bytes, in_packets, out_packets FROM traffic WHERE job_id = ?", (job,))}


def _live(node: Node, job: int) -> dict[str, tuple[int, int, int, int]]:
    c = node.live(job)
    return {k: (c[(k, "in")].bytes, c[(k, "out")].bytes, c[(k, "in")].packets, c[(k, "out")].packets)
            for k in ("lan", "wan")}


def _seen(node: Node) -> dict[str, tuple[int, int, int, int]]:
    """What the LAN and WAN servers exchanged since their last reset, as the node's way of
    counting counts it (Node.seen; the oracle: not our counters), as a job's (in_bytes,
    out_bytes, in_packets, out_packets) per class."""
    node.topo.wait_quiet()
    out = {}
    for klass in ("lan", "wan"):
        c = node.seen(klass, reset=True)
        out[klass] = (c["tx"][1], c["rx"][1], c["tx"][0], c["rx"][0])
    return out


def test_reconcile_stores_the_counters_of_a_job_whose_epilog_never_ran(node: Node) -> None:
    node.prolog(8001)
    node.traffic(8001, "tcp-up", WAN4, str(PORT), "300000")
    live = _seen(node)
    r = reconcile(node, "--active", "")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("job 8001: namespace ") and r.stdout.rstrip().endswith("-> reconciled")
    node.started.discard(8001)
    node.settle()
    assert _state(node, 8001) == "reconciled"
    assert _traffic(node, 8001) == live and live["wan"][1] > 300_000
    assert project_leftovers(node.topo) == []
    with sqlite3.connect(node.db) as conn:
        assert conn.execute("SELECT * FROM leases").fetchall() == []


def test_reconcile_leaves_active_jobs_alone(node: Node) -> None:
    node.prolog(8002)
    node.prolog(8003)
    r = reconcile(node, "--active", "8002")
    assert r.returncode == 0, r.stderr
    assert "job 8003:" in r.stdout and "job 8002" not in r.stdout
    assert _state(node, 8002) == "running" and _state(node, 8003) == "reconciled"
    node.traffic(8002, "tcp-up", WAN4, str(PORT), "1000")  # 8002 still works
    node.started.discard(8003)
    node.epilog(8002)


@pytest.mark.slow
def test_reconcile_touches_nothing_when_slurm_cannot_be_asked(node: Node, tmp_path: Path) -> None:
    node.prolog(8004)
    env = dict(os.environ, NETACCT_CONFIG=str(node.config_path), SLURMD_NODENAME="n1",
               SLURM_CONF=str(tmp_path / "no-such-slurm.conf"))
    r = subprocess.run(["nsenter", f"--net=/run/netns/{node.topo.node}", str(VENV_BIN / "netacct-reconcile")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0
    assert r.stderr.startswith("netacct-reconcile: SLURM cannot be asked which jobs run on n1: nothing touched")
    assert _state(node, 8004) == "running" and os.path.exists(node.netns_path(8004))
    node.epilog(8004)


@pytest.mark.parametrize("step", fast_few(SETUP_STEPS, ["link"]))
def test_prolog_killed_at_every_step(node: Node, step: str) -> None:
    """SIGKILL mid-prolog: a second prolog for the job recovers; so does the reaper."""
    for job, recover in ((8010, "prolog"), (8011, "reconcile")):
        r = node.hook("prolog", job, NETACCT_FAILPOINT=f"kill:{step}")
        assert r.returncode in (-9, 137), (r.returncode, r.stderr)  # killed, nothing rolled back
        if recover == "prolog":
            node.prolog(job)
            node.traffic(job, "tcp-up", WAN4, str(PORT), "1000")
            node.epilog(job)
            assert _state(node, job) == "completed"
        else:
            r = reconcile(node, "--active", "")
            assert r.returncode == 0, r.stderr
            node.started.discard(job)
            node.settle()
    assert project_leftovers(node.topo) == []
    with sqlite3.connect(node.db) as conn:
        assert conn.execute("SELECT * FROM leases").fetchall() == []


@pytest.mark.parametrize("step", fast_few(TEARDOWN_STEPS, ["stored"]))
def test_epilog_killed_at_every_step_loses_no_counted_traffic(node: Node, step: str) -> None:
    job = 8020
    node.prolog(job)
    node.traffic(job, "tcp-up", WAN4, str(PORT), "200000")
    live = _seen(node)
    assert live["wan"][1] > 200_000 and live["lan"] == (0, 0, 0, 0)
    r = node.hook("epilog", job, NETACCT_FAILPOINT=f"kill:{step}")
    assert r.returncode in (-9, 137)
    node.epilog(job)  # slurmd retries, or an admin runs it again
    assert _state(node, job) == "completed"
    assert _traffic(node, job) == live
    assert project_leftovers(node.topo) == []


@pytest.mark.slow
def test_64_jobs_land_at_once_and_leave_at_once(bpf_node: Node) -> None:
    node = bpf_node
    node.start_daemon()
    node.prolog(8100)  # an already running job, sending all along
    sender = subprocess.Popen([str(VENV_BIN / "netacct-exec"), "--job", "8100", "--", sys.executable,
                               str(Path(__file__).parent / "traffic.py"), "tcp-up", WAN4, str(PORT), "200000000"],
                              env=dict(os.environ, NETACCT_CONFIG=str(node.config_path)), stdout=subprocess.PIPE)
    jobs = list(range(8200, 8264))
    node.started.update(jobs)

    def storm(which: str) -> None:
        procs = [subprocess.Popen(["nsenter", f"--net=/run/netns/{node.topo.node}", str(Path(__file__).parents[1] / which)],
                                  env=node.env(j), stderr=subprocess.PIPE, text=True) for j in jobs]
        errors = [(j, p.wait(timeout=120), p.stderr.read() if p.stderr else "") for j, p in zip(jobs, procs)]
        assert [e for e in errors if e[1] != 0] == []

    storm("prolog")
    addrs = [node.run_in_job(j, "ip", "-o", "-4", "addr", "show", "dev", "eth0").stdout.split()[3] for j in jobs]
    assert len(set(addrs)) == 64
    storm("epilog")
    node.settle()
    assert sender.wait(timeout=120) == 0
    node.topo.wait_quiet()
    wan = node.topo.server_counts("wan")
    node.epilog(8100)
    with sqlite3.connect(node.db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'completed' AND job_id >= 8200").fetchone() == (64,)
        assert conn.execute("SELECT COUNT(DISTINCT job_id) FROM traffic WHERE job_id >= 8200").fetchone() == (64,)
        assert conn.execute("SELECT * FROM leases").fetchall() == []
    # The running job's accounting was not disturbed: exact to the server's count.
    assert _traffic(node, 8100)["wan"][1] == wan["rx"][1] > 200_000_000
    assert "database is locked" not in node.log.read_text()


def _kill_after(node: Node, which: str, job: int, delay: float) -> int:
    """Start the real hook in-process (no daemon) and SIGKILL it after `delay` seconds."""
    import time
    env = node.env(job)
    env["NETACCT_SOCKET"] = "/nonexistent"  # the in-process path: the one that can be killed midway
    p = subprocess.Popen(["nsenter", f"--net=/run/netns/{node.topo.node}", str(Path(__file__).parents[1] / which)],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    p.kill()  # nsenter execs the hook, which execs python: the PID is the hook's
    return p.wait()


@pytest.mark.slow
def test_sigkill_at_random_moments_50_times_each(bpf_node: Node) -> None:
    """Kill the prolog and the epilog at random moments; the next run or the reaper always
    leaves the node clean and keeps every counted byte that still existed."""
    import random
    rng = random.Random(20261126)
    node = bpf_node
    for trial in range(50):
        job = 9000 + trial
        delay = rng.uniform(0.05, 0.35)  # the in-process prolog takes ~0.2 s here
        _kill_after(node, "prolog", job, delay)
        if trial % 2:
            node.prolog(job)  # the next prolog for the job repairs what the killed one left
            node.topo.reset_servers()
            node.run_in_job(job, "bash", "-c", f"printf '%100s' x > /dev/udp/{WAN4}/{PORT}")
            before = _seen(node)
            assert before == {"lan": (0, 0, 0, 0), "wan": (0, 128, 0, 1)}, trial
            rc = _kill_after(node, "epilog", job, rng.uniform(0.05, 0.3))
            node.epilog(job)  # and the next epilog finishes the teardown
            assert _state(node, job) == "completed", (trial, rc)
            assert _traffic(node, job) == before, trial  # the killed epilog or this one stored them
        else:
            r = reconcile(node, "--active", "")
            assert r.returncode == 0, r.stderr
        node.started.discard(job)
        node.settle()
        assert project_leftovers(node.topo) == [], trial
    with sqlite3.connect(node.db) as conn:
        assert conn.execute("SELECT * FROM leases").fetchall() == []
        assert conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'running'").fetchone() == (0,)


# --------------------------------------------------------------------------- a broken database

@pytest.fixture
def spool_node(topo, tmp_path: Path, backend: str) -> Iterator[Node]:  # type: ignore[no-untyped-def]
    """As the `node` fixture (nftables through the service, iptables in the hook itself),
    with a spool directory of its own."""
    n = Node(topo, tmp_path, backend, daemon=(backend != "iptables"), spool_dir=str(tmp_path / "spool"))
    topo.reset_servers()
    yield n
    n.cleanup()
    assert project_leftovers(topo) == []


def _wan_seen(node: Node) -> tuple[int, int, int, int]:
    """What the WAN server exchanged since the last reading, as the node's way of counting
    counts it (Node.seen), as the job's (in/out bytes, in/out packets)."""
    node.topo.wait_quiet()
    wan = node.seen("wan", reset=True)
    return wan["tx"][1], wan["rx"][1], wan["tx"][0], wan["rx"][0]


def _reported_wan(node: Node, job: int) -> tuple[str, tuple[int, int, int, int]]:
    [rec] = node.report("-j", str(job))
    w = rec["traffic"]["wan"]
    return rec["state"], (w["in_bytes"], w["out_bytes"], w["in_packets"], w["out_packets"])


def _spool(node: Node) -> list[Path]:
    return sorted((node.tmp / "spool").glob("*.json"))


def _corrupt(db: Path) -> bytes:
    good = db.read_bytes()
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    db.write_bytes(b"this is not a database" * 100)
    return good


def _assert_spooled(node: Node, r: subprocess.CompletedProcess[str], job: int, seen: tuple[int, ...]) -> Path:
    """The epilog succeeded, loudly, with the job's exact final record in the spool, and the
    job's namespace gone."""
    assert r.returncode == 0, r.stderr
    [spooled] = _spool(node)
    assert r.stderr.startswith(f"netacct-epilog: job {job}: database {node.db}: ") and r.stderr.endswith(
        f"; record spooled to {spooled} (stored when the database can be written again)\n")
    assert len(r.stderr.splitlines()) == 1
    assert spooled.name == f"n1.{job}.0.json" and spooled.stat().st_mode & 0o777 == 0o600
    rec = json.loads(spooled.read_text())
    assert rec["state"] == "completed" and rec["job_id"] == job and rec["node"] == "n1"
    w = rec["traffic"]["wan"]
    assert (w["in_bytes"], w["out_bytes"], w["in_packets"], w["out_packets"]) == seen
    errors = [line for line in node.log.read_text().splitlines()
              if " ERROR job %d: database %s: " % (job, node.db) in line and f"spooled to {spooled}" in line]
    assert len(errors) == 1, node.log.read_text()
    assert not os.path.lexists(node.netns_path(job))
    node.settle()
    assert project_leftovers(node.topo) == []
    return spooled


def test_a_corrupted_database_spools_the_record_and_the_next_prolog_stores_it(spool_node: Node) -> None:
    node = spool_node
    node.prolog(9100)
    node.traffic(9100, "tcp-up", WAN4, str(PORT), "100000")
    seen = _wan_seen(node)
    good = _corrupt(node.db)
    r = node.hook("epilog", 9100)
    _assert_spooled(node, r, 9100, seen)
    assert "its address lease cannot be freed" in node.log.read_text()

    node.db.write_bytes(good)  # the administrator restores the database (or moves it aside)
    node.prolog(9101)  # the next hook that opens it stores the spooled record first
    assert _spool(node) == []
    assert _reported_wan(node, 9100) == ("completed", seen)
    node.traffic(9101, "tcp-up", WAN4, str(PORT), "1000")  # the node works as before
    node.epilog(9101)
    assert _reported_wan(node, 9101) == ("completed", _wan_seen(node))
    r = reconcile(node, "--active", "")  # frees the address the broken database kept leased
    assert (r.returncode, r.stdout) == (0, "job 9100: address lease -> completed\n"), r.stderr
    node.started.discard(9100)
    with sqlite3.connect(node.db) as conn:
        assert conn.execute("SELECT * FROM leases").fetchall() == []


def test_an_unwritable_database_spools_and_a_replay_stores_it_exactly_once(spool_node: Node) -> None:
    """The database's directory cannot be written (as on a filesystem remounted read-only):
    the record is spooled; a second epilog run keeps it; netacct-sample stores it; a replay
    that runs again (as after a crash between the commit and the deletion of the file) stores
    the same numbers, never twice the traffic."""
    node = spool_node
    node.prolog(9110)
    node.traffic(9110, "tcp-up", WAN4, str(PORT), "120000")
    seen = _wan_seen(node)
    (node.tmp / "spool").mkdir(mode=0o700)  # it lives in the directory made unwritable
    subprocess.run(["chattr", "+i", str(node.tmp)], check=True)
    try:
        r = node.hook("epilog", 9110)
        spooled = _assert_spooled(node, r, 9110, seen)
        record = spooled.read_bytes()
        r = node.hook("epilog", 9110)  # slurmd or an administrator runs it again: no harm
        assert r.returncode == 0 and "record spooled to" in r.stderr, r.stderr
        node.settle()  # the service's deferred part too, while the database is still unwritable
        assert spooled.read_bytes() == record  # not replaced by a record with less in it
    finally:
        subprocess.run(["chattr", "-i", str(node.tmp)], check=True)

    r = subprocess.run(["nsenter", f"--net=/run/netns/{node.topo.node}", str(VENV_BIN / "netacct-sample")],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, NETACCT_CONFIG=str(node.config_path), SLURMD_NODENAME="n1"))
    assert (r.returncode, r.stdout, r.stderr) == (0, "n1: 0 sampled, 0 skipped, 0 errors\n", "")
    assert _spool(node) == [] and _reported_wan(node, 9110) == ("completed", seen)
    spooled.write_bytes(record)  # as if the replay had died after its commit
    r = reconcile(node, "--active", "")
    assert (r.returncode, r.stdout) == (0, "job 9110: address lease -> completed\n"), r.stderr
    assert _spool(node) == [] and _reported_wan(node, 9110) == ("completed", seen)
    with sqlite3.connect(node.db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM jobs WHERE job_id = 9110").fetchone() == (1,)
        assert conn.execute("SELECT * FROM leases").fetchall() == []
    node.started.discard(9110)


def test_a_spool_that_cannot_be_written_keeps_the_counters(topo, tmp_path: Path, backend: str) -> None:  # type: ignore[no-untyped-def]
    """Database and spool both broken: the epilog fails (exit 8: SLURM drains the node) and
    keeps the namespace and its counters; once the database is back, the epilog stores them."""
    (tmp_path / "not-a-dir").write_text("")
    node = Node(topo, tmp_path, backend, daemon=(backend != "iptables"),
                spool_dir=str(tmp_path / "not-a-dir" / "spool"))
    try:
        topo.reset_servers()
        node.prolog(9120)
        node.traffic(9120, "tcp-up", WAN4, str(PORT), "100000")
        seen = _wan_seen(node)
        good = _corrupt(node.db)
        r = node.hook("epilog", 9120)
        assert r.returncode == 8, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert f"database {node.db}: " in r.stderr and "spool " in r.stderr and "Not a directory" in r.stderr
        assert "the record cannot be spooled either" in node.log.read_text()
        assert os.path.exists(node.netns_path(9120))  # the namespace and its counters are kept
        node.db.write_bytes(good)
        node.epilog(9120)
        assert _reported_wan(node, 9120) == ("completed", seen)
        assert project_leftovers(topo) == []
    finally:
        node.cleanup()


@pytest.mark.slow
def test_many_cycles_leave_nothing_behind(topo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A reduced version of the 1000-cycle leak run: after N jobs through the service there is
    no namespace, link, route, rule, lease, file or descriptor more than after the first few,
    and exactly N complete rows. N is 205 in CI; the full run is
    `NETACCT_LEAK_CYCLES=1000 .venv/bin/python -m pytest tests/test_reliability.py -k many_cycles`
    (result in bench/RESULTS.md; the service's memory over 10,000 jobs: bench/hooks.py --cycles)."""
    total = int(os.environ.get("NETACCT_LEAK_CYCLES", "205"))
    assert total > 5
    node = Node(topo, tmp_path, "bpf", daemon=True)
    assert node.daemon is not None
    pid = node.daemon.pid

    ino = os.stat(f"/run/netns/{topo.node}").st_ino

    def snapshot() -> tuple[int, int, int]:
        """Descriptors of the service; this run's namespaces and this node's files in /run (other
        test runs on the machine make and remove theirs meanwhile)."""
        return (len(os.listdir(f"/proc/{pid}/fd")), len([n for n in os.listdir("/run/netns") if n.startswith(TAG)]),
                len(list(Path("/run/slurm-netacct").glob(f"node-{ino}-*"))))

    try:
        for j in range(1, 6):
            node.prolog(j)
            node.epilog(j)
        before = snapshot()
        for j in range(6, total + 1):
            node.prolog(j)
            node.epilog(j)
        after = snapshot()
        assert after[1:] == before[1:]
        assert len(list(Path("/run/slurm-netacct/locks").iterdir())) <= 256  # lock stripes, not per job
        # The service's descriptors: each of its 4 workers and its deferred-work thread keeps
        # one descriptor of a namespace it has served (nftread), opened the first time that
        # thread serves it; nothing per job.
        # (No lower bound: a snapshot can catch the connection of the request just answered.)
        assert after[0] <= before[0] + 5, (before, after)
        assert project_leftovers(topo) == []
        with sqlite3.connect(node.db) as conn:
            assert conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'completed'").fetchone() == (total,)
            assert conn.execute("SELECT COUNT(*) FROM jobs WHERE state != 'completed'").fetchone() == (0,)
            assert conn.execute("SELECT COUNT(DISTINCT job_id) FROM traffic").fetchone() == (total,)
            assert conn.execute("SELECT * FROM leases").fetchall() == []
        routes = in_ns(topo.node, "ip", "route").stdout + in_ns(topo.node, "ip", "-6", "route").stdout
        assert "100.64." not in routes and "fd00:6e61" not in routes
    finally:
        node.cleanup()


@pytest.mark.parametrize("policy, code", [("drain", 7), ("log", 0)])
def test_a_failed_teardown_drains_the_node_or_not_as_configured(topo, tmp_path: Path, policy: str, code: int) -> None:  # type: ignore[no-untyped-def]
    node = Node(topo, tmp_path, "nftables", teardown_failure=policy)
    try:
        node.prolog(9200)
        r = node.hook("epilog", 9200, NETACCT_FAILPOINT="removed")
        assert r.returncode == code, r.stderr
        assert _state(node, 9200) == "completed"  # the counters were stored either way
        assert ("failpoint removed" in r.stderr) == (policy == "drain")
        if policy == "log":
            assert "left for netacct-reconcile" in node.log.read_text()
        r = reconcile(node, "--active", "")
        assert r.returncode == 0, r.stderr
        node.started.discard(9200)
        assert project_leftovers(topo) == []
    finally:
        node.cleanup()


# --------------------------------------------------------------------------- node reboot mid-job

ZERO4 = (0, 0, 0, 0)


def _sample(node: Node) -> None:
    """netacct-sample, as its timer runs it on the node."""
    env = dict(os.environ, NETACCT_CONFIG=str(node.config_path), SLURMD_NODENAME="n1")
    r = subprocess.run(["nsenter", f"--net=/run/netns/{node.topo.node}", str(VENV_BIN / "netacct-sample")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (0, "n1: 1 sampled, 0 skipped, 0 errors\n", ""), r


def _upload(node: Node, job: int, n: int) -> tuple[int, int, int, int]:
    """Send n bytes to the WAN server; what the server saw at its IP layer, as the job's
    (in_bytes, out_bytes, in_packets, out_packets)."""
    assert node.traffic(job, "tcp-up", WAN4, str(PORT), str(n)).strip() == str(n)
    return _wan_seen(node)


def _add(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, int, int, int]:
    return tuple(x + y for x, y in zip(a, b))  # type: ignore[return-value]


def _sub(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, int, int, int]:
    return tuple(x - y for x, y in zip(a, b))  # type: ignore[return-value]


def _reboot(node: Node, job: int) -> None:
    """What a reboot does to the node: every process dies (the service too), the job's
    namespace and veth pair vanish, the node's firewall state and forwarding are back at boot
    defaults, and /run (tmpfs) is empty. The database file survives."""
    if node.daemon is not None:
        node.daemon.kill()  # by its PID
        node.daemon.wait(timeout=30)
        node.daemon = None
    ns = node.topo.node
    ino = os.stat(f"/run/netns/{ns}").st_ino
    in_ns(ns, "ip", "link", "del", naming.host_ifname(node.cfg.ifname_prefix, job))
    subprocess.run(["ip", "netns", "del", node.netns_path(job).name], check=True)
    node.pin(job).unlink(missing_ok=True)  # the bpf filesystem is memory too
    in_ns(ns, "nft", "flush", "ruleset")
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        for table in ("filter", "nat"):
            in_ns(ns, tool, "-t", table, "-F")
            in_ns(ns, tool, "-t", table, "-X")
    in_ns(ns, "sysctl", "-qw", "net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0")
    for mark in Path("/run/slurm-netacct").glob(f"node-{ino}-*"):
        mark.unlink()
    assert not os.path.lexists(node.netns_path(job))
    assert naming.host_ifname(node.cfg.ifname_prefix, job) not in in_ns(ns, "ip", "-o", "link").stdout
    assert "netacct" not in in_ns(ns, "nft", "list", "tables").stdout
    if node.backend != "iptables":
        node.start_daemon()  # systemd starts the service again, before slurmd


def _row(node: Node, job: int, restart: int = 0) -> tuple[str, str | None]:
    with sqlite3.connect(node.db) as conn:
        return conn.execute("SELECT state, sampled_at FROM jobs WHERE job_id = ? AND restart = ?",
                            (job, restart)).fetchone()


def _run_traffic(node: Node, job: int, restart: int = 0) -> dict[str, tuple[int, int, int, int]]:
    with sqlite3.connect(node.db) as conn:
        return {k: (a, b, c, d) for k, a, b, c, d in conn.execute(
            "SELECT class, in_bytes, out_bytes, in_packets, out_packets FROM traffic WHERE job_id = ? "
            "AND restart = ?", (job, restart))}


@pytest.mark.slow
@pytest.mark.parametrize("after", ["reconcile", "epilog", "requeue"])
def test_a_node_reboot_mid_job_loses_only_the_traffic_since_the_last_sample(node: Node, after: str) -> None:
    """Uploads with netacct-sample runs between them, then the node reboots. Whatever runs
    after the reboot -- the reaper when SLURM has let the job go, the epilog SLURM runs when
    it kills the job (NODE_FAIL) while the reaper at boot still saw it listed, or the prolog
    of the job requeued onto the same node -- the run is recorded `lost` with exactly the
    traffic the WAN server saw up to the last sample; only what followed it is lost."""
    job = 8300
    node.prolog(job)
    sampled = _upload(node, job, 300_000)
    _sample(node)
    sampled = _add(sampled, _upload(node, job, 200_000))
    _sample(node)  # the last sample before the crash
    _, sampled_at = _row(node, job)
    after_sample = _upload(node, job, 100_000)  # sent after the last sample: to be lost
    before_crash = _live(node, job)
    assert before_crash["wan"] == _add(sampled, after_sample) and before_crash["lan"] == ZERO4

    _reboot(node, job)
    if after == "reconcile":  # SLURM has already let the job go (squeue no longer lists it)
        r = reconcile(node, "--active", "")
        assert r.returncode == 0, r.stderr
        assert r.stdout == f"job {job}: running row (run 0); address lease -> reconciled (counters lost)\n"
        node.epilog(job)  # a late epilog for the run changes nothing
    elif after == "epilog":  # the reaper at slurmd start still sees the job active ...
        r = reconcile(node, "--active", str(job))
        assert (r.returncode, r.stdout) == (0, ""), r.stderr
        assert _row(node, job) == ("running", sampled_at)
        node.epilog(job)  # ... then slurmctld kills it (NODE_FAIL) and slurmd runs the epilog
        r = reconcile(node, "--active", "")
        assert (r.returncode, r.stdout) == (0, ""), r.stderr  # nothing was left
    else:  # requeued (restart 1) onto the same node before anything else ran
        node.prolog(job, SLURM_JOB_RESTART_COUNT="1")
        rerun = _upload(node, job, 150_000)
        node.epilog(job, SLURM_JOB_RESTART_COUNT="1")
        assert _row(node, job, 1)[0] == "completed"
        assert _run_traffic(node, job, 1) == {"lan": ZERO4, "wan": rerun}
    node.started.discard(job)
    node.settle()

    # The crashed run: exactly what the WAN server saw up to the last sample, marked lost.
    assert _row(node, job) == ("lost", sampled_at)
    assert _run_traffic(node, job) == {"lan": ZERO4, "wan": sampled}
    # What was lost is exactly the traffic sent after that sample (and it was not nothing).
    assert _sub(before_crash["wan"], sampled) == after_sample and after_sample[1] > 100_000
    [rec] = node.report("-j", str(job))
    want = _add(sampled, rerun) if after == "requeue" else sampled
    got = rec["traffic"]["wan"]
    assert (got["in_bytes"], got["out_bytes"], got["in_packets"], got["out_packets"]) == want
    assert rec["state"] == "lost" and rec["as_of"] == sampled_at  # a run of it lost traffic
    # The node is clean: nothing of the job in the kernel, no lease, no running row.
    assert project_leftovers(node.topo) == []
    with sqlite3.connect(node.db) as conn:
        assert conn.execute("SELECT * FROM leases").fetchall() == []
        assert conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'running'").fetchone() == (0,)
    # And it works again: a new job after the reboot is accounted exactly.
    node.prolog(job + 1)
    fresh = _upload(node, job + 1, 50_000)
    node.epilog(job + 1)
    assert _run_traffic(node, job + 1) == {"lan": ZERO4, "wan": fresh}


def test_a_requeued_run_stores_the_counters_its_predecessor_left(node: Node) -> None:
    """A run whose epilog never ran (slurmd died) still has its namespace when the job,
    requeued, comes back to the node: the new run's prolog stores the old run's counters
    (`reconciled`) before it replaces the namespace, instead of throwing them away."""
    job = 8310
    node.prolog(job)
    first = _upload(node, job, 200_000)
    node.prolog(job, SLURM_JOB_RESTART_COUNT="1")
    assert _row(node, job) == ("reconciled", None)
    assert _run_traffic(node, job) == {"lan": ZERO4, "wan": first}
    second = _upload(node, job, 100_000)
    node.epilog(job, SLURM_JOB_RESTART_COUNT="1")
    assert _row(node, job, 1)[0] == "completed"
    assert _run_traffic(node, job, 1) == {"lan": ZERO4, "wan": second}
    [rec] = node.report("-j", str(job))
    w = rec["traffic"]["wan"]
    assert (w["in_bytes"], w["out_bytes"], w["in_packets"], w["out_packets"]) == _add(first, second)
    node.started.discard(job)
    assert project_leftovers(node.topo) == []


def test_spool_replay_takes_only_valid_records_of_its_own_node(tmp_path: Path) -> None:
    """Without the network: a record of another node stays for that node; a file that is not a
    record is moved aside as *.bad (never retried, never stored); a conditional `lost` record
    closes only a row still running; the database then holds exactly the valid records."""
    from slurm_netacct import config
    from slurm_netacct.store import db as store
    from slurm_netacct.store import spool as spooling

    cfg = config.parse({"db": str(tmp_path / "%n.db"), "spool_dir": str(tmp_path / "spool")})
    spool = cfg.spool_for("n1")
    traffic = {"wan": {"in_bytes": 10, "out_bytes": 20, "in_packets": 1, "out_packets": 2}}
    mine = store.JobInfo(job_id=7, node="n1", user="alice")
    theirs = store.JobInfo(job_id=7, node="n2", user="bob")
    running = store.JobInfo(job_id=8, node="n1")
    never_ran = store.JobInfo(job_id=9, node="n1")
    db = store.connect(cfg.db_for("n1"))
    try:
        store.record_start(db, running, "ns", "100.64.0.3", None, "nftables")
        for info, state, t, cond in ((mine, "completed", traffic, False), (theirs, "completed", traffic, False),
                                     (running, "lost", None, True), (never_ran, "lost", None, True)):
            path = spooling.spool_write(spool, spooling.spool_record(info, state, t, None, cond, cfg.db_for(info.node), "x"))
            assert path == spooling.spool_path(spool, info)
        (spool / "n1.10.0.json").write_text("{not json")
        spool.chmod(0o777)  # anyone could have planted records: none is stored
        assert spooling.replay_spool(db, spool, "n1") == 0 and len(list(spool.iterdir())) == 5
        spool.chmod(0o700)
        assert spooling.replay_spool(db, spool, "n1") == 2
        assert sorted(p.name for p in spool.iterdir()) == ["n1.10.0.json.bad", "n2.7.0.json"]
        rows = db.conn.execute("SELECT job_id, node, user, state FROM jobs ORDER BY job_id").fetchall()
        assert rows == [(7, "n1", "alice", "completed"), (8, "n1", None, "lost")]
        assert db.conn.execute("SELECT job_id, class, in_bytes, out_bytes FROM traffic").fetchall() == [(7, "wan", 10, 20)]
        assert spooling.replay_spool(db, spool, "n1") == 0
    finally:
        db.close()
    for bad in ("var/spool", "", 17):  # validated like the other paths
        with pytest.raises(config.ConfigError, match="config key 'spool_dir'"):
            config.parse({"spool_dir": bad})
    assert config.parse({}).spool_for("n1") == Path("/var/spool/slurm-netacct")


def _node_setup(node: Node) -> tuple[str, str, bool]:
    """(IPv4 forwarding, IPv6 forwarding, whether the node's NAT rules exist) of the sandbox node."""
    ns = node.topo.node
    fwd = in_ns(ns, "sysctl", "-n", "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding").stdout.split()
    if node.backend != "iptables":  # BPF counting's node has nftables NAT
        nat = "netacct_node" in in_ns(ns, "nft", "list", "tables").stdout
    else:
        nat = "NETACCT_NAT" in in_ns(ns, "iptables-legacy", "-t", "nat", "-S").stdout
    return fwd[0], fwd[1], nat


def test_remove_node_undoes_the_node_setup_once_no_job_is_left(node: Node) -> None:
    ns = node.topo.node
    in_ns(ns, "nft", "flush", "ruleset")  # the sandbox node as at boot: no firewall state ...
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        in_ns(ns, tool, "-t", "nat", "-F")
        in_ns(ns, tool, "-t", "nat", "-X")
    in_ns(ns, "sysctl", "-qw", "net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0")  # ... no forwarding
    ino = os.stat(f"/run/netns/{ns}").st_ino
    for mark in Path("/run/slurm-netacct").glob(f"node-{ino}-*"):  # and /run, as at boot
        mark.unlink()
    job = 8400
    node.prolog(job)
    assert _node_setup(node) == ("1", "1", True)
    r = reconcile(node, "--active", str(job), "--remove-node")  # the job is still running
    assert r.returncode == 7 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"netacct-reconcile: 1 jobs still have objects on n1 (job {job}: namespace ")
    assert r.stderr.rstrip().endswith("nothing removed")
    assert _node_setup(node) == ("1", "1", True)
    node.epilog(job)
    r = reconcile(node, "--active", "", "--remove-node")
    assert r.returncode == 0, r.stderr
    nat = "iptables" if node.backend == "iptables" else "nftables"
    assert r.stdout.splitlines() == [f"node n1: removed {nat} node rules",
                                     "node n1: removed net/ipv4/ip_forward back to 0",
                                     "node n1: removed net/ipv6/conf/all/forwarding back to 0"]
    assert _node_setup(node) == ("0", "0", False)
    assert not list(Path("/run/slurm-netacct").glob(f"node-{ino}-*"))
    r = reconcile(node, "--active", "", "--remove-node")  # again: nothing left to remove
    assert (r.returncode, r.stdout) == (0, ""), r.stderr
    node.prolog(job + 1)  # and the next job sets the node up again
    assert _node_setup(node) == ("1", "1", True)
    node.epilog(job + 1)

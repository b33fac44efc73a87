"""Crashes, leftovers and load: the reaper, SIGKILL at every step, 64 jobs landing at once."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import VENV_BIN, Node, project_leftovers
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


def test_reconcile_stores_the_counters_of_a_job_whose_epilog_never_ran(node: Node) -> None:
    node.prolog(8001)
    node.traffic(8001, "tcp-up", WAN4, str(PORT), "300000")
    live = _live(node, 8001)
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


@pytest.mark.parametrize("step", SETUP_STEPS)
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


@pytest.mark.parametrize("step", TEARDOWN_STEPS)
def test_epilog_killed_at_every_step_loses_no_counted_traffic(node: Node, step: str) -> None:
    job = 8020
    node.prolog(job)
    node.traffic(job, "tcp-up", WAN4, str(PORT), "200000")
    live = _live(node, job)
    r = node.hook("epilog", job, NETACCT_FAILPOINT=f"kill:{step}")
    assert r.returncode in (-9, 137)
    node.epilog(job)  # slurmd retries, or an admin runs it again
    assert _state(node, job) == "completed"
    assert _traffic(node, job) == live
    assert project_leftovers(node.topo) == []


def test_64_jobs_land_at_once_and_leave_at_once(nft_node: Node) -> None:
    node = nft_node
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


def test_sigkill_at_random_moments_50_times_each(nft_node: Node) -> None:
    """Kill the prolog and the epilog at random moments; the next run or the reaper always
    leaves the node clean and keeps every counted byte that still existed."""
    import random
    rng = random.Random(20261126)
    node = nft_node
    for trial in range(50):
        job = 9000 + trial
        delay = rng.uniform(0.05, 0.35)  # the in-process prolog takes ~0.2 s here
        _kill_after(node, "prolog", job, delay)
        if trial % 2:
            node.prolog(job)  # the next prolog for the job repairs what the killed one left
            node.run_in_job(job, "bash", "-c", f"printf '%100s' x > /dev/udp/{WAN4}/{PORT}")
            before = _live(node, job)
            rc = _kill_after(node, "epilog", job, rng.uniform(0.05, 0.3))
            node.epilog(job)  # and the next epilog finishes the teardown
            assert _state(node, job) == "completed", (trial, rc)
            if _traffic(node, job):  # the killed epilog or this one stored them: exactly
                assert _traffic(node, job) == before, trial
        else:
            r = reconcile(node, "--active", "")
            assert r.returncode == 0, r.stderr
        node.started.discard(job)
        node.settle()
        assert project_leftovers(node.topo) == [], trial
    with sqlite3.connect(node.db) as conn:
        assert conn.execute("SELECT * FROM leases").fetchall() == []
        assert conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'running'").fetchone() == (0,)


def test_a_corrupted_database_loses_no_record(nft_node: Node) -> None:
    node = nft_node
    node.prolog(9100)
    node.traffic(9100, "tcp-up", WAN4, str(PORT), "100000")
    live = _live(node, 9100)
    good = node.db.read_bytes()
    for suffix in ("-wal", "-shm"):
        Path(str(node.db) + suffix).unlink(missing_ok=True)
    node.db.write_bytes(b"this is not a database" * 100)
    r = node.hook("epilog", 9100)
    assert r.returncode == 8, r.stderr  # loud: SLURM drains the node
    assert len(r.stderr.strip().splitlines()) == 1 and "database" in r.stderr
    assert os.path.exists(node.netns_path(9100))  # the namespace and its counters are kept
    node.db.write_bytes(good)  # the administrator restores the database (or moves it aside)
    node.epilog(9100)
    assert _state(node, 9100) == "completed" and _traffic(node, 9100) == live


def test_many_cycles_leave_nothing_behind(topo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A reduced version of the 1000-cycle leak run (bench/hooks.py --cycles for the full one):
    after N jobs through the service there is no namespace, link, route, rule, lease, file or
    descriptor more than after the first few, and exactly N complete rows."""
    node = Node(topo, tmp_path, "nftables", daemon=True)
    assert node.daemon is not None
    pid = node.daemon.pid

    def snapshot() -> tuple[int, int, int]:
        return (len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir("/run/netns")),
                len(list(Path("/run/slurm-netacct").rglob("*"))))

    try:
        for j in range(1, 6):
            node.prolog(j)
            node.epilog(j)
        before = snapshot()
        for j in range(6, 206):
            node.prolog(j)
            node.epilog(j)
        after = snapshot()
        assert after[1:] == before[1:]
        # The service's descriptors: each of its 4 workers and its deferred-work thread keeps
        # one descriptor of a namespace it has served (nftread), opened the first time that
        # thread serves it; nothing per job.
        assert before[0] <= after[0] <= before[0] + 5, (before, after)
        assert project_leftovers(topo) == []
        with sqlite3.connect(node.db) as conn:
            assert conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'completed'").fetchone() == (205,)
            assert conn.execute("SELECT COUNT(*) FROM jobs WHERE state != 'completed'").fetchone() == (0,)
            assert conn.execute("SELECT COUNT(DISTINCT job_id) FROM traffic").fetchone() == (205,)
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

"""netacct-daemon and its client: the fast path, and every way it can be absent or wrong."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import VENV_BIN, Node, fast_few, project_leftovers
from topology import PORT, WAN4, Topology


@pytest.fixture
def dnode(topo: Topology, tmp_path: Path) -> Iterator[Node]:
    n = Node(topo, tmp_path, "bpf", daemon=True)
    topo.reset_servers()
    yield n
    n.cleanup()
    assert project_leftovers(topo) == []


def _log_lines(node: Node, job: int, ident: str) -> list[str]:
    return [line for line in node.log.read_text().splitlines() if f" {ident}[" in line and f"job {job}:" in line]


def test_hooks_go_through_the_daemon(dnode: Node) -> None:
    dnode.prolog(7001)
    dnode.traffic(7001, "tcp-up", WAN4, str(PORT), "200000")
    dnode.epilog(7001)
    assert _log_lines(dnode, 7001, "netacct-daemon")  # the daemon did the work ...
    assert not _log_lines(dnode, 7001, "netacct-prolog")  # ... not the hook
    [rec] = dnode.report("-j", "7001")
    assert rec["state"] == "completed" and rec["traffic"]["wan"]["out_bytes"] > 200_000
    with sqlite3.connect(dnode.db) as conn:
        assert conn.execute("SELECT * FROM leases").fetchall() == []


def test_a_job_run_again_right_after_its_epilog_keeps_its_link_and_address(dnode: Node) -> None:
    """The service deletes a link and frees its address after answering the epilog; a
    prolog of the same job on the node (a requeue) must not lose its new link or share its
    address to that late work (it used to: the late work deleted the new link by name and
    freed the lease the new run had taken over)."""
    jobs = list(range(7101, 7111))
    for job in jobs:
        dnode.prolog(job)
    for job in jobs:  # answered at once; ~15-40 ms of link deletion each is left queued
        r = dnode.hook("epilog", job)
        assert r.returncode == 0, r.stderr
    again = jobs[-1]
    dnode.prolog(again)  # its earlier run's removal is still at the end of the queue
    dnode.settle()  # all the queued removals have run
    assert dnode.traffic(again, "tcp-up", WAN4, str(PORT), "100000").strip() == "100000"
    other = 7120
    dnode.prolog(other)
    with sqlite3.connect(dnode.db) as conn:
        leases = dict(conn.execute("SELECT job_id, idx FROM leases").fetchall())
    assert set(leases) == {again, other} and leases[again] != leases[other]
    assert dnode.traffic(other, "tcp-up", WAN4, str(PORT), "100000").strip() == "100000"
    dnode.epilog(again)
    dnode.epilog(other)
    [rec] = dnode.report("-j", str(again))
    assert rec["state"] == "completed" and rec["traffic"]["wan"]["out_bytes"] > 100_000


def test_without_the_daemon_the_hooks_do_the_work(dnode: Node) -> None:
    dnode.stop_daemon()
    dnode.prolog(7002)
    dnode.epilog(7002)
    assert _log_lines(dnode, 7002, "netacct-prolog") and _log_lines(dnode, 7002, "netacct-epilog")


def test_a_daemon_that_hangs_is_given_up_on_within_the_timeout(dnode: Node) -> None:
    assert dnode.daemon is not None
    dnode.daemon.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = dnode.hook("prolog", 7003, NETACCT_TIMEOUT="2")
        elapsed = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        assert 2 <= elapsed < 10  # waited for the daemon 2 s, then did the work itself
        assert _log_lines(dnode, 7003, "netacct-prolog")
    finally:
        dnode.daemon.send_signal(signal.SIGCONT)
    # The daemon wakes up and finds the request it was sent: the job is already set up.
    deadline = time.monotonic() + 10
    while not any("already set up" in line for line in _log_lines(dnode, 7003, "netacct-daemon")):
        assert time.monotonic() < deadline, dnode.log.read_text()
        time.sleep(0.05)
    dnode.epilog(7003)


def test_a_daemon_with_another_config_hands_the_work_back(dnode: Node, tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text(dnode.config_path.read_text())
    r = dnode.hook("prolog", 7004, NETACCT_CONFIG=str(other))
    assert r.returncode == 0, r.stderr
    assert _log_lines(dnode, 7004, "netacct-prolog") and not _log_lines(dnode, 7004, "netacct-daemon")
    r = dnode.hook("epilog", 7004, NETACCT_CONFIG=str(other))
    assert r.returncode == 0


def test_daemon_restart_between_prolog_and_epilog(dnode: Node) -> None:
    dnode.prolog(7005)
    dnode.stop_daemon()
    dnode.start_daemon()
    dnode.traffic(7005, "tcp-up", WAN4, str(PORT), "100000")
    dnode.epilog(7005)
    [rec] = dnode.report("-j", "7005")
    assert rec["traffic"]["wan"]["out_bytes"] > 100_000


def test_errors_come_back_through_the_daemon(dnode: Node) -> None:
    r = dnode.hook("prolog", "../x")
    assert r.returncode == 4 and r.stderr == "netacct-prolog: job '../x': SLURM_JOB_ID: job id '../x' is not a positive decimal number\n"


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_daemon_memory_stays_flat(dnode: Node) -> None:
    """A short version of bench/hooks.py --cycles 10000: RSS after warm-up vs. after more jobs."""
    assert dnode.daemon is not None
    pid = dnode.daemon.pid

    def cycles(first: int, n: int) -> None:
        for j in range(first, first + n):
            dnode.prolog(j)
            dnode.epilog(j)

    cycles(10_000, 100)
    warm = _rss_kib(pid)
    cycles(20_000, 300)
    after = _rss_kib(pid)
    assert after - warm < 2048, (warm, after)  # KiB: no per-job growth (300 jobs would show it)
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    assert fds < 20, os.listdir(f"/proc/{pid}/fd")


_MALLOC_PROBE = """
import ctypes, sys
from slurm_netacct.node.daemon import pin_malloc_thresholds
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
big = bytes(16 << 20)
del big  # a mapped block freed: glibc raises its mmap threshold to 16 MiB
if sys.argv[1] == "pin":
    assert pin_malloc_thresholds()
before = libc.mallinfo2().hblks
buf = bytearray(8 << 20)
print(libc.mallinfo2().hblks - before)  # 1: the buffer got a mapping of its own; 0: heap
"""


@pytest.mark.parametrize("mode, mapped", [("pin", "1"), ("nopin", "0")])
def test_the_service_keeps_big_buffers_off_the_heap(mode: str, mapped: str) -> None:
    """The daemon's former RSS growth per job: once glibc's mmap threshold had risen, big
    short-lived buffers came from the heap and left holes; pinned, they are mapped (and
    unmapped) whole. "nopin" shows the probe sees the difference."""
    r = subprocess.run([str(VENV_BIN / "python"), "-c", _MALLOC_PROBE, mode], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == mapped


def test_daemon_exits_after_max_jobs_and_the_hooks_carry_on(topo: Topology, tmp_path: Path) -> None:
    node = Node(topo, tmp_path, "bpf")
    node.daemon = subprocess.Popen([str(VENV_BIN / "netacct-daemon"), "--config", str(node.config_path),
                                    "--socket", str(node.socket), "--max-jobs", "4"], stdout=subprocess.PIPE, text=True)
    assert node.daemon.stdout is not None and node.daemon.stdout.readline().startswith("netacct-daemon: listening")
    try:
        node.prolog(7101)
        node.prolog(7102)
        node.epilog(7101)
        node.epilog(7102)  # the 4th request: the daemon answers, finishes its deferred work, exits
        assert node.daemon.wait(timeout=30) == 0
        node.daemon = None
        node.prolog(7103)  # no daemon now: the hooks do it themselves
        node.epilog(7103)
        assert _log_lines(node, 7103, "netacct-prolog")
        assert project_leftovers(topo) == []
    finally:
        node.cleanup()


def _sig_blocked(pid: int, tid: int) -> int:
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return int(line.split()[1], 16)
    raise AssertionError("no SigBlk")


def test_only_the_main_thread_takes_sigterm(dnode: Node) -> None:
    """The kernel gives a process signal to any thread not blocking it; a worker taking SIGTERM
    would leave the main thread asleep in accept() (a stop that was once ignored)."""
    assert dnode.daemon is not None
    pid = dnode.daemon.pid
    dnode.settle()  # a request answered: every thread is up
    term_int = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGINT - 1))
    tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    assert len(tids) >= 3, tids
    for tid in tids:
        blocked = _sig_blocked(pid, tid) & term_int
        assert blocked == (0 if tid == pid else term_int), (tid, hex(blocked))


def test_sigterm_stops_the_daemon_promptly_every_time(topo: Topology, tmp_path: Path) -> None:
    node = Node(topo, tmp_path, "bpf")
    try:
        for _ in range(5):
            node.start_daemon()
            assert node.daemon is not None
            node.settle()
            t0 = time.monotonic()
            node.daemon.send_signal(signal.SIGTERM)
            assert node.daemon.wait(timeout=10) == 0
            assert time.monotonic() - t0 < 5
            node.daemon = None
    finally:
        node.cleanup()


class FakeDaemon:
    """A unix socket that answers every request with the same bytes (a garbled service)."""

    def __init__(self, path: Path, answer: bytes) -> None:
        import socket
        import threading

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.requests = 0

        def serve() -> None:
            while True:
                try:
                    conn, _ = self.sock.accept()
                except OSError:
                    return
                with conn:
                    conn.settimeout(5)
                    data = b""
                    while not data.endswith(b"\0\0"):
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    self.requests += 1
                    conn.sendall(answer)

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        import socket

        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(timeout=5)


@pytest.mark.parametrize("answer", fast_few([b"abc\n", b"0", b"0 done", b"300 x\n", b"-1 x\n", b"007 x\n",
                                             b" 0 x\n", b"0 two\nlines\n", b"0\n", b"1e1 x\n", b"0 x\n\0"],
                                            [b"0 done", b"300 x\n"]))
def test_an_answer_the_client_cannot_parse_makes_the_hook_run_itself(
        topo: Topology, tmp_path: Path, answer: bytes) -> None:
    node = Node(topo, tmp_path, "bpf")
    fake = FakeDaemon(node.socket, answer)
    try:
        r = node.hook("prolog", 7300)
        assert r.returncode == 0, r.stderr
        assert fake.requests == 1  # the client did ask ...
        assert _log_lines(node, 7300, "netacct-prolog")  # ... and then did the work itself
    finally:
        fake.close()
        node.cleanup()
    assert project_leftovers(topo) == []


@pytest.mark.parametrize("answer,rc,stderr", [(b"0 \n", 0, ""), (b"8 netacct-prolog: job 7301: boom\n", 8,
                                                                  "netacct-prolog: job 7301: boom\n")])
def test_a_well_formed_answer_is_the_hooks_result(topo: Topology, tmp_path: Path, answer: bytes,
                                                   rc: int, stderr: str) -> None:
    node = Node(topo, tmp_path, "bpf")
    fake = FakeDaemon(node.socket, answer)
    try:
        r = node.hook("prolog", 7301)
        assert (r.returncode, r.stderr) == (rc, stderr)
        assert fake.requests == 1 and not node.log.exists()  # nothing ran here
    finally:
        fake.close()
        node.started.clear()
    assert project_leftovers(topo) == []

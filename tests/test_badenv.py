"""A broken node environment: a full pool, nft or iptables missing, /run not writable.

Each must give one clear line, the documented exit code, and leave nothing half-made. The
"missing" and "read-only" cases run the real prolog in a private mount namespace of its own
(propagation private: nothing it mounts is seen outside) where the file is hidden or the
directory is mounted read-only; the machine itself is not changed.
"""

from __future__ import annotations

import os
import shlex
import sqlite3
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, Node, project_leftovers
from topology import Topology, in_ns

LIBNFTABLES = Path("/usr/lib/x86_64-linux-gnu/libnftables.so.1")
LIBIP4TC = Path("/usr/lib/x86_64-linux-gnu/libip4tc.so.2")


def _hidden_prolog(node: Node, job: int, mounts: list[str]) -> subprocess.CompletedProcess[str]:
    """The real prolog, inside the sandbox node, with ``mounts`` (shell commands) applied in a
    private mount namespace first. The node's namespace is opened before the mounts."""
    script = (f"exec 3</run/netns/{shlex.quote(node.topo.node)} && "
              + "".join(f"{m} && " for m in mounts)
              + f"exec /usr/bin/nsenter --net=/proc/self/fd/3 {shlex.quote(str(ROOT / 'prolog'))}")
    return subprocess.run(["/usr/bin/unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script],
                          env=node.env(job), capture_output=True, text=True, timeout=60, cwd="/")


def _nothing_made(node: Node, job: int) -> None:
    assert not os.path.lexists(node.netns_path(job))
    assert f"na{job}" not in in_ns(node.topo.node, "ip", "-o", "link").stdout
    if node.db.exists():
        with sqlite3.connect(node.db) as db:
            assert db.execute("SELECT COUNT(*) FROM leases WHERE job_id = ?", (job,)).fetchone() == (0,)
            assert db.execute("SELECT COUNT(*) FROM jobs WHERE job_id = ? AND state = 'running'",
                              (job,)).fetchone() == (0,)
    assert project_leftovers(node.topo) == []


def _one_line(r: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_a_full_pool_refuses_the_next_job_and_makes_nothing(topo: Topology, tmp_path: Path) -> None:
    node = Node(topo, tmp_path, "nftables", pool={"ipv4": "100.64.0.0/30"})  # room for one job
    try:
        node.prolog(7001)
        r = node.hook("prolog", 7002)
        _one_line(r, 6, "7002", "pool")
        assert not os.path.lexists(node.netns_path(7002))
        with sqlite3.connect(node.db) as db:
            assert db.execute("SELECT COUNT(*) FROM leases WHERE job_id = 7002").fetchone() == (0,)
        node.epilog(7001)
        node.prolog(7002)  # the address is free again
        node.epilog(7002)
    finally:
        node.cleanup()
    assert project_leftovers(topo) == []


def test_nft_missing_is_one_line_and_nothing_is_made(topo: Topology, tmp_path: Path) -> None:
    node = Node(topo, tmp_path, "nftables")
    # Neither the library nor the command: an empty file is no ELF, /dev/null is not executable.
    r = _hidden_prolog(node, 7003, [f"mount --bind /dev/null {LIBNFTABLES.resolve()}",
                                    "mount --bind /dev/null /usr/sbin/nft"])
    _one_line(r, 7, "7003", "nft")
    _nothing_made(node, 7003)


def test_iptables_missing_is_one_line_and_nothing_is_made(topo: Topology, tmp_path: Path) -> None:
    node = Node(topo, tmp_path, "iptables")
    r = _hidden_prolog(node, 7004, [f"mount --bind /dev/null {LIBIP4TC.resolve()}"])
    _one_line(r, 7, "7004", "iptables")
    _nothing_made(node, 7004)


@pytest.mark.parametrize("what", ["state", "netns_dir"])
def test_run_not_writable_is_one_line_and_nothing_is_made(topo: Topology, tmp_path: Path, what: str) -> None:
    """/run/slurm-netacct (locks, marks) or the namespace directory read-only."""
    node = Node(topo, tmp_path, "nftables")
    target = "/run/slurm-netacct" if what == "state" else str(node.cfg.netns_dir)
    os.makedirs(target, exist_ok=True)
    r = _hidden_prolog(node, 7005, [f"mount -o bind,ro {target} {target}"])
    _one_line(r, 7, "7005")
    assert "Read-only file system" in r.stderr or "read-only" in r.stderr.lower(), r.stderr
    _nothing_made(node, 7005)

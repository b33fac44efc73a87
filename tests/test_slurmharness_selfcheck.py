"""Self-check of tests/slurmharness.py: real SLURM clusters in throwaway network namespaces.

Needs root and the Debian slurm-wlm/munge packages (scripts/bootstrap installs them). Everything it makes
(namespaces slh-<pid>-*, the bridge and veths inside them, daemons) is removed at the end.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from slurmharness import BridgeLab, SlurmCluster, ensure_user, make_workdir, netns_path

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", autouse=True)
def _slurm_installed() -> None:
    """Fails (never skips): scripts/bootstrap installs SLURM and munge, and the suite runs as root."""
    if os.geteuid() != 0 or not all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch")):
        pytest.fail("needs root and slurm-wlm + munge (scripts/bootstrap installs them)", pytrace=False)

USER = "netacct-test"

HOOK = """#!/bin/sh
# Record what a prolog/epilog sees; fail on purpose while $DIR/fail-prolog exists.
DIR={dir}
out="$DIR/$SLURM_SCRIPT_CONTEXT-$SLURM_JOB_ID-$SLURMD_NODENAME"
env > "$out.env"
echo "uid=$(/usr/bin/id -u) cwd=$(pwd) net=$(/usr/bin/readlink /proc/self/ns/net) host=$(/usr/bin/hostname)" > "$out.facts"
if [ "$SLURM_SCRIPT_CONTEXT" = epilog_slurmd ]; then
    /usr/bin/sleep 1
    /usr/bin/touch "$out.done"
fi
if [ "$SLURM_SCRIPT_CONTEXT" = prolog_slurmd ] && [ -e "$DIR/fail-prolog" ]; then
    exit 1
fi
exit 0
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[BridgeLab]:
    prefix = f"slh-{os.getpid()}"
    with BridgeLab(prefix, ("n1", "n2")) as lab:
        yield lab
    left = [ns for ns in os.listdir("/run/netns") if ns.startswith(prefix + "-")] if os.path.isdir("/run/netns") else []
    assert left == [], f"namespaces left behind: {left}"


@pytest.fixture
def make_cluster(lab: BridgeLab) -> Iterator[Callable[..., SlurmCluster]]:
    """Factory: a started cluster on the lab's nodes; stopped (logs printed) at teardown."""
    clusters: list[SlurmCluster] = []

    def make(nodes: tuple[str, ...] = ("n1",), cpus: int = 4, **kw: object) -> SlurmCluster:
        c = SlurmCluster(make_workdir("selfcheck"), lab.ctl_netns, lab.ctl_addr, lab.node_specs(cpus, nodes), **kw)
        clusters.append(c)
        c.start()
        return c

    yield make
    for c in clusters:
        c.stop()
        print(c.dump_logs(40))  # shown by pytest only when the test failed
        shutil.rmtree(c.workdir, ignore_errors=True)


@pytest.fixture
def hookdir() -> Iterator[Path]:
    d = make_workdir("hooks")
    (d / "hook").write_text(HOOK.format(dir=d))
    (d / "hook").chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


JOB = "#!/bin/sh\nsrun hostname\nscontrol show job $SLURM_JOB_ID\n"


def test_one_node_jobs_as_root_and_user(make_cluster: Callable[..., SlurmCluster]) -> None:
    c = make_cluster(("n1",))
    assert c.node_state("n1") == "IDLE"

    job = c.sbatch(JOB)
    assert c.wait_job(job) == "COMPLETED"
    out = (c.job_dir() / f"slurm-{job}.out").read_text()
    assert out.splitlines()[0] == "n1"
    assert f"JobId={job} " in out and "UserId=root(0)" in out and "JobState=RUNNING" in out

    uid, gid = ensure_user(USER)
    job = c.sbatch(JOB + "id -u\n", user=USER)
    assert c.wait_job(job) == "COMPLETED"
    out_file = c.job_dir(USER) / f"slurm-{job}.out"
    assert out_file.stat().st_uid == uid
    out = out_file.read_text()
    assert out.splitlines()[0] == "n1"
    assert f"UserId={USER}({uid})" in out and out.splitlines()[-1] == str(uid)
    rec = [r for r in c.jobcomp_records() if r["JobId"] == str(job)][0]
    assert rec["UserId"] == f"{USER}({uid})" and rec["NodeList"] == "n1"


def test_failed_job_state(make_cluster: Callable[..., SlurmCluster]) -> None:
    c = make_cluster(("n1",))
    assert c.wait_job(c.sbatch("#!/bin/sh\nexit 3\n")) == "FAILED"


def test_two_nodes_srun_and_array(make_cluster: Callable[..., SlurmCluster]) -> None:
    c = make_cluster(("n1", "n2"), cpus=16)
    job = c.sbatch("#!/bin/sh\nsrun -N2 hostname | sort\n", "-N2")
    assert c.wait_job(job) == "COMPLETED"
    assert (c.job_dir() / f"slurm-{job}.out").read_text().split() == ["n1", "n2"]

    # 20 tasks of 1 CPU on 2 x 16 CPUs: all must be running at the same time.
    script = "#!/bin/sh\necho $(hostname) $(date +%s.%N) > start-$SLURM_ARRAY_TASK_ID\nsleep 3\n"
    job = c.sbatch(script, "--array=0-19", "-o", "/dev/null")
    deadline = time.monotonic() + 30
    running: list[str] = []
    while time.monotonic() < deadline and len(running) < 20:
        running = c.run("squeue", "-h", "-t", "R", "-j", str(job), "-o", "%i").stdout.split()
        time.sleep(0.1)
    assert len(running) == 20, running
    assert c.wait_array(job) == {i: "COMPLETED" for i in range(20)}
    starts = [(c.job_dir() / f"start-{i}").read_text().split() for i in range(20)]
    assert {host for host, _ in starts} == {"n1", "n2"}
    stamps = [float(t) for _, t in starts]
    assert max(stamps) - min(stamps) < 2.0


def test_prolog_and_epilog_environment(
    lab: BridgeLab, make_cluster: Callable[..., SlurmCluster], hookdir: Path
) -> None:
    hook = str(hookdir / "hook")
    c = make_cluster(
        ("n1", "n2"), prolog=hook, epilog=hook, extra_env={"NETACCT_CONFIG": "/etc/netacct/test.toml"}
    )
    uid, gid = ensure_user(USER)
    job = c.sbatch("#!/bin/sh\nsrun -N2 true\n", "-N2", user=USER)
    assert c.wait_job(job) == "COMPLETED"
    for node in ("n1", "n2"):
        # wait_job returned only after every epilog finished.
        assert (hookdir / f"epilog_slurmd-{job}-{node}.done").exists()
        env = read_env(hookdir / f"prolog_slurmd-{job}-{node}.env")
        assert "PATH" not in env  # slurmd gives hooks no PATH
        assert env["NETACCT_CONFIG"] == "/etc/netacct/test.toml"  # via the harness's wrapper
        assert env["SLURM_JOB_ID"] == str(job)
        assert env["SLURMD_NODENAME"] == node
        assert env["SLURM_JOB_USER"] == USER and env["SLURM_JOB_UID"] == str(uid)
        assert env["SLURM_JOB_GID"] == str(gid)
        assert env["SLURM_NODELIST"] == "n[1-2]" and env["SLURM_JOB_NUM_NODES"] == "2"
        assert env["SLURM_JOB_WORK_DIR"] == str(c.job_dir(USER))
        assert env["SLURM_CONF"] == str(c.conf_path)
        facts = (hookdir / f"prolog_slurmd-{job}-{node}.facts").read_text().split()
        ns_inode = os.stat(netns_path(lab.node_netns(node))).st_ino
        assert facts == ["uid=0", f"cwd={c.log_dir}", f"net=net:[{ns_inode}]", f"host={node}"]
        epi = read_env(hookdir / f"epilog_slurmd-{job}-{node}.env")
        assert epi["SLURM_JOB_EXIT_CODE"] == "0" and epi["NETACCT_CONFIG"] == "/etc/netacct/test.toml"


def test_failing_prolog_drains_and_resume(make_cluster: Callable[..., SlurmCluster], hookdir: Path) -> None:
    c = make_cluster(("n1",), prolog=str(hookdir / "hook"))
    (hookdir / "fail-prolog").touch()
    job = c.sbatch("#!/bin/sh\ntrue\n")
    state = c.wait_node_state("n1", lambda s: "DRAIN" in s)
    assert state.startswith("IDLE+DRAIN") or "DRAIN" in state
    assert "Prolog" in c.node_reason("n1")
    c.cancel(job)
    (hookdir / "fail-prolog").unlink()
    c.resume("n1")
    assert c.wait_node_state("n1", lambda s: s == "IDLE") == "IDLE"
    assert c.wait_job(c.sbatch("#!/bin/sh\ntrue\n")) == "COMPLETED"


def test_stop_kills_running_jobs_and_is_idempotent(lab: BridgeLab) -> None:
    c = SlurmCluster(make_workdir("selfcheck"), lab.ctl_netns, lab.ctl_addr, lab.node_specs(4, ("n1", "n2")))
    with c:
        c.start()
        job = c.sbatch("#!/bin/sh\nsrun -N2 sleep 300\n", "-N2", user=USER)
        deadline = time.monotonic() + 30
        while list(c.processes().values()).count("sleep") < 2:  # one task per node
            assert time.monotonic() < deadline, (c.job_states(job), c.processes())
            time.sleep(0.1)
        job_pids = c.processes()
        assert "slurmstepd" in job_pids.values()
        daemon_pids = list(c.pids.values())
    assert c.pids == {}
    assert [p for p in [*job_pids, *daemon_pids] if os.path.exists(f"/proc/{p}") and not _zombie(p)] == []
    c.stop()  # a second stop is a no-op
    shutil.rmtree(c.workdir, ignore_errors=True)

"""The cgroup engine on real cgroups of the tests' own, in the sandbox node's network namespace:
its two ways of finding the job's cgroup (its own per job; SLURM's cgroup/v2 job_<id>, on the
exact directory layout SLURM makes, attached by the SPANK plugin's code), what the job's user
can do against it (nothing), crashes at every step, and the C side's paths.

The accuracy cases (every one of the namespace engine's, against the wire) are in
test_accuracy.py; real SLURM with this engine in test_slurm_cgroup.py.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CG_ROOT, ROOT, TAG, Node, project_leftovers
from slurm_netacct import config, naming
from slurm_netacct.counting import cgroup as cgc
from slurm_netacct.kernel import bpf
from slurm_netacct.kernel import cgroup as cg
from slurm_netacct.kernel.bpfasm import R0, Asm
from topology import LAN4, PORT, WAN4, WAN6

SPANK = ROOT / "spank"
TRAFFIC = str(ROOT / "tests" / "traffic.py")
NOBODY = 65534
ATTACH_CGROUP_DEVICE, PROG_CGROUP_DEVICE, BPF_F_ALLOW_OVERRIDE = 6, 15, 1


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    subprocess.run(["make", "-s", "-C", str(SPANK)], check=True)


def in_cgroup(ns: str, where: Path, *argv: str, user: int | None = None,
              check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run argv in the sandbox node's network namespace, moved into cgroup `where` first (as
    slurmstepd places a task), as root or as `user`."""
    drop = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user is not None else []
    r = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "sh", "-c",
                        'echo $$ > "$0/cgroup.procs" && exec "$@"', str(where), *drop, *argv],
                       capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, f"{argv} in {where}: {r.stderr}"
    return r


def _traffic(node: Node, job: int) -> dict[str, dict[str, int]]:
    [rec] = node.report("-j", str(job))
    return rec["traffic"]


def _pair(t: dict[str, int], direction: str) -> tuple[int, int]:
    return t[f"{direction}_packets"], t[f"{direction}_bytes"]


# --------------------------------------------------------------------------- the C side's paths

@pytest.mark.parametrize("prefix", ["netacct-", "acct.%h-", "x"])
def test_c_and_python_agree_on_the_cgroup_engines_paths(prefix: str) -> None:
    cfg = config.parse({"engine": "cgroup", "netns_prefix": prefix, "bpffs": "/b/fs",
                        "cgroup": {"mode": "own", "root": "/sys/fs/cgroup/unified/r"}})
    name = naming.JobNames.of(cfg, 4242).netns
    r = subprocess.run([str(SPANK / "netacct-nspath"), "engine=cgroup", f"prefix={prefix}", "bpffs=/b/fs/",
                        "cgroup_root=/sys/fs/cgroup/unified/r", "4242"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(naming.job_cgroup(cgc.root(cfg), name)),
                                     str(naming.bpf_prog_pin(cfg.bpffs, name, "out")),
                                     str(naming.bpf_prog_pin(cfg.bpffs, name, "in"))]


def test_c_and_python_find_the_same_default_cgroup_root() -> None:
    cfg = config.parse({"engine": "cgroup"})
    r = subprocess.run([str(SPANK / "netacct-nspath"), "engine=cgroup", "7"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == f"{cgc.root(cfg)}/netacct-7"
    # This machine: SLURM on cgroup v1, the unified hierarchy beside it: mode auto is "own".
    assert cgc.root(cfg) == Path("/sys/fs/cgroup/unified/slurm-netacct") and cgc.mode(cfg) == "own"


@pytest.mark.parametrize("arg", ["engine=cgroups", "cgroup=v2", "cgroup_root=relative", "bpffs=/a/../b",
                                 "engine=cgroup engine=cgroup", "cgroup_dir=/x"])
def test_the_plugin_refuses_bad_cgroup_arguments(arg: str) -> None:
    r = subprocess.run([str(SPANK / "netacct-nspath"), *arg.split(), "7"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr


# --------------------------------------------------------------------------- mode "own"

def test_own_cgroup_is_made_attached_and_removed(cg_node: Node) -> None:
    job = 3001
    cg_node.prolog(job)
    name = naming.netns_name(cg_node.cfg.netns_prefix, job)
    where = CG_ROOT / name
    ids = cg.attached(where)
    names = {d: bpf.prog_info(fd).name for d, fd in _opened(ids).items()}
    assert names == {"out": f"na{job}_o", "in": f"na{job}_i"}
    assert stat_mode(cg_node.pin(job)) == 0o600
    assert not os.path.exists(f"/run/netns/{name}")  # no namespace, no link, no address
    cg_node.traffic(job, "udp-up", WAN4, str(PORT), "50", "700")
    cg_node.topo.wait_quiet()
    wire = cg_node.topo.server_counts("wan")
    cg_node.epilog(job)
    assert _pair(_traffic(cg_node, job)["wan"], "out") == wire["rx"] == (50, 50 * 728)
    assert not where.exists() and not cg_node.pin(job).exists()
    assert not naming.bpf_prog_pin(cg_node.cfg.bpffs, name, "out").exists()
    with sqlite3.connect(cg_node.db) as conn:
        assert conn.execute("SELECT backend, ipv4, state FROM jobs WHERE job_id = ?", (job,)).fetchone() == \
            ("cgroup", None, "completed")


def _opened(ids: dict[str, tuple[int, ...]]) -> dict[str, int]:
    assert all(len(v) == 1 for v in ids.values()), ids
    return {d: bpf.prog_fd_by_id(v[0]) for d, v in ids.items()}


def stat_mode(p: Path) -> int:
    return os.stat(p).st_mode & 0o777


def test_the_jobs_user_cannot_escape_or_tamper_and_is_still_counted(cg_node: Node) -> None:
    """As the job's user (no capabilities) inside the job's cgroup: every attempt refused; then
    traffic from a user namespace of its own (root there) is counted exactly, both families."""
    job = 3002
    cg_node.prolog(job)
    name = naming.netns_name(cg_node.cfg.netns_prefix, job)
    where = CG_ROOT / name
    pins = cg_node.cfg.bpffs / naming.BPF_PIN_DIR
    os.chmod(cg_node.cfg.bpffs, 0o755)  # let the user reach the pins' directory: it must still fail
    try:
        r = in_cgroup(cg_node.topo.node, where, sys.executable, str(ROOT / "tests" / "cgtamper.py"), str(where),
                      str(pins), name, user=NOBODY)
    finally:
        os.chmod(cg_node.cfg.bpffs, 0o700)
    lines = r.stdout.splitlines()
    # Where unprivileged BPF is on, a user may load a cgroup_skb program (not attach it).
    unpriv = Path("/proc/sys/kernel/unprivileged_bpf_disabled").read_text().strip() == "0"
    lines = [line for line in lines if not (unpriv and line.startswith("bpf PROG_LOAD"))]
    assert len(lines) == 21 - unpriv and all(line.endswith(": refused") for line in lines), r.stdout + r.stderr
    assert cg.attached(where)["out"] and cg.attached(where)["in"]
    for host in (WAN4, WAN6):
        in_cgroup(cg_node.topo.node, where, "unshare", "-U", "-r", sys.executable, TRAFFIC, "udp-up", host,
                  str(PORT), "40", "500", user=NOBODY)
    cg_node.topo.wait_quiet()
    wire = cg_node.topo.server_counts("wan")
    cg_node.epilog(job)
    assert _pair(_traffic(cg_node, job)["wan"], "out") == wire["rx"] == (80, 40 * 528 + 40 * 548)


def test_processes_left_in_its_cgroup_keep_the_epilog_from_removing_it(cg_node: Node) -> None:
    """A process that outlived its job (SLURM kills them first) keeps the cgroup: the counters
    are stored all the same, the epilog fails (teardown_failure = "drain") and names the
    process; once it is gone the reaper removes the rest."""
    job = 3003
    cg_node.prolog(job)
    where = CG_ROOT / naming.netns_name(cg_node.cfg.netns_prefix, job)
    sleeper = subprocess.Popen(["sh", "-c", f'echo $$ > "{where}/cgroup.procs" && exec sleep 60'])
    try:
        r = cg_node.hook("epilog", job)
        assert r.returncode == 0, r.stderr  # stored; _let_go logs what it could not remove
        log = cg_node.log.read_text()
        assert f"cannot remove cgroup {where}" in log and str(sleeper.pid) in log
        assert where.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()
    with sqlite3.connect(cg_node.db) as conn:
        assert conn.execute("SELECT state FROM jobs WHERE job_id = ?", (job,)).fetchone() == ("completed",)
    env = dict(os.environ, NETACCT_CONFIG=str(cg_node.config_path), SLURMD_NODENAME="n1")
    r2 = subprocess.run([str(Path(sys.executable).parent / "netacct-reconcile"), "--active", ""],
                        capture_output=True, text=True, env=env, timeout=60)
    assert r2.returncode == 0, r2.stderr
    assert f"job {job}: cgroup {where}" in r2.stdout
    assert not where.exists()
    cg_node.started.discard(job)


@pytest.mark.parametrize("step", ["rules"])
def test_a_prolog_killed_midway_is_recovered_by_the_next_prolog_or_the_reaper(cg_node: Node, step: str) -> None:
    env = dict(os.environ, NETACCT_CONFIG=str(cg_node.config_path), SLURMD_NODENAME="n1")
    for job, recover in ((3010, "prolog"), (3011, "reconcile")):
        r = cg_node.hook("prolog", job, NETACCT_FAILPOINT=f"kill:{step}")
        assert r.returncode in (-9, 137), (r.returncode, r.stderr)
        if recover == "prolog":
            cg_node.prolog(job)
            cg_node.traffic(job, "udp-up", LAN4, str(PORT), "10", "100")
            cg_node.epilog(job)
            assert _pair(_traffic(cg_node, job)["lan"], "out") == (10, 10 * 128)
        else:
            r = subprocess.run([str(Path(sys.executable).parent / "netacct-reconcile"), "--active", ""],
                               capture_output=True, text=True, env=env, timeout=60)
            assert r.returncode == 0, r.stderr
            assert f"job {job}:" in r.stdout
            cg_node.started.discard(job)
    assert project_leftovers(cg_node.topo) == []


@pytest.mark.parametrize("step", ["down", "stored", "removed"])
def test_an_epilog_killed_at_every_step_loses_no_counted_traffic(cg_node: Node, step: str) -> None:
    job = 3020
    cg_node.prolog(job)
    cg_node.traffic(job, "udp-up", WAN4, str(PORT), "30", "900")
    cg_node.topo.wait_quiet()
    wire = cg_node.topo.server_counts("wan")
    r = cg_node.hook("epilog", job, NETACCT_FAILPOINT=f"kill:{step}")
    assert r.returncode in (-9, 137)
    cg_node.epilog(job)
    assert _pair(_traffic(cg_node, job)["wan"], "out") == wire["rx"] == (30, 30 * 928)
    assert project_leftovers(cg_node.topo) == []


def test_the_reaper_stores_a_job_whose_epilog_never_ran(cg_node: Node) -> None:
    job = 3030
    cg_node.prolog(job)
    cg_node.traffic(job, "tcp-up", WAN4, str(PORT), "300000")
    cg_node.topo.wait_quiet()
    wire = cg_node.topo.server_counts("wan")
    env = dict(os.environ, NETACCT_CONFIG=str(cg_node.config_path), SLURMD_NODENAME="n1")
    r = subprocess.run([str(Path(sys.executable).parent / "netacct-reconcile"), "--active", ""],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip().endswith("-> reconciled"), r.stdout
    cg_node.started.discard(job)
    [rec] = cg_node.report("-j", str(job))
    assert rec["state"] == "reconciled"
    assert (_pair(rec["traffic"]["wan"], "out"), _pair(rec["traffic"]["wan"], "in")) == (wire["rx"], wire["tx"])
    assert project_leftovers(cg_node.topo) == []


def test_sample_and_exporter_read_the_cgroup_engines_counters(cg_node: Node, tmp_path: Path) -> None:
    """netacct-sample and netacct-exporter read a running cgroup job's pinned counters like the
    namespace engine's: the sample is what the wire carried; a job whose counters are gone is
    an error, not "ending"."""
    job = 3050
    cg_node.prolog(job)
    cg_node.traffic(job, "udp-up", WAN4, str(PORT), "25", "600")
    cg_node.topo.wait_quiet()
    wire = cg_node.topo.server_counts("wan")
    env = dict(os.environ, NETACCT_CONFIG=str(cg_node.config_path), SLURMD_NODENAME="n1")
    bin_ = Path(sys.executable).parent
    r = subprocess.run([str(bin_ / "netacct-sample")], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    with sqlite3.connect(cg_node.db) as conn:
        assert conn.execute("SELECT out_packets, out_bytes FROM traffic WHERE job_id = ? AND class = 'wan'",
                            (job,)).fetchone() == wire["rx"] == (25, 25 * 628)
    prom = tmp_path / "netacct.prom"
    r = subprocess.run([str(bin_ / "netacct-exporter"), "--textfile", str(prom)], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (f'netacct_job_bytes_total{{account="physics",class="wan",direction="out",job_id="{job}",node="n1",'
            f'user="alice"}} {25 * 628}.0') in prom.read_text()
    cg_node.pin(job).unlink()  # an administrator's mistake
    r = subprocess.run([str(bin_ / "netacct-sample")], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0 and f"job {job}" in r.stderr, (r.returncode, r.stderr)
    cg_node.epilog(job)


def _wan_run(node: Node, job: int, restart: int) -> tuple[int, int, int, int]:
    with sqlite3.connect(node.db) as conn:
        return conn.execute("SELECT in_packets, in_bytes, out_packets, out_bytes FROM traffic WHERE job_id = ? "
                            "AND restart = ? AND class = 'wan'", (job, restart)).fetchone()


def _upload(node: Node, job: int, count: int) -> tuple[int, int, int, int]:
    """count 500-byte datagrams to the WAN server; what the wire carried (in, then out)."""
    node.traffic(job, "udp-up", WAN4, str(PORT), str(count), "500")
    node.topo.wait_quiet()
    wire = node.topo.server_counts("wan")
    return (*wire["tx"], *wire["rx"])


def test_a_requeued_run_stores_the_counters_its_predecessor_left(cg_node: Node) -> None:
    """The run whose epilog never ran left its pinned counters: the requeued run's prolog
    stores them (`reconciled`) before it makes its own."""
    job = 3060
    cg_node.prolog(job)
    first = _upload(cg_node, job, 30)
    cg_node.prolog(job, SLURM_JOB_RESTART_COUNT="1")
    second = _upload(cg_node, job, 20)
    cg_node.epilog(job, SLURM_JOB_RESTART_COUNT="1")
    with sqlite3.connect(cg_node.db) as conn:
        assert conn.execute("SELECT restart, state FROM jobs WHERE job_id = ? ORDER BY restart", (job,)).fetchall() \
            == [(0, "reconciled"), (1, "completed")]
    assert (_wan_run(cg_node, job, 0), _wan_run(cg_node, job, 1)) == (first, second) and first[2:] == (30, 30 * 528)
    cg_node.started.discard(job)


def test_a_node_reboot_mid_job_loses_only_the_traffic_since_the_last_sample(cg_node: Node) -> None:
    """A reboot takes the pins (the bpf filesystem is memory) and the cgroups: the reaper
    records the run `lost` with exactly its last sample."""
    job = 3070
    cg_node.prolog(job)
    sampled = _upload(cg_node, job, 40)
    env = dict(os.environ, NETACCT_CONFIG=str(cg_node.config_path), SLURMD_NODENAME="n1")
    bin_ = Path(sys.executable).parent
    assert subprocess.run([str(bin_ / "netacct-sample")], env=env, timeout=60).returncode == 0
    _upload(cg_node, job, 10)  # after the last sample: lost
    name = naming.netns_name(cg_node.cfg.netns_prefix, job)
    for pin in (cg_node.pin(job), naming.bpf_prog_pin(cg_node.cfg.bpffs, name, "out"),
                naming.bpf_prog_pin(cg_node.cfg.bpffs, name, "in")):
        pin.unlink()
    (CG_ROOT / name).rmdir()  # the reboot
    r = subprocess.run([str(bin_ / "netacct-reconcile"), "--active", ""], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"job {job}: running row (run 0) -> reconciled (counters lost)\n"
    [rec] = cg_node.report("-j", str(job))
    assert rec["state"] == "lost" and _wan_run(cg_node, job, 0) == sampled
    cg_node.started.discard(job)


def test_a_daemon_restart_between_prolog_and_epilog_loses_nothing(topo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node = Node(topo, tmp_path, "cgroup", daemon=True)
    topo.reset_servers()
    try:
        job = 3080
        node.prolog(job)
        sent = _upload(node, job, 15)
        node.stop_daemon()
        node.start_daemon()
        node.epilog(job)
        assert _wan_run(node, job, 0) == sent and sent[2:] == (15, 15 * 528)
        assert any(" netacct-daemon[" in line and "cgroup engine" in line for line in node.log.read_text().splitlines())
    finally:
        node.cleanup()
    assert project_leftovers(topo) == []


def test_remove_node_removes_the_engines_own_cgroup_once_no_job_is_left(cg_node: Node) -> None:
    """The uninstall path: nothing while a job has something here; then only the engine's own
    (empty) cgroup subtree, no NAT or forwarding (the cgroup engine changed none)."""
    env = dict(os.environ, NETACCT_CONFIG=str(cg_node.config_path), SLURMD_NODENAME="n1")
    argv = [str(Path(sys.executable).parent / "netacct-reconcile"), "--remove-node"]
    job = 3040
    cg_node.prolog(job)
    r = subprocess.run([*argv, "--active", str(job)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 7 and "nothing removed" in r.stderr and CG_ROOT.is_dir()
    cg_node.epilog(job)
    r = subprocess.run([*argv, "--active", ""], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"node n1: removed cgroup {CG_ROOT}"] and not CG_ROOT.exists()
    r = subprocess.run([*argv, "--active", ""], capture_output=True, text=True, env=env, timeout=60)
    assert (r.returncode, r.stdout) == (0, ""), r.stderr


# --------------------------------------------------------------------------- mode "slurm"

@pytest.fixture
def slurm_scope() -> Iterator[Path]:
    """SLURM's cgroup/v2 stepd scope, as Debian's SLURM 22.05 and 24.11 make it
    (<mount>/system.slice/<node>_slurmstepd.scope: built for several slurmd a host; seen in the
    VM tests, tests/test_vm.py, which run the real thing), under a subtree of the tests' own in
    the unified hierarchy."""
    base = Path("/sys/fs/cgroup/unified") / f"{TAG}slurm"
    scope = base / "system.slice" / "n1_slurmstepd.scope"
    scope.mkdir(parents=True)
    try:
        yield scope
    finally:
        cg.remove_tree(base)


def _device_program() -> int:
    """A cgroup device program that allows everything: SLURM's (Slurm_Cgroup_v2) stand-in."""
    a = Asm()
    a.mov64_imm(R0, 1)
    a.exit()
    return bpf.prog_load(PROG_CGROUP_DEVICE, a.assemble(), "Slurm_Cgroup_v2", "GPL")


def test_slurm_job_cgroup_on_slurms_own_layout(topo, tmp_path: Path, slurm_scope: Path) -> None:  # type: ignore[no-untyped-def]
    """Mode "slurm" (SLURM's cgroup/v2 cannot run on this cgroup v1 host; its directory layout
    can): the prolog only pins; the SPANK plugin's attach, run from a stepd's place
    (job_<id>/step_*/slurm), puts the programs on job_<id> next to SLURM's device program;
    the batch script's task and an adopted ssh session (step_extern/user/task_special) are
    counted exactly; SLURM's removal of job_<id> is not hindered; the epilog stores and unpins."""
    node = Node(topo, tmp_path, "cgroup", cgroup={"mode": "slurm"})
    topo.reset_servers()
    job, other = 3101, 3102
    job_dir = slurm_scope / f"job_{job}"
    dirs = [job_dir / s for s in ("step_extern/slurm", "step_extern/user/task_special", "step_batch/slurm",
                                  "step_batch/user/task_0")] + [slurm_scope / f"job_{other}" / "step_0" / "slurm"]
    try:
        node.prolog(job)
        assert not (CG_ROOT / naming.netns_name(node.cfg.netns_prefix, job)).exists()
        for d in dirs:
            d.mkdir(parents=True)
        dev = _device_program()
        fd = cg.open_dir(job_dir)
        bpf.prog_attach(fd, dev, ATTACH_CGROUP_DEVICE, BPF_F_ALLOW_OVERRIDE)  # as SLURM does
        attach = [str(SPANK / "netacct-cgattach"), "engine=cgroup", "cgroup=slurm", f"prefix={node.cfg.netns_prefix}",
                  f"bpffs={node.cfg.bpffs}"]
        # The extern stepd attaches first; the batch stepd finds them attached (EEXIST): fine.
        for stepd in ("step_extern", "step_batch"):
            r = in_cgroup(topo.node, job_dir / stepd / "slurm", *attach, str(job))
            assert r.stdout.strip() == str(job_dir)
        # A stepd of another job cannot put this job's programs on its own job's cgroup.
        r = in_cgroup(topo.node, slurm_scope / f"job_{other}" / "step_0" / "slurm", *attach, str(job), check=False)
        assert r.returncode == 1 and f"is job_{other}'s" in r.stderr
        # A job whose programs are not pinned (yet: RunInJob's extern step starts before the
        # prolog, and the plugin lets that one step go on): told apart from other failures.
        r = in_cgroup(topo.node, slurm_scope / f"job_{other}" / "step_0" / "slurm", *attach, str(other), check=False)
        assert r.returncode == 3 and "did the netacct prolog run?" in r.stderr, r.stderr
        assert [len(v) for v in cg.attached(job_dir).values()] == [1, 1]
        assert bpf.prog_query(fd, ATTACH_CGROUP_DEVICE)[1] == (bpf.prog_info(dev).id,)
        os.close(dev)
        os.close(fd)
        in_cgroup(topo.node, job_dir / "step_batch/user/task_0", sys.executable, TRAFFIC, "tcp-up", WAN4,
                  str(PORT), "2000000", user=NOBODY)
        in_cgroup(topo.node, job_dir / "step_extern/user/task_special", sys.executable, TRAFFIC, "udp-down", LAN4,
                  str(PORT), "100", "1000", user=NOBODY)
        topo.wait_quiet()
        wan, lan = topo.server_counts("wan"), topo.server_counts("lan")
        # SLURM removes the job's cgroup, leaves first: nothing of ours is in the way.
        cg.remove_tree(job_dir)
        node.epilog(job)
        t = _traffic(node, job)
        assert (_pair(t["wan"], "out"), _pair(t["wan"], "in")) == (wan["rx"], wan["tx"])
        assert (_pair(t["lan"], "out"), _pair(t["lan"], "in")) == (lan["rx"], lan["tx"])
        assert t["lan"]["in_packets"] == 100 + 0 and t["wan"]["out_bytes"] > 2_000_000
        assert project_leftovers(topo) == []
    finally:
        node.cleanup()

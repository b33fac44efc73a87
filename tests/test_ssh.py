"""ssh into a running job: pam_slurm_adopt adopts the session into the job, pam_netacct into
its network namespace, so what the user runs over ssh is counted as the job's traffic.

A real cluster in the sandbox (slurmctld + one slurmd, sshn1) with what pam_slurm_adopt needs:
``PrologFlags=Contain`` (an extern step per job) and ``ProctrackType=proctrack/cgroup``; a real
sshd in the node's network and UTS namespaces, using a PAM service of its own (sshd names its PAM
service after its program name, so it runs through a symlink called ``$SERVICE``), with
``/etc/pam.d/$SERVICE`` written by the test and removed afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, VENV_BIN, need_root
from slurm_netacct.kernel import cgroup
from slurmharness import NodeSpec, SlurmCluster, ensure_user, make_workdir
from topology import CTL4, PORT, WAN4, Topology, in_ns

pytestmark = pytest.mark.e2e

USER = "netacct-test"
TAG = f"nss{os.getpid() % 100000}-"
JOB_PREFIX = f"{TAG}%h-"
SERVICE = f"netacct-test-sshd-{os.getpid()}"
PAM_FILE = Path("/etc/pam.d") / SERVICE
SSH_PORT = 2222
# A node name of its own: SLURM names its cgroups after it (slurm_<node>), and the test removes them.
NODE = "sshn1"
PAM_NETACCT = ROOT / "pam" / "pam_netacct.so"
PRIVSEP_DIR = Path("/run/sshd")
_made: list[Path] = []  # directories outside the work directory that the fixture created


@dataclass
class Lab:
    topo: Topology
    slurm: SlurmCluster
    work: Path
    config: Path
    key: Path

    def pam(self, session: str) -> None:
        """(Re)write the sshd PAM service: pam_slurm_adopt, then ``session`` (read per login)."""
        PAM_FILE.write_text(
            "# written by slurm-netacct tests/test_ssh.py; removed at the end of the test\n"
            "auth     required pam_deny.so\n"   # only public keys get in
            f"account  required pam_slurm_adopt.so nodename={NODE} service={SERVICE} action_adopt_failure=deny\n"
            f"{session}\n")

    def ssh(self, *args: str, user: str = USER, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``ssh ARGS`` to the node as ``user``, from the controller's namespace."""
        return in_ns(self.topo.ctl, "ssh", "-F", "none", "-i", str(self.key), "-p", str(SSH_PORT),
                     "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                     "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10",
                     f"{user}@{self.topo.node_addr(0)}", *args, check=False, input=input)

    def report(self, job: int) -> dict:
        r = subprocess.run([str(VENV_BIN / "netacct-report"), "--json", "--db", str(self.work / f"{NODE}.db"), "-j", str(job)],
                           capture_output=True, text=True, env=dict(os.environ, NETACCT_CONFIG=str(self.config)))
        assert r.returncode == 0, r.stderr
        [rec] = json.loads(r.stdout)
        return rec


def _start_sshd(slurm: SlurmCluster, work: Path, node_addr: str) -> None:
    d = work / "ssh"
    d.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "user_key")], check=True)
    keys = d / "authorized"
    keys.mkdir(mode=0o755)
    shutil.copy(d / "user_key.pub", keys / USER)
    (keys / USER).chmod(0o644)
    (d / "sshd_config").write_text(
        f"Port {SSH_PORT}\nListenAddress {node_addr}\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n"
        f"UsePAM yes\nAuthenticationMethods publickey\nPasswordAuthentication no\n"
        f"KbdInteractiveAuthentication no\nAuthorizedKeysFile {keys}/%u\nStrictModes no\n"
        "PermitRootLogin no\nUseDNS no\nX11Forwarding no\nPrintMotd no\nPrintLastLog no\n"
        "LogLevel VERBOSE\n")
    link = d / SERVICE  # sshd's PAM service name is its program name
    link.symlink_to("/usr/sbin/sshd")
    if not PRIVSEP_DIR.exists():  # sshd's privilege separation directory (systemd makes it)
        PRIVSEP_DIR.mkdir(mode=0o755)
        _made.append(PRIVSEP_DIR)
    # -D: stay in the foreground (the harness keeps its PID and stops it with the cluster).
    slurm._spawn("sshd", NODE, slurm.nodes[0].netns,
                 [str(link), "-D", "-f", str(d / "sshd_config"), "-E", str(slurm.log_dir / "sshd.log")])
    deadline = time.monotonic() + 10
    while "Server listening" not in ((slurm.log_dir / "sshd.log").read_text()
                                     if (slurm.log_dir / "sshd.log").exists() else ""):
        assert time.monotonic() < deadline, "sshd did not start"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    need_root()
    ensure_user(USER)
    for d in ("spank", "pam"):
        subprocess.run(["make", "-s", "-C", str(ROOT / d)], check=True)
    assert not PAM_FILE.exists()
    topo = Topology(f"{TAG}t", nodes=("n1",), controller=True)
    work = make_workdir("netacct-ssh")
    shutil.copy(ROOT / "tests" / "traffic.py", work / "traffic.py")
    config = work / "netacct.toml"
    config.write_text(f'uplink = "up0"\nnetns_prefix = "{JOB_PREFIX}"\n'
                      f'db = "{work}/%n.db"\nlog_file = "{work}/netacct-%n.log"\nspool_dir = "{work}/spool-%n"\n'
                      f'bpffs = "{topo.bpffs}"\n[pool]\nipv4 = "100.64.0.0/16"\n')
    # pam_slurm_adopt needs the job's extern step (Contain) in a cgroup that proctrack manages.
    (work / "cgroup.conf").write_text("CgroupPlugin=autodetect\n")
    topo.up()
    slurm = None
    try:
        nodes = [NodeSpec(NODE, topo.node_ns(0), topo.node_addr(0), cpus=4)]
        slurm = SlurmCluster(work, topo.ctl, CTL4, nodes, prolog=str(ROOT / "prolog"), epilog=str(ROOT / "epilog"),
                             plugstack_lines=[f"required {ROOT}/spank/netacct.so netns_dir=/run/netns prefix={JOB_PREFIX}"],
                             extra_env={"NETACCT_CONFIG": str(config)},
                             slurm_conf_extra="ProctrackType=proctrack/cgroup\nPrologFlags=Alloc,Contain\n")
        slurm.start()
        _start_sshd(slurm, work, topo.node_addr(0))
        yield Lab(topo, slurm, work, config, work / "ssh" / "user_key")
    finally:
        PAM_FILE.unlink(missing_ok=True)
        try:
            if slurm is not None:
                slurm.stop()
            leftovers = [n for n in os.listdir("/run/netns") if n.startswith(TAG) and not n.startswith(f"{TAG}t")]
            leftovers += re.findall(r"^\d+: (na\d+)[@:]", in_ns(topo.node_ns(0), "ip", "-o", "link").stdout, re.M)
        finally:
            topo.down()
            for d in _made:  # our sshd is stopped with the cluster; another test run's may still use it
                if subprocess.run(["pgrep", "-f", "netacct-test-sshd-"], capture_output=True).returncode != 0:
                    d.rmdir()
            _made.clear()
            # proctrack/cgroup's hierarchy for this node (slurmd leaves the top directory).
            for top in Path("/sys/fs/cgroup").glob(f"*/slurm_{NODE}"):
                for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    d.rmdir()
                top.rmdir()
        assert leftovers == [], f"left behind: {leftovers}"
        shutil.rmtree(work, ignore_errors=True)


def _running_job(lab: Lab) -> int:
    """A job of USER on the node that waits until its file ``stop-<id>`` appears."""
    job = lab.slurm.sbatch(f"#!/bin/sh\n#SBATCH -N1 -w {NODE}\nwhile [ ! -e stop-$SLURM_JOB_ID ]; do sleep 0.1; done\n",
                           "-o", "/dev/null", user=USER)
    deadline = time.monotonic() + 60
    while lab.slurm.job_states(job) != ["RUNNING"]:
        assert time.monotonic() < deadline, f"job {job} did not start: {lab.slurm.job_states(job)}"
        time.sleep(0.1)
    # pam_slurm_adopt adopts into the extern step, whose slurmstepd socket follows shortly.
    extern = lab.slurm.state_dir / NODE / f"{NODE}_{job}.4294967292"
    while not extern.exists():
        assert time.monotonic() < deadline, f"no extern step for job {job}"
        time.sleep(0.05)
    return job


def _finish(lab: Lab, job: int) -> None:
    stop = lab.slurm.job_dir(USER) / f"stop-{job}"
    stop.touch()
    state = lab.slurm.wait_job(job, timeout=60)
    stop.unlink()
    assert state == "COMPLETED", state + lab.slurm.dump_logs(40)


def _job_netns(job: int) -> Path:
    return Path("/run/netns") / f"{JOB_PREFIX.replace('%h', NODE)}{job}"


SESSION = f"session  required {PAM_NETACCT} netns_dir=/run/netns prefix={JOB_PREFIX}"


def test_an_ssh_session_into_a_job_is_counted_as_the_job(lab: Lab) -> None:
    lab.pam(SESSION)
    job = _running_job(lab)
    lab.topo.reset_servers()
    r = lab.ssh(f"grep -c /job_{job}/step_extern /proc/self/cgroup; readlink /proc/self/ns/net; "
                f"python3 {lab.work}/traffic.py tcp-up {WAN4} {PORT} 700000")
    assert r.returncode == 0, r.stderr + (lab.slurm.log_dir / "sshd.log").read_text()[-3000:]
    adopted, netns, sent = r.stdout.split()
    assert int(adopted) >= 1  # pam_slurm_adopt put the session into the job's extern step
    assert netns == f"net:[{_job_netns(job).stat().st_ino}]"  # and pam_netacct into the job's namespace
    assert sent == "700000"
    # Port forwarding: sshd's own connection to the target is made in the job's namespace too.
    r = lab.ssh("-W", f"{WAN4}:{PORT}", input="UP\n" + "f" * 300_000)
    assert r.returncode == 0 and r.stdout.strip() == "300000", (r.stdout, r.stderr)
    assert _wan_counted_exactly(lab, job)["rx"][1] > 1_000_000


def _wan_counted_exactly(lab: Lab, job: int) -> dict[str, tuple[int, int]]:
    """End the job; its WAN counts must be exactly what the WAN server saw, both directions
    (nothing else in the job talked to it). What the server saw."""
    lab.topo.wait_quiet()
    wan = lab.topo.server_counts("wan")
    _finish(lab, job)
    rec = lab.report(job)
    assert (rec["traffic"]["wan"]["out_packets"], rec["traffic"]["wan"]["out_bytes"]) == wan["rx"]
    assert (rec["traffic"]["wan"]["in_packets"], rec["traffic"]["wan"]["in_bytes"]) == wan["tx"]
    return wan


def test_without_pam_netacct_the_same_session_escapes(lab: Lab) -> None:
    """The control: adoption alone leaves the session in the node's namespace, uncounted."""
    lab.pam("session  optional pam_permit.so")
    job = _running_job(lab)
    lab.topo.reset_servers()
    r = lab.ssh(f"grep -c /job_{job}/step_extern /proc/self/cgroup; readlink /proc/self/ns/net; "
                f"python3 {lab.work}/traffic.py tcp-up {WAN4} {PORT} 300000")
    assert r.returncode == 0, r.stderr
    adopted, netns, _ = r.stdout.split()
    assert int(adopted) >= 1 and netns != f"net:[{_job_netns(job).stat().st_ino}]"
    lab.topo.wait_quiet()
    wan = lab.topo.server_counts("wan")
    _finish(lab, job)
    assert wan["rx"][1] > 300_000
    assert lab.report(job)["traffic"].get("wan", {}).get("out_bytes", 0) == 0


def _sshd_log_since(lab: Lab, offset: int) -> str:
    return (lab.slurm.log_dir / "sshd.log").read_text()[offset:]


def test_a_job_whose_namespace_cannot_be_entered_refuses_the_session(lab: Lab) -> None:
    """required=yes: no way into the node's namespace — not a shell, not a forwarded port."""
    lab.pam(f"session  required {PAM_NETACCT} netns_dir=/run/netns prefix={TAG}missing-")
    job = _running_job(lab)
    mark = lab.work / f"ran-{job}"
    log_at = len((lab.slurm.log_dir / "sshd.log").read_text())
    try:
        lab.topo.reset_servers()
        r = lab.ssh(f"touch {mark}")
        # sshd does not run a command when pam_open_session failed (exit 254).
        assert r.returncode == 254 and not mark.exists(), (r.returncode, r.stderr)
        r = lab.ssh("-W", f"{WAN4}:{PORT}", input="UP\n" + "f" * 1000)
        assert r.returncode != 0 and r.stdout == "", (r.stdout, r.stderr)
        assert lab.topo.server_counts("wan")["rx"] == (0, 0)
        assert "PAM: pam_open_session(): Cannot make/remove an entry" in _sshd_log_since(lab, log_at)
    finally:
        _finish(lab, job)


def test_no_job_on_the_node_no_login(lab: Lab) -> None:
    lab.pam(SESSION)
    log_at = len((lab.slurm.log_dir / "sshd.log").read_text())
    r = lab.ssh("echo logged-in")
    assert r.returncode == 255 and "logged-in" not in r.stdout
    assert f"Access denied for user {USER} by PAM account configuration" in _sshd_log_since(lab, log_at)


@pytest.mark.parametrize("lines, uid, expect", [
    (["6:freezer:/slurm_n1/uid_1001/job_42/step_extern", "0::/"], 1001, "42"),          # cgroup v1
    (["0::/system.slice/slurmstepd.scope/job_7/step_extern/user/task_special"], 5, "7"),  # cgroup v2
    # What SLURM 22.05 and 24.11 (Debian's, multiple-slurmd builds) made under systemd in the VM
    # tests (tests/test_vm.py): the scope carries the node name.
    (["0::/system.slice/n1_slurmstepd.scope/job_1/step_extern/user/task_special"], 5, "1"),
    (["0::/system.slice/n1_slurmstepd.scope/job_12/step_0/user/task_0"], 5, "12"),
    (["6:freezer:/slurm/uid_1001/job_42/step_extern", "4:memory:/slurm/uid_1001/job_42/step_extern"], 1001, "42"),
    (["6:freezer:/", "0::/user.slice"], 1001, "0"),                                     # in no job
    (["6:freezer:/slurm/uid_1001/job_042/step_extern"], 1001, "0"),                    # not a job id
    (["6:freezer:/slurm/uid_1001/job_4294967294/step_extern"], 1001, "0"),             # NO_VAL
    (["6:freezer:/slurm/uid_1001/job_x/step_extern"], 1001, "0"),
    (["6:freezer:/slurm/uid_1001/job_42/step_extern"], 1002, "another user's"),
    (["6:freezer:/slurm/uid_1/job_1/x", "4:memory:/slurm/uid_1/job_2/x"], 1, "two jobs, 1 and 2"),
])
def test_the_module_finds_the_job_in_the_cgroup_path(tmp_path: Path, lines: list[str], uid: int, expect: str) -> None:
    subprocess.run(["make", "-s", "-C", str(ROOT / "pam"), "netacct-cgjob"], check=True)
    f = tmp_path / "cgroup"
    f.write_text("".join(f"{line}\n" for line in lines))
    r = subprocess.run([str(ROOT / "pam" / "netacct-cgjob"), str(uid), str(f)], capture_output=True, text=True)
    if expect.isdigit():
        assert (r.returncode, r.stdout, r.stderr) == (0, f"{expect}\n", "")
    else:
        assert r.returncode == 1 and r.stdout == "" and expect in r.stderr and r.stderr.count("\n") == 1


def test_with_the_cgroup_engine_an_ssh_session_lands_in_the_jobs_cgroup(lab: Lab) -> None:
    """engine = "cgroup" (mode own; SLURM on cgroup v1 here): pam_netacct moves the adopted
    session into the job's own cgroup instead of a namespace; what it sends is counted exactly.
    The lab's config and plugstack.conf are switched for this one job (slurmstepd reads
    plugstack.conf at every step; the prolog reads the config at every job) and restored."""
    root = Path("/sys/fs/cgroup/unified") / f"{TAG}cg"
    args = f"engine=cgroup cgroup=own cgroup_root={root} bpffs={lab.topo.bpffs} prefix={JOB_PREFIX}"
    config, plugstack = lab.config.read_text(), lab.slurm.plugstack_path.read_text()
    lab.config.write_text(f'engine = "cgroup"\n{config}[cgroup]\nmode = "own"\nroot = "{root}"\n')
    lab.slurm.plugstack_path.write_text(f"required {ROOT}/spank/netacct.so {args}\n")
    lab.pam(f"session  required {PAM_NETACCT} {args}")
    try:
        job = _running_job(lab)
        mine = f"/{root.name}/{JOB_PREFIX.replace('%h', NODE)}{job}"
        lab.topo.reset_servers()
        r = lab.ssh(f"grep -c /job_{job}/step_extern /proc/self/cgroup; grep '^0::' /proc/self/cgroup | cut -c4-; "
                    f"python3 {lab.work}/traffic.py tcp-up {WAN4} {PORT} 700000")
        assert r.returncode == 0, r.stderr + (lab.slurm.log_dir / "sshd.log").read_text()[-3000:]
        adopted, where, sent = r.stdout.split()
        assert int(adopted) >= 1 and where == mine and sent == "700000", r.stdout
        assert _wan_counted_exactly(lab, job)["rx"][1] > 700_000
        assert not (root / mine.rsplit("/", 1)[1]).exists()
    finally:
        lab.config.write_text(config)
        lab.slurm.plugstack_path.write_text(plugstack)
        cgroup.remove_tree(root)

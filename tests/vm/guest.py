#!/usr/bin/python3
"""Inside the test VM: one scenario on a whole Debian system (systemd PID 1, pure cgroup v2).

Run as root by the image's ``netacct-vm-run`` unit (see tests/vmharness.py) as ``guest.py IN
OUT`` (the input disk's ``entry``): IN holds ``src/`` (the project's files), ``scenario.json``
and ``debs/``; everything written to OUT (``result.json``, ``logs/``) goes back to the host.
The VM has no network device: every packet stays in network namespaces made here.

Scenario ``slurm`` (the namespace engine end to end, on whatever SLURM the image's Debian
release carries): install the project as a site does (``scripts/bootstrap`` from the image's
wheelhouse, ``make install`` of the SPANK plugin and the PAM module, ``netacct-daemon`` as a
systemd service), build a sandbox network (router, LAN and WAN servers in namespaces; this
VM is compute node n1, its uplink a veth to the router), start munge, slurmctld and slurmd
as systemd services with ``proctrack/cgroup``, ``task/cgroup``, ``cgroup/v2`` and
``PrologFlags=Alloc,Contain``, sshd with pam_slurm_adopt and pam_netacct, then run a job as an
unprivileged user: its batch script uploads to the WAN server, an srun step downloads from it,
and an ssh session adopted into the running job uploads again. The raw numbers — the WAN
server's nftables counters and ``netacct-report --json`` — go into result.json; the host's
tests/test_vm.py compares them.

Then, in the same boot (phase 2), the cgroup engine on SLURM's own job cgroup: netacct.toml
switched to ``engine = "cgroup"`` with ``[cgroup] mode = "slurm"``, the SPANK plugin to
``engine=cgroup cgroup=slurm``, pam_netacct taken out of sshd's stack (pam_slurm_adopt alone
puts a session into the job's cgroup), the service and slurmd restarted. A second job's batch
script uploads as its first instruction and waits; two srun steps download (TCP) and send UDP
datagrams; an adopted ssh session uploads. After each part the job's live counters and the WAN
server's are read (result.json's ``cgroup``), as are the job's pins and every cgroup with inet
programs attached (tests/vm/cgprobe.py), and, after the epilog, which of the job's programs and
maps the kernel still holds.

Python standard library only (it runs before the project's venv exists).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

PREFIX = "/opt/slurm-netacct"  # where a site clones the project (README, "Installing on a cluster")
WHEELHOUSE = "/opt/netacct-vm/wheels"  # made at image build time (tests/vmharness.py)
VENV_BIN = f"{PREFIX}/.venv/bin"
SYS_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
USER = "netacct-test"
NODE, NODE_ADDR = "n1", "10.77.1.2"
TAG = "vm-"  # topology.Topology's namespaces: vm-rtr, vm-lan, vm-wan
JOB_PREFIX = "netacct-"
PAYLOADS = {"batch_up": 2_000_000, "srun_down": 3_000_000, "ssh_up": 1_500_000}
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING", "SIGNALING"}


def console(msg: str) -> None:
    """Progress on stdout (guest.log) and on the serial console, which the host watches."""
    print(f"== {msg}", flush=True)
    try:
        with open("/dev/console", "w") as c:
            c.write(f"NETACCT-VM: {msg}\n")
    except OSError:
        pass


class Failed(Exception):
    """A step of the scenario failed; the message says which and why."""


def sh(*argv: str, check: bool = True, timeout: float = 300, input: str | None = None,
       env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input,
                       env={"PATH": SYS_PATH, "LANG": "C.UTF-8", "HOME": "/root", **(env or {})})
    if check and r.returncode != 0:
        raise Failed(f"{' '.join(argv)[:200]} exited {r.returncode}:\n{r.stdout[-2000:]}{r.stderr[-3000:]}")
    return r


def wait_for(what: str, ready: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = ready()
        if value:
            return value
        if time.monotonic() > deadline:
            raise Failed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class Run:
    """One scenario's state and its result.json."""

    def __init__(self, inp: Path, out: Path) -> None:
        self.inp, self.out = inp, out
        spec = json.loads((inp / "scenario.json").read_text())
        self.name: str = spec["scenario"]
        self.params: dict[str, Any] = spec.get("params", {})
        self.result: dict[str, Any] = {"scenario": self.name, "params": self.params, "ok": False,
                                       "facts": {}, "timings": {}}
        self.t0 = time.monotonic()
        self.topo: Any = None

    def step(self, name: str, fn: Callable[[], Any]) -> Any:
        t = time.monotonic()
        console(f"step {name}")
        try:
            return fn()
        finally:
            self.result["timings"][name] = round(time.monotonic() - t, 1)
            console(f"step {name} done in {self.result['timings'][name]} s")

    def fact(self, key: str, value: Any) -> None:
        self.result["facts"][key] = value


# ---------------------------------------------------------------------- the node, as a site sets it up


def install(run: Run) -> None:
    """The project as a site installs it (README, "Installing on a cluster", steps 1, 4, 7)."""
    shutil.copytree(run.inp / "src", PREFIX, symlinks=True)
    # Everything bootstrap's apt list names is in the image; pip finds the wheels offline.
    # PIP_COMPILE=0: no byte-compiling of every installed file, minutes under emulation
    # (imports compile what they use).
    # Traced with a clock (bash takes no PS4 from the environment as root, so it is set here and
    # the script sourced with its own $0): where the minutes go, in logs/bootstrap.log.
    r = sh("bash", "-c", "PS4='+ $(date +%s.%N) '; set -x; . \"$0\"", f"{PREFIX}/scripts/bootstrap",
           check=False, timeout=1200, env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": WHEELHOUSE, "PIP_COMPILE": "0"})
    (run.out / "logs").mkdir(exist_ok=True)
    (run.out / "logs" / "bootstrap.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise Failed(f"scripts/bootstrap exited {r.returncode}:\n{r.stdout[-2000:]}{r.stderr[-3000:]}")
    run.fact("bootstrap_output_tail", r.stdout[-600:])
    for part in ("spank", "pam"):
        sh("make", "-C", f"{PREFIX}/{part}", "install")


def facts(run: Run) -> None:
    run.fact("debian", Path("/etc/debian_version").read_text().strip())
    run.fact("kernel", os.uname().release)
    run.fact("pid1", Path("/proc/1/comm").read_text().strip())
    run.fact("cgroup_fs", sh("stat", "-fc", "%T", "/sys/fs/cgroup").stdout.strip())
    run.fact("cgroup_mounts", [line for line in Path("/proc/mounts").read_text().splitlines() if "cgroup" in line])
    run.fact("cgroup_controllers", Path("/sys/fs/cgroup/cgroup.controllers").read_text().split())
    run.fact("slurm_package", sh("dpkg-query", "-W", "-f", "${Version}", "slurmd").stdout.strip())
    run.fact("spank_plugin", sorted(str(p) for p in Path("/usr/lib").glob("*/slurm-wlm/netacct.so")))
    run.fact("pam_module", sorted(str(p) for p in Path("/lib").glob("*/security/pam_netacct.so"))
             + sorted(str(p) for p in Path("/usr/lib").glob("*/security/pam_netacct.so")))


def network(run: Run) -> None:
    """tests/topology.py's router, LAN and WAN servers; this VM (node n1) on the router's bridge."""
    sys.path.insert(0, f"{PREFIX}/tests")
    from topology import Topology, sh as tsh  # noqa: E402  (the project's files are here only now)

    Path("/etc/slurm").mkdir(exist_ok=True)
    Path("/etc/slurm/netacct.toml").write_text(NETACCT_TOML)  # README, step 2
    run.topo = Topology(TAG, nodes=(), controller=False).up()
    rtr = run.topo.router
    tsh("ip", "link", "add", "up0", "type", "veth", "peer", "name", "p0", "netns", rtr)
    tsh("ip", "-n", rtr, "link", "set", "p0", "master", "br0")
    tsh("ip", "-n", rtr, "link", "set", "p0", "up")
    tsh("ip", "link", "set", "up0", "up")
    tsh("ip", "addr", "add", f"{NODE_ADDR}/24", "dev", "up0")
    tsh("ip", "route", "add", "default", "via", "10.77.1.1")
    # Routed mode: the router (the LAN) reaches the node's job prefix 100.64.1.0/24.
    env = {"NETACCT_CONFIG": "/etc/slurm/netacct.toml"}
    sh(f"{VENV_BIN}/netacct-routes", "install", f"--node={NODE}={NODE_ADDR}", f"--self={NODE}", env=env)
    sh("nsenter", f"--net=/run/netns/{rtr}", f"{VENV_BIN}/netacct-routes", "install", f"--node={NODE}={NODE_ADDR}",
       env=env)


NETACCT_TOML = f"""# written by tests/vm/guest.py
uplink = "up0"
mode = "routed"
netns_prefix = "{JOB_PREFIX}"
log_file = "/var/log/slurm-netacct/netacct.log"
[pool]
ipv4 = "100.64.0.0/16"
"""

SLURM_CONF = f"""# written by tests/vm/guest.py: a one-node cluster, SLURM's own cgroup/v2 under systemd
ClusterName=vm
SlurmctldHost={NODE}({NODE_ADDR})
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=verbose
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup
PrologFlags=Alloc,Contain
Prolog={PREFIX}/prolog
Epilog={PREFIX}/epilog
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.txt
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=300
KillWait=5
InactiveLimit=0
MessageTimeout=30
SlurmdTimeout=300
SlurmctldTimeout=300
MailProg=/bin/true
NodeName={NODE} NodeAddr={NODE_ADDR} CPUs=2 State=UNKNOWN
PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""

CGROUP_CONF = """# written by tests/vm/guest.py
CgroupPlugin=cgroup/v2
ConstrainCores=yes
"""


def node_idle() -> bool:
    r = sh("scontrol", "-o", "show", "node", NODE, check=False)
    m = re.search(r"\bState=(\S+)", r.stdout)
    return bool(m and m.group(1).split("+")[0] == "IDLE" and "DRAIN" not in m.group(1)
                and "NOT_RESPONDING" not in m.group(1))


def slurm(run: Run) -> None:
    Path("/etc/slurm/slurm.conf").write_text(SLURM_CONF)
    Path("/etc/slurm/cgroup.conf").write_text(CGROUP_CONF)
    # README, step 4, with the plugin where `make -C spank install` put it.
    [plugin] = run.result["facts"]["spank_plugin"]
    Path("/etc/slurm/plugstack.conf").write_text(f"required {plugin} netns_dir=/run/netns prefix={JOB_PREFIX}\n")
    for d in ("/var/lib/slurm/slurmctld", "/var/lib/slurm/slurmd", "/var/log/slurm", "/var/log/slurm-netacct"):
        Path(d).mkdir(parents=True, exist_ok=True)
    shutil.chown("/var/lib/slurm/slurmctld", "slurm", "slurm")
    shutil.chown("/var/log/slurm", "slurm", "slurm")
    if not Path("/etc/munge/munge.key").exists():
        sh("mungekey", "--create")
        shutil.chown("/etc/munge/munge.key", "munge", "munge")
    # README, step 6: the resident service, before slurmd.
    shutil.copy(f"{PREFIX}/contrib/netacct-daemon.service", "/etc/systemd/system/netacct-daemon.service")
    sh("systemctl", "daemon-reload")
    sh("systemctl", "enable", "--now", "netacct-daemon.service")
    sh("systemctl", "start", "munge.service")
    sh("systemctl", "restart", "slurmctld.service")
    sh("systemctl", "restart", "slurmd.service")

    wait_for("node n1 to be IDLE", node_idle, 180)
    run.fact("slurm_version", sh("sinfo", "-V").stdout.strip())
    cfg = sh("scontrol", "show", "config").stdout
    for key in ("ProctrackType", "TaskPlugin", "CgroupPlugin", "PrologFlags", "SLURM_VERSION"):
        m = re.search(rf"^{key}\s*=\s*(.*)$", cfg, re.M)
        run.fact(f"config_{key}", m.group(1).strip() if m else None)
    run.fact("slurmd_cgroup", Path(f"/proc/{sh('systemctl', 'show', '-p', 'MainPID', '--value', 'slurmd').stdout.strip()}"
                                   "/cgroup").read_text().strip())
    run.fact("daemon_active", sh("systemctl", "is-active", "netacct-daemon", check=False).stdout.strip())


def sshd(run: Run) -> None:
    """README, step 7: pam_slurm_adopt (account) and pam_netacct (session) in sshd's stack."""
    pam = Path("/etc/pam.d/sshd")
    lines = pam.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("@include common-account")) + 1
    lines.insert(at, "account    required     pam_slurm_adopt.so action_adopt_failure=deny")
    lines.append(f"session    required     pam_netacct.so netns_dir=/run/netns prefix={JOB_PREFIX}")
    pam.write_text("\n".join(lines) + "\n")
    # pam_slurm_adopt's documentation: pam_systemd would move the session out of the job.
    common = Path("/etc/pam.d/common-session")
    run.fact("pam_systemd_was_in_common_session", "pam_systemd" in common.read_text())
    common.write_text(re.sub(r"^(.*pam_systemd\.so.*)$", r"# \1", common.read_text(), flags=re.M))
    Path("/etc/ssh/sshd_config.d").mkdir(exist_ok=True)
    Path("/etc/ssh/sshd_config.d/netacct-vm.conf").write_text(
        "UsePAM yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUseDNS no\n")
    sh("ssh-keygen", "-A")
    sh("systemctl", "restart", "ssh.service")
    if sh("id", USER, check=False).returncode != 0:
        sh("useradd", "-m", "-s", "/bin/bash", USER)
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", "/root/vm-user-key")
    ssh_dir = Path(f"/home/{USER}/.ssh")
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    shutil.copy("/root/vm-user-key.pub", ssh_dir / "authorized_keys")
    sh("chown", "-R", f"{USER}:{USER}", str(ssh_dir))


# ---------------------------------------------------------------------- the job


def report(*args: str) -> list[dict[str, Any]]:
    r = sh(f"{VENV_BIN}/netacct-report", "--json", *args, env={"NETACCT_CONFIG": "/etc/slurm/netacct.toml"})
    return json.loads(r.stdout)


def job_state(job: int) -> str:
    """The job's last state: squeue's while it is known as active, else jobcomp's."""
    r = sh("squeue", "-h", "-t", "all", "-j", str(job), "-o", "%T", check=False)
    states = r.stdout.split()
    if set(states) & ACTIVE:
        return states[0]
    try:
        text = Path("/var/log/slurm/jobcomp.txt").read_text()
    except FileNotFoundError:
        return ""
    for line in reversed(text.splitlines()):
        if f"JobId={job} " in line:
            m = re.search(r"JobState=(\S+)", line)
            return m.group(1) if m else ""
    return ""


BATCH = """#!/bin/bash
#SBATCH -N1 -n1 -o {home}/job-%j.out
set -e
echo "batch-cgroup $(grep '^0::' /proc/self/cgroup)"
echo "batch-netns $(readlink /proc/self/ns/net)"
ip -o -4 addr show dev eth0 | awk '{{print "addr", $4}}'
echo "batch-up $(python3 {traffic} tcp-up {wan} {port} {batch_up})"
srun -n1 bash -c 'echo "step-netns $(readlink /proc/self/ns/net)"; echo "step-cgroup $(grep "^0::" /proc/self/cgroup)"; echo "srun-down $(python3 {traffic} tcp-down {wan} {port} {srun_down})"'
touch {home}/ready-$SLURM_JOB_ID
for i in $(seq 2400); do [ -e {home}/go-$SLURM_JOB_ID ] && break; sleep 0.25; done
[ -e {home}/go-$SLURM_JOB_ID ] && echo released
"""

SSH_CMD = ("echo \"ssh-cgroup $(grep '^0::' /proc/self/cgroup)\"; echo \"ssh-netns $(readlink /proc/self/ns/net)\"; "
           "echo \"ssh-up $(python3 {traffic} tcp-up {wan} {port} {n})\"")


def job(run: Run) -> None:
    from topology import PORT, WAN4  # noqa: E402

    topo = run.topo
    home = f"/home/{USER}"
    traffic = f"{PREFIX}/tests/traffic.py"
    run.result["payloads"] = PAYLOADS
    topo.reset_servers()
    script = BATCH.format(home=home, traffic=traffic, wan=WAN4, port=PORT, **PAYLOADS)
    r = sh("runuser", "-u", USER, "--", "sbatch", "--parsable", "-D", home, input=script)
    job_id = int(r.stdout.strip().split(";")[0])
    run.result["job"] = {"id": job_id}
    ready = Path(f"{home}/ready-{job_id}")

    def started() -> bool:
        state = job_state(job_id)
        if state and state not in ACTIVE:
            raise Failed(f"job {job_id} ended ({state}) before it was ready:\n{_read(f'{home}/job-{job_id}.out')}")
        return ready.exists()

    run.step("job_until_ready", lambda: wait_for(f"job {job_id}'s batch script and srun step", started, 600))
    netns = Path(f"/run/netns/{JOB_PREFIX}{job_id}")
    run.result["job"]["netns"] = f"net:[{netns.stat().st_ino}]"

    # The ssh session into the running job: counted on its own, exactly.
    topo.wait_quiet()
    before_srv, before_job = topo.server_counts("wan", reset=False), report("-j", str(job_id))
    ssh = sh("nsenter", f"--net=/run/netns/{topo.lan}", "ssh", "-F", "none", "-i", "/root/vm-user-key",
             "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=60", f"{USER}@{NODE_ADDR}",
             SSH_CMD.format(traffic=traffic, wan=WAN4, port=PORT, n=PAYLOADS["ssh_up"]), check=False)
    topo.wait_quiet()
    after_srv, after_job = topo.server_counts("wan", reset=False), report("-j", str(job_id))
    run.result["ssh"] = {"returncode": ssh.returncode, "stdout": ssh.stdout, "stderr": ssh.stderr,
                         "server_before": before_srv, "server_after": after_srv,
                         "report_before": before_job, "report_after": after_job}

    Path(f"{home}/go-{job_id}").touch()
    run.step("job_end", lambda: wait_for(f"job {job_id} to end", lambda: job_state(job_id) not in ACTIVE | {""}, 300))
    run.result["job"]["state"] = job_state(job_id)
    run.result["job"]["output"] = _read(f"{home}/job-{job_id}.out")
    # The epilog's record (the epilog finishes before the job leaves COMPLETING; be patient).
    rec = wait_for("the job's final record", lambda: [x for x in report("-j", str(job_id)) if x["state"] != "running"],
                   60)
    topo.wait_quiet()
    run.result["wan_server"] = topo.server_counts("wan", reset=False)
    run.result["report"] = rec


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"


# ---------------------------------------------------------------------- phase 2: the cgroup engine

NETACCT_TOML_CGROUP = f"""# written by tests/vm/guest.py: phase 2, the cgroup engine on SLURM's own job cgroup
engine = "cgroup"
netns_prefix = "{JOB_PREFIX}"
log_file = "/var/log/slurm-netacct/netacct.log"
[cgroup]
mode = "slurm"
"""

CG_PAYLOADS = {"batch_up": 2_000_000, "srun_down": 3_000_000, "udp_count": 64, "udp_size": 1000,
               "ssh_up": 1_500_000}

# Its first instruction sends: counted only if the programs are on the job's cgroup before the
# batch script starts. Then it waits (ready1/go1) so that the batch script's share is read on
# its own, runs two srun steps, and waits again (ready2/go2) for the adopted ssh session.
CG_BATCH = """#!/bin/bash
#SBATCH -N1 -n1 -o {home}/job-%j.out
echo "batch-up $(python3 {traffic} tcp-up {wan} {port} {batch_up})"
echo "batch-cgroup $(grep '^0::' /proc/self/cgroup)"
echo "batch-netns $(readlink /proc/self/ns/net)"
touch {home}/ready1-$SLURM_JOB_ID
for i in $(seq 2400); do [ -e {home}/go1-$SLURM_JOB_ID ] && break; sleep 0.25; done
srun -n1 bash -c 'echo "step-cgroup $(grep "^0::" /proc/self/cgroup)"; echo "srun-down $(python3 {traffic} tcp-down {wan} {port} {srun_down})"'
srun -n1 bash -c 'echo "step2-cgroup $(grep "^0::" /proc/self/cgroup)"; echo "srun-udp $(python3 {traffic} udp-up {wan} {port} {udp_count} {udp_size})"'
touch {home}/ready2-$SLURM_JOB_ID
for i in $(seq 2400); do [ -e {home}/go2-$SLURM_JOB_ID ] && break; sleep 0.25; done
[ -e {home}/go2-$SLURM_JOB_ID ] && echo released
"""


def switch_to_cgroup_engine(run: Run) -> None:
    """README, "Choosing an engine": engine = "cgroup", [cgroup] mode = "slurm"; the SPANK
    plugin with engine=cgroup cgroup=slurm; no PAM module of ours (pam_slurm_adopt puts the
    sessions into the job's step_extern, inside the counted job cgroup)."""
    Path("/etc/slurm/netacct.toml").write_text(NETACCT_TOML_CGROUP)
    [plugin] = run.result["facts"]["spank_plugin"]
    Path("/etc/slurm/plugstack.conf").write_text(f"required {plugin} engine=cgroup cgroup=slurm prefix={JOB_PREFIX}\n")
    pam = Path("/etc/pam.d/sshd")
    pam.write_text("".join(line for line in pam.read_text().splitlines(keepends=True) if "pam_netacct" not in line))
    run.fact("cgroup_phase_sshd_pam", [line for line in pam.read_text().splitlines() if "slurm" in line or "netacct" in line])
    # The service and slurmd read their configuration when they start.
    sh("systemctl", "restart", "netacct-daemon.service")
    sh("systemctl", "restart", "slurmd.service")
    wait_for("node n1 to be IDLE again", node_idle, 180)
    run.fact("cgroup_phase_daemon_active", sh("systemctl", "is-active", "netacct-daemon", check=False).stdout.strip())


def probe(*args: str) -> dict[str, Any]:
    """tests/vm/cgprobe.py (the project's venv): pins, attachments, SLURM's job cgroup."""
    return json.loads(sh(f"{VENV_BIN}/python", f"{PREFIX}/tests/vm/cgprobe.py", *args).stdout)


def cgroup_job(run: Run) -> None:
    from topology import PORT, WAN4  # noqa: E402

    topo = run.topo
    home = f"/home/{USER}"
    traffic = f"{PREFIX}/tests/traffic.py"
    res: dict[str, Any] = {"payloads": CG_PAYLOADS, "node_netns": os.readlink("/proc/1/ns/net")}
    run.result["cgroup"] = res
    topo.reset_servers()
    script = CG_BATCH.format(home=home, traffic=traffic, wan=WAN4, port=PORT, **CG_PAYLOADS)
    r = sh("runuser", "-u", USER, "--", "sbatch", "--parsable", "-D", home, input=script)
    job_id = int(r.stdout.strip().split(";")[0])
    res["id"] = job_id

    def reached(mark: str) -> Callable[[], bool]:
        def ready() -> bool:
            state = job_state(job_id)
            if state and state not in ACTIVE:
                raise Failed(f"job {job_id} ended ({state}) before {mark}:\n{_read(f'{home}/job-{job_id}.out')}")
            return Path(f"{home}/{mark}-{job_id}").exists()
        return ready

    def snapshot() -> dict[str, Any]:
        topo.wait_quiet()
        return {"server": topo.server_counts("wan", reset=False), "report": report("-j", str(job_id))}

    # 1. The batch script's upload (its first instruction), alone.
    run.step("cgroup_job_batch", lambda: wait_for(f"job {job_id}'s batch script", reached("ready1"), 600))
    res["after_batch"] = snapshot()
    res["running"] = probe("running", str(job_id))
    # 2. Two srun steps: a TCP download, UDP datagrams up.
    Path(f"{home}/go1-{job_id}").touch()
    run.step("cgroup_job_steps", lambda: wait_for(f"job {job_id}'s srun steps", reached("ready2"), 600))
    res["after_steps"] = snapshot()
    # 3. An ssh session adopted into the running job (pam_slurm_adopt only).
    ssh = sh("nsenter", f"--net=/run/netns/{topo.lan}", "ssh", "-F", "none", "-i", "/root/vm-user-key",
             "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=60", f"{USER}@{NODE_ADDR}",
             SSH_CMD.format(traffic=traffic, wan=WAN4, port=PORT, n=CG_PAYLOADS["ssh_up"]), check=False)
    res["ssh"] = {"returncode": ssh.returncode, "stdout": ssh.stdout, "stderr": ssh.stderr}
    res["after_ssh"] = snapshot()
    # 4. The end: the epilog's record against everything the WAN server saw; nothing of ours left.
    Path(f"{home}/go2-{job_id}").touch()
    run.step("cgroup_job_end", lambda: wait_for(f"job {job_id} to end", lambda: job_state(job_id) not in ACTIVE | {""},
                                                300))
    res["state"] = job_state(job_id)
    res["output"] = _read(f"{home}/job-{job_id}.out")
    res["report"] = wait_for("the job's final record",
                             lambda: [x for x in report("-j", str(job_id)) if x["state"] != "running"], 60)
    topo.wait_quiet()
    res["wan_server"] = topo.server_counts("wan", reset=False)
    pins = res["running"]["pins"]
    progs = [str(pins[d]["id"]) for d in ("out", "in") if d in pins]
    maps = sorted({str(m) for d in ("out", "in") if d in pins for m in pins[d]["map_ids"]})
    res["after_epilog"] = run.step("cgroup_leftovers", lambda: probe("gone", str(job_id), *progs, "--", *maps))


# ---------------------------------------------------------------------- scenarios


def scenario_slurm(run: Run) -> None:
    run.step("install", lambda: install(run))
    run.step("facts", lambda: facts(run))
    run.step("network", lambda: network(run))
    run.step("slurm_start", lambda: slurm(run))
    run.step("sshd", lambda: sshd(run))
    run.step("job", lambda: job(run))
    # Phase 2, in the same boot: the cgroup engine on SLURM's own job cgroup.
    run.step("cgroup_switch", lambda: switch_to_cgroup_engine(run))
    run.step("cgroup_job", lambda: cgroup_job(run))


SCENARIOS: dict[str, Callable[[Run], None]] = {"slurm": scenario_slurm}

LOGS = [
    "/var/log/slurm/slurmctld.log", "/var/log/slurm/slurmd.log", "/var/log/slurm/jobcomp.txt",
    "/var/log/slurm-netacct/netacct.log", "/etc/slurm/slurm.conf", "/etc/pam.d/sshd",
    "/etc/slurm/plugstack.conf", "/etc/slurm/netacct.toml",
]


def collect(run: Run) -> None:
    logs = run.out / "logs"
    logs.mkdir(exist_ok=True)
    for f in LOGS:
        if Path(f).exists():
            shutil.copy(f, logs / Path(f).name)
    for f in Path(f"/home/{USER}").glob("job-*.out"):
        shutil.copy(f, logs / f.name)
    for unit in ("slurmctld", "slurmd", "munge", "ssh", "netacct-daemon"):
        r = sh("journalctl", "-b", "--no-pager", "-u", unit, check=False)
        (logs / f"journal-{unit}.txt").write_text(r.stdout)


def main() -> int:
    run = Run(Path(sys.argv[1]), Path(sys.argv[2]))
    try:
        if run.name not in SCENARIOS:
            raise Failed(f"unknown scenario {run.name!r} (known: {', '.join(SCENARIOS)})")
        SCENARIOS[run.name](run)
        run.result["ok"] = True
    except BaseException as e:  # everything goes back to the host, then we stop
        run.result["error"] = "".join(traceback.format_exception(e))
        print(run.result["error"], flush=True)
    finally:
        run.result["timings"]["total"] = round(time.monotonic() - run.t0, 1)
        try:
            collect(run)
        finally:
            (run.out / "result.json").write_text(json.dumps(run.result, indent=1, default=str) + "\n")
        if run.topo is not None:
            try:
                run.topo.down()
            except Exception as e:  # the VM powers off anyway
                print(f"topology down: {e}", flush=True)
    return 0 if run.result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Test harness: a real SLURM 22.05 cluster (munged, slurmctld, one slurmd per node) on one machine.

Every node is a slurmd in its own network namespace (made by the caller) and its own UTS
namespace (so its hostname is its NodeName); slurmctld runs the same way in the controller's
namespace. Nothing under /etc is touched: the cluster has its own slurm.conf, plugstack.conf,
munge socket, state, spool and log directories, all under one work directory.

Typical use from a pytest fixture::

    with SlurmCluster(make_workdir("e2e"), "lab-ctl", "10.99.0.1",
                      [NodeSpec("n1", "lab-n1", "10.99.0.11")]) as cluster:
        cluster.start()
        job = cluster.sbatch("#!/bin/sh\\nsrun hostname\\n")
        assert cluster.wait_job(job) == "COMPLETED"

Processes are stopped by PID only. Processes the daemons leave behind (slurmstepd, job tasks,
prolog/epilog scripts) are found by the UTS namespace the harness gave each daemon, which
nothing else on the machine shares. ``BridgeLab`` builds a throwaway network (controller
namespace with a bridge, one veth per node namespace) for self-tests and end-to-end tests.

Standard library only; must run as root.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import signal
import stat
import subprocess
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Callable, Iterable, Mapping, Sequence

__all__ = [
    "HarnessError",
    "SlurmCommandError",
    "NodeSpec",
    "SlurmCluster",
    "BridgeLab",
    "ensure_user",
    "make_workdir",
    "netns_path",
]

NETNS_DIR = Path("/run/netns")
MUNGE_KEY = Path("/etc/munge/munge.key")
SYS_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Job states in which a job still occupies the queue or its nodes (squeue %T spelling).
_ACTIVE_JOB_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "SUSPENDED",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "STOPPED",
        "RESV_DEL_HOLD",
        "SPECIAL_EXIT",
    }
)
# Node state flags that mean "not usable yet" (scontrol State= spelling, after the '+').
_BAD_NODE_FLAGS = frozenset(
    {"DRAIN", "NOT_RESPONDING", "POWERED_DOWN", "POWERING_DOWN", "POWERING_UP", "FAIL", "REBOOT_REQUESTED"}
)
_KV_RE = re.compile(r"(\w+)=(\S*)")


class HarnessError(RuntimeError):
    """The cluster could not be started, queried or stopped as asked."""


class SlurmCommandError(subprocess.CalledProcessError):
    """A SLURM client command exited non-zero; the message includes its stdout and stderr."""

    def __str__(self) -> str:
        return (
            f"{shlex.join(map(str, self.cmd))} exited {self.returncode}\n"
            f"--- stdout ---\n{self.stdout or ''}--- stderr ---\n{self.stderr or ''}"
        )


@dataclass
class NodeSpec:
    """One compute node: a slurmd with its own hostname in an existing network namespace."""

    name: str  # SLURM NodeName and the slurmd's hostname, e.g. "n1"
    netns: str  # name of an existing network namespace under /run/netns, made by the caller
    addr: str  # IPv4 address of the node inside that namespace, reachable from the controller
    cpus: int = 4  # CPUs= in slurm.conf; may exceed the real machine (config_overrides is set)
    # Shell commands run as root in a mount namespace of the slurmd's own (propagation slave:
    # nothing mounted there leaks out) before it starts, e.g. a bind mount over /etc/resolv.conf.
    mount_setup: str = ""


def netns_path(name: str) -> Path:
    """Path of the bind mount that names a network namespace (what ``nsenter --net=`` takes)."""
    return NETNS_DIR / name


def ensure_user(name: str) -> tuple[int, int]:
    """Return (uid, gid) of a local user, creating it with ``useradd -m`` if it is missing."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True, capture_output=True, text=True)
        pw = pwd.getpwnam(name)
    return pw.pw_uid, pw.pw_gid


def make_workdir(tag: str = "cluster", parent: Path | str = "/tmp") -> Path:
    """Make a fresh, world-traversable (0755) work directory for a ``SlurmCluster``.

    pytest's ``tmp_path`` lives under a 0700 directory, which neither munged (it runs as the
    ``munge`` user) nor an unprivileged job user can enter; use this instead.
    """
    path = Path(tempfile.mkdtemp(prefix=f"slh-{tag}-", dir=parent))
    path.chmod(0o755)
    return path


def _check_traversable(path: Path) -> None:
    """Raise HarnessError unless every existing directory from / down to ``path`` is o+x."""
    for p in [path, *path.parents]:
        if not p.exists():
            continue
        mode = p.stat().st_mode
        if not mode & stat.S_IXOTH:
            raise HarnessError(
                f"{p} is mode {stat.S_IMODE(mode):o}: munged and job users cannot reach anything under {path}; "
                "use slurmharness.make_workdir() (a 0755 directory under /tmp)"
            )


def _uts_ns(pid: int) -> str | None:
    """The UTS namespace identity of a process ('uts:[inode]'), or None if it is gone."""
    try:
        return os.readlink(f"/proc/{pid}/ns/uts")
    except OSError:
        return None


def _pids_in_uts_namespaces(namespaces: set[str]) -> list[int]:
    """PIDs of every process whose UTS namespace is one of ``namespaces``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _uts_ns(int(entry)) in namespaces:
            found.append(int(entry))
    return found


def _is_zombie(pid: int) -> bool:
    """True if the process is a zombie or already gone (nothing left to kill)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _tail(path: Path, lines: int) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError as e:
        return f"<cannot read {path}: {e}>\n"


def _parse_kv(line: str) -> dict[str, str]:
    """Parse 'Key=value Key2=value2' (scontrol -o, jobcomp/filetxt); values cannot hold spaces."""
    return dict(_KV_RE.findall(line))


class SlurmCluster:
    """A real SLURM cluster on this machine: munged, slurmctld and one slurmd per ``NodeSpec``.

    ``workdir`` receives everything: ``slurm.conf``, ``plugstack.conf``, ``munge/`` (socket,
    pid and seed files), ``state/`` (StateSaveLocation and each node's spool), ``log/`` (daemon
    logs, including munged's), ``jobcomp.txt`` (jobcomp/filetxt) and ``jobs/<user>/`` (default job directories).
    It must be reachable by other users (see ``make_workdir``).

    ``prolog``/``epilog`` are absolute paths of executables run by slurmd as root. slurmd starts
    them with an environment of its own making (no PATH, none of slurmd's variables); when
    ``extra_env`` is given, a small generated wrapper exports ``extra_env`` and then execs the
    real script, so hooks see e.g. NETACCT_CONFIG. Daemons (and so slurmstepd and SPANK plugins)
    get ``extra_env`` directly.

    ``start()`` after ``stop()`` restarts on the same state (jobs and node states are recovered
    from StateSaveLocation); use a fresh work directory for a fresh cluster.

    ``slurm_conf_extra`` is extra slurm.conf text: a ``Key=value`` line whose key the harness
    already sets replaces the harness's value; any other line (NodeName=, PartitionName=, ...)
    is appended.
    """

    def __init__(
        self,
        workdir: Path | str,
        controller_netns: str,
        controller_addr: str,
        nodes: Sequence[NodeSpec],
        prolog: str | None = None,
        epilog: str | None = None,
        plugstack_lines: Iterable[str] = (),
        extra_env: Mapping[str, str] | None = None,
        slurm_conf_extra: str = "",
        *,
        slurmctld_port: int | None = None,
        slurmd_port: int | None = None,
        controller_hostname: str = "ctl",
        cluster_name: str = "slh",
        partition: str = "debug",
        slurmdbd_storage: Mapping[str, str] | None = None,
    ) -> None:
        if not nodes:
            raise HarnessError("a cluster needs at least one node")
        names = [n.name for n in nodes]
        if len(set(names)) != len(names) or controller_hostname in names:
            raise HarnessError(f"node names must be unique and differ from {controller_hostname!r}: {names}")
        for hook in (prolog, epilog):
            if hook is not None and not os.path.isabs(hook):
                raise HarnessError(f"prolog/epilog must be an absolute path: {hook!r}")
        self.workdir = Path(workdir).resolve()
        self.controller_netns = controller_netns
        self.controller_addr = controller_addr
        self.controller_hostname = controller_hostname
        self.nodes = list(nodes)
        self.prolog = prolog
        self.epilog = epilog
        self.plugstack_lines = list(plugstack_lines)
        self.extra_env = dict(extra_env or {})
        self.slurm_conf_extra = slurm_conf_extra
        self.cluster_name = cluster_name
        self.partition = partition
        # Two adjacent ports derived from the work directory, below Linux's ephemeral range
        # (32768+), so that clusters in different work directories never share ports.
        base = 10000 + 2 * (zlib.crc32(str(self.workdir).encode()) % 11000)
        self.slurmctld_port = slurmctld_port if slurmctld_port is not None else base
        self.slurmd_port = slurmd_port if slurmd_port is not None else base + 1
        # With slurmdbd_storage ({"StorageHost": ..., "StoragePort": ..., "StorageUser": ...,
        # "StoragePass": ...}: a MariaDB reachable from the controller's namespace), a slurmdbd
        # runs beside slurmctld and jobs go to its database: sacct and sacctmgr work.
        self.slurmdbd_storage = dict(slurmdbd_storage) if slurmdbd_storage else None
        self.slurmdbd_port = 6000 + zlib.crc32(str(self.workdir).encode()) % 3000
        self.slurmdbd_conf_path = self.workdir / "slurmdbd.conf"

        self.conf_path = self.workdir / "slurm.conf"
        self.plugstack_path = self.workdir / "plugstack.conf"
        self.munge_dir = self.workdir / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.state_dir = self.workdir / "state"
        self.log_dir = self.workdir / "log"
        self.run_dir = self.workdir / "run"
        self.jobs_dir = self.workdir / "jobs"
        self.jobcomp_path = self.workdir / "jobcomp.txt"
        self.slurmctld_log = self.log_dir / "slurmctld.log"
        self.slurmdbd_log = self.log_dir / "slurmdbd.log"
        self.munged_log = self.log_dir / "munged.log"  # munged --foreground logs to stderr

        self._procs: dict[str, subprocess.Popen[bytes]] = {}  # "munged", "slurmctld", node names
        self._uts: set[str] = set()  # UTS namespaces of our daemons (and so of their children)
        self._stderr_files: list[object] = []
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ paths and config

    def slurmd_log(self, name: str) -> Path:
        """Path of node ``name``'s slurmd log."""
        return self.log_dir / f"slurmd-{name}.log"

    @property
    def logs(self) -> dict[str, Path]:
        """Every log the cluster writes, by daemon: munged, slurmctld, then one per node."""
        logs = {"munged": self.munged_log, "slurmctld": self.slurmctld_log}
        if self.slurmdbd_storage:
            logs["slurmdbd"] = self.slurmdbd_log
        for n in self.nodes:
            logs[f"slurmd-{n.name}"] = self.slurmd_log(n.name)
        return logs

    def dump_logs(self, lines: int = 60) -> str:
        """The last ``lines`` lines of every log, with headers: print this when a test fails."""
        parts = []
        for name, path in self.logs.items():
            parts.append(f"===== {name}: {path} =====\n{_tail(path, lines)}")
            # A daemon's stderr matters when it died before opening its log file.
            err = self.log_dir / f"{name.removeprefix('slurmd-')}.stderr"
            if err.exists() and err.stat().st_size and not (path.exists() and path.stat().st_size):
                parts.append(f"===== {name} stderr: {err} =====\n{_tail(err, lines)}")
        return "".join(parts)

    def _hook_path(self, kind: str, script: str | None) -> str:
        if script is None:
            return ""
        if not self.extra_env:
            return script
        wrapper = self.workdir / f"{kind}-wrapper"
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.extra_env.items())
        wrapper.write_text(f"#!/bin/sh\n# generated by slurmharness: adds extra_env for {kind}\n"
                           f"{exports}exec {shlex.quote(script)} \"$@\"\n")
        wrapper.chmod(0o755)
        return str(wrapper)

    def conf_settings(self) -> dict[str, str]:
        """The harness's slurm.conf settings (without node/partition lines), before extras."""
        return {
            "ClusterName": self.cluster_name,
            "SlurmctldHost": f"{self.controller_hostname}({self.controller_addr})",
            "SlurmctldPort": str(self.slurmctld_port),
            "SlurmdPort": str(self.slurmd_port),
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "AuthInfo": f"socket={self.munge_socket}",
            "CredType": "cred/munge",
            "StateSaveLocation": str(self.state_dir / "ctld"),
            "SlurmdSpoolDir": str(self.state_dir / "%n"),
            "SlurmctldPidFile": str(self.run_dir / "slurmctld.pid"),
            "SlurmdPidFile": str(self.run_dir / "slurmd-%n.pid"),
            "SlurmctldLogFile": str(self.slurmctld_log),
            "SlurmdLogFile": str(self.log_dir / "slurmd-%n.log"),
            "SlurmctldDebug": "info",
            "SlurmdDebug": "info",
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core",
            "AccountingStorageType": "accounting_storage/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "JobCompType": "jobcomp/filetxt",
            "JobCompLoc": str(self.jobcomp_path),
            "MpiDefault": "none",
            "SwitchType": "switch/none",
            "ReturnToService": "2",
            "PlugStackConfig": str(self.plugstack_path),
            "Prolog": self._hook_path("prolog", self.prolog),
            "Epilog": self._hook_path("epilog", self.epilog),
            "PrologFlags": "Alloc",
            # The node lines may promise more CPUs than the machine has.
            "SlurmdParameters": "config_overrides",
            "MaxArraySize": "1001",
            "MinJobAge": "30",
            "KillWait": "2",
            "InactiveLimit": "0",
            "Waittime": "0",
            "MessageTimeout": "10",
            "TCPTimeout": "2",
            "SlurmdTimeout": "60",
            "SlurmctldTimeout": "60",
            # Plain FIFO; sbatch jobs still start on slurmctld's 1 s background tick.
            "SchedulerType": "sched/builtin",
            "SchedulerParameters": "batch_sched_delay=0,default_queue_depth=1000",
            "MailProg": "/bin/true",
        }

    def slurmdbd_conf_text(self) -> str:
        """slurmdbd.conf (beside slurm.conf, mode 0600), with slurmdbd_storage."""
        assert self.slurmdbd_storage is not None
        settings = {
            "AuthType": "auth/munge", "AuthInfo": f"socket={self.munge_socket}",
            "DbdHost": self.controller_hostname, "DbdAddr": self.controller_addr,
            "DbdPort": str(self.slurmdbd_port), "SlurmUser": "root",
            "PidFile": str(self.run_dir / "slurmdbd.pid"), "LogFile": str(self.slurmdbd_log),
            "DebugLevel": "info", "StorageType": "accounting_storage/mysql", "StorageLoc": "slurm_acct_db",
            **self.slurmdbd_storage,
        }
        return "# generated by tests/slurmharness.py\n" + "".join(f"{k}={v}\n" for k, v in settings.items())

    def slurm_conf_text(self) -> str:
        """The full slurm.conf the cluster runs with."""
        settings = self.conf_settings()
        if self.slurmdbd_storage:
            settings.update(AccountingStorageType="accounting_storage/slurmdbd",
                            AccountingStorageHost=self.controller_addr,
                            AccountingStoragePort=str(self.slurmdbd_port),
                            AccountingStoragePass=str(self.munge_socket))
        lower = {k.lower(): k for k in settings}
        appended = []
        for raw in self.slurm_conf_extra.splitlines():
            line = raw.strip()
            key = line.split("=", 1)[0].strip() if "=" in line else ""
            if key.lower() in lower and key.lower() not in ("nodename", "partitionname"):
                settings[lower[key.lower()]] = line.split("=", 1)[1].strip()
            elif line:
                appended.append(line)
        out = ["# generated by tests/slurmharness.py", *(f"{k}={v}" for k, v in settings.items() if v != "")]
        for n in self.nodes:
            out.append(
                f"NodeName={n.name} NodeAddr={n.addr} NodeHostname={n.name} CPUs={n.cpus} State=UNKNOWN"
            )
        out.append(
            f"PartitionName={self.partition} Nodes={','.join(n.name for n in self.nodes)}"
            " Default=YES MaxTime=INFINITE State=UP"
        )
        out.extend(appended)
        return "\n".join(out) + "\n"

    def _write_files(self) -> None:
        _check_traversable(self.workdir.parent)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o755)
        for d in (self.state_dir, self.log_dir, self.run_dir, self.jobs_dir):
            d.mkdir(exist_ok=True)
            d.chmod(0o755)
        for n in self.nodes:
            (self.state_dir / n.name).mkdir(exist_ok=True)
        self.munge_dir.mkdir(exist_ok=True)
        self.munge_dir.chmod(0o755)
        pw = pwd.getpwnam("munge")
        os.chown(self.munge_dir, pw.pw_uid, pw.pw_gid)
        self.plugstack_path.write_text("".join(f"{line}\n" for line in self.plugstack_lines))
        self.conf_path.write_text(self.slurm_conf_text())
        for p in (self.conf_path, self.plugstack_path):
            p.chmod(0o644)
        if self.slurmdbd_storage:
            self.slurmdbd_conf_path.write_text(self.slurmdbd_conf_text())
            self.slurmdbd_conf_path.chmod(0o600)

    def daemon_env(self) -> dict[str, str]:
        """Environment every daemon gets: a plain PATH, SLURM_CONF, then ``extra_env``."""
        return {"PATH": SYS_PATH, "LANG": "C.UTF-8", "SLURM_CONF": str(self.conf_path), **self.extra_env}

    def job_dir(self, user: str | None = None) -> Path:
        """A directory under the work directory owned by ``user`` (root when None), for job files."""
        name = user or "root"
        d = self.jobs_dir / name
        d.mkdir(parents=True, exist_ok=True)
        if user is not None:
            uid, gid = ensure_user(user)
            os.chown(d, uid, gid)
        d.chmod(0o755)
        return d

    # ------------------------------------------------------------------ lifecycle

    def _spawn(self, key: str, hostname: str, netns: str, argv: list[str], mount_setup: str = "") -> None:
        """Start ``argv`` with its own UTS namespace (hostname) inside network namespace ``netns``.

        ``unshare``, ``sh`` and ``nsenter`` each exec the next, so the Popen PID is the daemon's.
        """
        ns = netns_path(netns)
        if not ns.exists():
            raise HarnessError(f"network namespace {netns!r} does not exist ({ns})")
        inner = f"hostname {shlex.quote(hostname)} && exec nsenter --net={shlex.quote(str(ns))} -- "
        inner += shlex.join(argv)
        unshare = ["unshare", "--uts"]
        if mount_setup:
            unshare += ["--mount", "--propagation", "slave"]
            inner = f"{mount_setup} && {inner}"
        errf = open(self.log_dir / f"{key}.stderr", "ab")
        self._stderr_files.append(errf)
        proc = subprocess.Popen(
            [*unshare, "sh", "-c", inner],
            env=self.daemon_env(),
            stdin=subprocess.DEVNULL,
            stdout=errf,
            stderr=errf,
            cwd=self.log_dir,
            start_new_session=True,
        )
        self._procs[key] = proc
        # Record the daemon's own UTS namespace once it has left ours.
        own = _uts_ns(os.getpid())
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            ns_id = _uts_ns(proc.pid)
            if ns_id is not None and ns_id != own:
                self._uts.add(ns_id)
                return
            if proc.poll() is not None:
                raise HarnessError(f"{key} exited with {proc.returncode} at start\n{self.dump_logs()}")
            time.sleep(0.01)
        raise HarnessError(f"{key} did not start in its own UTS namespace\n{self.dump_logs()}")

    def _check_alive(self) -> None:
        for key, proc in self._procs.items():
            if proc.poll() is not None:
                raise HarnessError(f"{key} (pid {proc.pid}) exited with {proc.returncode}\n{self.dump_logs()}")

    def start(self, timeout: float = 30) -> None:
        """Start munged, slurmctld and every slurmd; return once every node is IDLE.

        On any failure everything started so far is stopped and HarnessError (with log tails)
        is raised.
        """
        if self._procs:
            raise HarnessError("cluster already started")
        t0 = time.monotonic()
        deadline = t0 + timeout
        self._write_files()
        try:
            self._start_munged(deadline)
            self.timings["munged"] = time.monotonic() - t0
            if self.slurmdbd_storage:
                self._spawn("slurmdbd", self.controller_hostname, self.controller_netns, ["slurmdbd", "-D"])
                self._wait(deadline, "slurmdbd to answer",
                           lambda: self.run("sacctmgr", "-n", "show", "cluster", check=False,
                                            timeout=10).returncode == 0)
                self.run("sacctmgr", "-i", "add", "cluster", self.cluster_name, check=False)
                self.timings["slurmdbd"] = time.monotonic() - t0
            self._spawn(
                "slurmctld",
                self.controller_hostname,
                self.controller_netns,
                ["slurmctld", "-D", "-f", str(self.conf_path)],
            )
            self._wait(deadline, "slurmctld to answer ping", self._ctld_up)
            self.timings["slurmctld"] = time.monotonic() - t0
            for n in self.nodes:
                self._spawn(n.name, n.name, n.netns, ["slurmd", "-D", "-N", n.name, "-f", str(self.conf_path)],
                            n.mount_setup)
            self._wait(deadline, "all nodes to be IDLE", self._all_idle)
            self.timings["start"] = time.monotonic() - t0
        except BaseException:
            self.stop()
            raise

    def _start_munged(self, deadline: float) -> None:
        m = self.munge_dir
        argv = [
            "munged",
            "--foreground",
            f"--socket={self.munge_socket}",
            f"--pid-file={m / 'munged.pid'}",
            f"--seed-file={m / 'munged.seed'}",
            f"--key-file={MUNGE_KEY}",
        ]
        errf = open(self.munged_log, "ab")
        self._stderr_files.append(errf)
        # Popen(user=...) execs munged directly as the munge user, so we hold munged's own PID.
        self._procs["munged"] = subprocess.Popen(
            argv,
            user="munge",
            group="munge",
            extra_groups=[],
            env={"PATH": SYS_PATH},
            stdin=subprocess.DEVNULL,
            stdout=errf,
            stderr=errf,
            cwd=m,
            start_new_session=True,
        )
        self._wait(deadline, "munged socket", self.munge_socket.exists)

    def _wait(self, deadline: float, what: str, ready: Callable[[], bool]) -> None:
        while True:
            self._check_alive()
            if ready():
                return
            if time.monotonic() > deadline:
                raise HarnessError(f"timed out waiting for {what}\n{self.dump_logs()}")
            time.sleep(0.05)

    def _ctld_up(self) -> bool:
        r = self.run("scontrol", "ping", check=False, timeout=10)
        return r.returncode == 0 and "UP" in r.stdout

    def _all_idle(self) -> bool:
        info = self.nodes_info()
        return all(n.name in info and self._node_ready(info[n.name].get("State", "")) for n in self.nodes)

    @staticmethod
    def _node_ready(state: str) -> bool:
        base, *flags = state.split("+")
        return base == "IDLE" and not _BAD_NODE_FLAGS.intersection(flags)

    def stop(self, timeout: float = 15) -> None:
        """Stop every process the cluster started, by PID; idempotent.

        SIGTERM to the slurmds and slurmctld, then SIGKILL to whatever is still running in their
        UTS namespaces (slurmstepd, job tasks, hooks), then munged. Waits for all to exit.
        """
        deadline = time.monotonic() + timeout
        daemons = [k for k in self._procs if k != "munged"]
        for key in daemons:
            self._signal(self._procs[key], signal.SIGTERM)
        for key in daemons:
            self._reap(self._procs[key], deadline)
        try:
            # Leftovers: slurmstepd and job processes live in the nodes' UTS namespaces.
            while self._uts:
                left = [p for p in _pids_in_uts_namespaces(self._uts) if not _is_zombie(p)]
                if not left:
                    break
                for pid in left:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                if time.monotonic() > deadline:
                    raise HarnessError(f"processes still alive in the cluster's UTS namespaces: {left}")
                time.sleep(0.05)
        finally:  # munged too, even when something above would not die
            if "munged" in self._procs:
                self._signal(self._procs["munged"], signal.SIGTERM)
                self._reap(self._procs["munged"], time.monotonic() + 5)
            self._procs.clear()
            self._uts.clear()
            for f in self._stderr_files:
                f.close()  # type: ignore[attr-defined]
            self._stderr_files.clear()

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
        if proc.poll() is None:
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass

    @staticmethod
    def _reap(proc: subprocess.Popen[bytes], deadline: float) -> None:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def __enter__(self) -> SlurmCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def processes(self) -> dict[int, str]:
        """Every live process of the cluster's daemons' UTS namespaces (daemons, slurmstepd,
        hooks, job tasks) as {pid: command name}; munged is not among them."""
        out = {}
        for pid in _pids_in_uts_namespaces(self._uts):
            if not _is_zombie(pid):
                try:
                    out[pid] = Path(f"/proc/{pid}/comm").read_text().strip()
                except OSError:
                    pass
        return out

    @property
    def pids(self) -> dict[str, int]:
        """PIDs of the daemons started by the harness, by key (munged, slurmctld, node names)."""
        return {k: p.pid for k, p in self._procs.items()}

    # ------------------------------------------------------------------ client commands

    def run(
        self,
        *args: str,
        user: str | None = None,
        netns: str | None = None,
        check: bool = True,
        timeout: float = 60,
        cwd: Path | str | None = None,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a SLURM client command against this cluster and return its completed process.

        It runs with SLURM_CONF set, inside network namespace ``netns`` (default: the
        controller's) through ``nsenter --net``, as ``user`` through ``setpriv`` when given
        (created if missing), in ``cwd`` (default: ``job_dir(user)``). Raises SlurmCommandError
        on a non-zero exit when ``check``.
        """
        ns = netns_path(netns or self.controller_netns)
        argv = ["nsenter", f"--net={ns}", "--"]
        run_env = {"PATH": SYS_PATH, "LANG": "C.UTF-8", "SLURM_CONF": str(self.conf_path)}
        if user is not None:
            ensure_user(user)
            home = pwd.getpwnam(user).pw_dir
            argv += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--"]
            run_env.update(HOME=home, USER=user, LOGNAME=user)
        else:
            run_env.update(HOME="/root", USER="root", LOGNAME="root")
        run_env.update(env or {})
        argv += list(args)
        r = subprocess.run(
            argv,
            env=run_env,
            cwd=cwd if cwd is not None else self.job_dir(user),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise SlurmCommandError(r.returncode, argv, r.stdout, r.stderr)
        return r

    def sbatch(
        self,
        script: str,
        *args: str,
        user: str | None = None,
        netns: str | None = None,
        cwd: Path | str | None = None,
    ) -> int:
        """Submit ``script`` (its text, starting with #!) with ``sbatch --parsable ARGS``; return the job id.

        The job's working directory (where slurm-%j.out lands) is ``cwd``, default ``job_dir(user)``.
        """
        r = self.run("sbatch", "--parsable", *args, user=user, netns=netns, cwd=cwd, input=script)
        return int(r.stdout.strip().split(";")[0].split("_")[0])

    def cancel(self, job_id: int, *args: str) -> None:
        """``scancel ARGS JOB_ID`` as root."""
        self.run("scancel", *args, str(job_id))

    def job_states(self, job_id: int) -> list[str]:
        """Current states (squeue %T) of the job or of all its array tasks; [] once it is purged."""
        r = self.run("squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%T", check=False)
        if r.returncode != 0:
            if "Invalid job id" in r.stderr:
                return []
            raise SlurmCommandError(r.returncode, ["squeue", "-j", str(job_id)], r.stdout, r.stderr)
        return r.stdout.split()

    def wait_job(self, job_id: int, timeout: float = 60) -> str:
        """Wait until the job (every task, for an array) has left the queue and its epilog has
        finished on every node (no longer COMPLETING); return its final JobState from the
        jobcomp file, e.g. COMPLETED, FAILED, CANCELLED, TIMEOUT, NODE_FAIL.

        For an array, the state of the task whose JobId equals ``job_id`` (see ``wait_array``).
        """
        deadline = time.monotonic() + timeout
        while True:
            states = self.job_states(job_id)
            if not _ACTIVE_JOB_STATES.intersection(states):
                break
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"job {job_id} still {states} after {timeout}s\n"
                    f"{self.run('scontrol', 'show', 'job', str(job_id), check=False).stdout}"
                    f"{self.dump_logs(30)}"
                )
            time.sleep(0.05)
        while True:
            for rec in reversed(self.jobcomp_records()):
                if rec.get("JobId") == str(job_id):
                    return rec["JobState"]
            if time.monotonic() > deadline:
                raise HarnessError(f"job {job_id} left the queue but has no record in {self.jobcomp_path}")
            time.sleep(0.05)

    def wait_array(self, job_id: int, timeout: float = 60) -> dict[int, str]:
        """Wait like ``wait_job`` for array ``job_id``; return {task id: final JobState}."""
        self.wait_job(job_id, timeout)
        out: dict[int, str] = {}
        for rec in self.jobcomp_records():
            if rec.get("ArrayJobId") == str(job_id) and "ArrayTaskId" in rec:
                out[int(rec["ArrayTaskId"])] = rec["JobState"]
        return out

    def jobcomp_records(self) -> list[dict[str, str]]:
        """Every record of the jobcomp/filetxt file, oldest first, as Key -> value."""
        try:
            text = self.jobcomp_path.read_text()
        except FileNotFoundError:
            return []
        return [_parse_kv(line) for line in text.splitlines() if line.strip()]

    def job_info(self, job_id: int) -> dict[str, str]:
        """``scontrol -o show job`` fields of a job still known to slurmctld (first line for arrays)."""
        r = self.run("scontrol", "-o", "show", "job", str(job_id))
        return _parse_kv(r.stdout.splitlines()[0])

    def nodes_info(self) -> dict[str, dict[str, str]]:
        """``scontrol -o show node`` fields of every node, by NodeName."""
        r = self.run("scontrol", "-o", "show", "node", check=False, timeout=10)
        out = {}
        for line in r.stdout.splitlines():
            kv = _parse_kv(line)
            if "NodeName" in kv:
                out[kv["NodeName"]] = kv
        return out

    def node_state(self, name: str) -> str:
        """The node's scontrol State=, e.g. IDLE, ALLOCATED, MIXED, IDLE+DRAIN, DOWN+NOT_RESPONDING."""
        r = self.run("scontrol", "-o", "show", "node", name)
        return _parse_kv(r.stdout)["State"]

    def node_reason(self, name: str) -> str:
        """The node's Reason= (why it is drained or down), or '' if none."""
        r = self.run("scontrol", "-o", "show", "node", name)
        m = re.search(r"\bReason=(.*?)(?: \[|$)", r.stdout.strip())
        return m.group(1) if m else ""

    def resume(self, name: str) -> None:
        """Return a drained or down node to service (``scontrol update nodename=N state=resume``)."""
        self.run("scontrol", "update", f"nodename={name}", "state=resume")

    def wait_node_state(self, name: str, predicate: Callable[[str], bool], timeout: float = 30) -> str:
        """Poll ``node_state(name)`` until ``predicate(state)``; return that state."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.node_state(name)
            if predicate(state):
                return state
            if time.monotonic() > deadline:
                raise HarnessError(f"node {name} still {state} after {timeout}s")
            time.sleep(0.05)


# ---------------------------------------------------------------------- throwaway network


@dataclass
class BridgeLab:
    """Throwaway network namespaces: ``<prefix>-ctl`` with bridge ``br0`` at ``<subnet>.1/24``
    and, per node, ``<prefix>-<node>`` with ``eth0`` at ``<subnet>.(10+i)/24``, veth'd to br0.

    Everything is created inside the namespaces (nothing in the caller's network namespace)
    and ``destroy`` deletes exactly the namespaces whose names it made. Use as a context manager.
    """

    prefix: str
    node_names: Sequence[str] = ("n1", "n2")
    subnet: str = "10.99.0"  # first three octets of the /24
    created: list[str] = field(default_factory=list)

    @property
    def ctl_netns(self) -> str:
        return f"{self.prefix}-ctl"

    @property
    def ctl_addr(self) -> str:
        return f"{self.subnet}.1"

    def node_netns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def node_addr(self, name: str) -> str:
        return f"{self.subnet}.{11 + list(self.node_names).index(name)}"

    def node_specs(self, cpus: int = 4, names: Sequence[str] | None = None) -> list[NodeSpec]:
        """NodeSpecs for ``names`` (default: all nodes of the lab)."""
        return [NodeSpec(n, self.node_netns(n), self.node_addr(n), cpus) for n in (names or self.node_names)]

    @staticmethod
    def _ip(*args: str) -> None:
        r = subprocess.run(["ip", *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise HarnessError(f"ip {' '.join(args)}: {r.stderr.strip()}")

    def create(self) -> BridgeLab:
        try:
            ctl = self.ctl_netns
            self._ip("netns", "add", ctl)
            self.created.append(ctl)
            self._ip("-n", ctl, "link", "set", "lo", "up")
            self._ip("-n", ctl, "link", "add", "br0", "type", "bridge")
            self._ip("-n", ctl, "addr", "add", f"{self.ctl_addr}/24", "dev", "br0")
            self._ip("-n", ctl, "link", "set", "br0", "up")
            for i, name in enumerate(self.node_names):
                ns = self.node_netns(name)
                self._ip("netns", "add", ns)
                self.created.append(ns)
                self._ip("-n", ns, "link", "set", "lo", "up")
                port = f"v{i}-{name}"[:15]
                # Made inside the node namespace, peer placed straight into the controller's.
                self._ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", ctl)
                self._ip("-n", ns, "addr", "add", f"{self.node_addr(name)}/24", "dev", "eth0")
                self._ip("-n", ns, "link", "set", "eth0", "up")
                self._ip("-n", ctl, "link", "set", port, "master", "br0")
                self._ip("-n", ctl, "link", "set", port, "up")
        except BaseException:
            self.destroy()
            raise
        return self

    def destroy(self) -> None:
        """Delete the namespaces this lab made (their veths and bridge go with them); idempotent."""
        errors = []
        for ns in reversed(self.created):
            if netns_path(ns).exists():
                r = subprocess.run(["ip", "netns", "delete", ns], capture_output=True, text=True)
                if r.returncode != 0:
                    errors.append(f"{ns}: {r.stderr.strip()}")
        self.created.clear()
        if errors:
            raise HarnessError("could not delete namespaces: " + "; ".join(errors))

    def __enter__(self) -> BridgeLab:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.destroy()

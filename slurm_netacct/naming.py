"""The one source of names: every kernel object and file derives its name from here."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .errors import SetupError

# SLURM job ids are uint32; 0xfffffffe (NO_VAL) and 0xffffffff (INFINITE) are sentinels.
MAX_JOB_ID = 0xFFFFFFFD
# netacct-doctor --self-test's throwaway job: the largest id the hooks take. SLURM never gives
# it out unless a federation's cluster 63 reaches MaxJobId's limit; its record is deleted
# after the test and never shipped to the ledger.
SELFTEST_JOB_ID = MAX_JOB_ID
IFNAMSIZ = 16  # including the trailing NUL: interface names have at most 15 characters
JOB_IFNAME = "eth0"  # the job's end of the veth pair, inside the job's namespace
NFT_TABLE = "netacct"  # the accounting table inside each job namespace (family inet)
NFT_COUNT_CHAINS = {"out": "count_out", "in": "count_in"}  # its counting chains, per direction
NFT_DNS_CHAINS = ("dns_out", "dns_post")  # its DNS redirect to a loopback resolver (nat)
NODE_NFT_TABLE = "netacct_node"  # the node-side NAT table (one per node, shared by all jobs)
NODE_NFT_CHAINS = ("postrouting", "dns")  # its masquerading and its DNS redirect
IPT_CHAIN_PREFIX = "NETACCT"  # iptables chains: NETACCT_OUT, NETACCT_IN, NETACCT_<CLASS>_<DIR>
# BPF counting on the node's end of a job's veth: the tc filters (classic clsact, cls_bpf) are
# the project's by kind "bpf", this priority and handle ("NA" in ASCII) and these names.
TC_PRIO = TC_HANDLE = 0x4E41
TC_FILTER_NAMES = {"out": "netacct_out", "in": "netacct_in"}
BPF_PIN_DIR = "slurm-netacct"  # in the bpf filesystem (config `bpffs`): one pin a job, root only
# The cgroup engine also pins the job's two programs there, beside its counters, as
# <name>-out and <name>-in (the SPANK plugin attaches them to SLURM's job cgroup).
BPF_PROG_SUFFIXES = {"out": "-out", "in": "-in"}  # bpffs refuses names with a dot
CGROUP_ROOT_NAME = "slurm-netacct"  # the cgroup engine's own subtree in the unified hierarchy

# Files of the running node (tmpfs: gone at boot, as the namespaces they describe are).
RUN_DIR = Path("/run/slurm-netacct")
LOCK_DIR = RUN_DIR / "locks"  # job locks: stripe-<job id mod LOCK_STRIPES>
LOCK_STRIPES = 256
DAEMON_SOCKET = RUN_DIR / "daemon.sock"  # netacct-daemon's; client/netacct-hook.c's DEFAULT_SOCKET
SPOOL_SUFFIX = ".json"  # a spooled record: <node>.<job id>.<restart>.json in spool_dir

_JOB_ID_RE = re.compile(r"[1-9][0-9]{0,9}")
MAX_PREFIX_LEN = 32  # characters of netns_prefix as written (%h counts 2); the C side's NETACCT_PREFIX_MAX
_PREFIX_RE = re.compile(r"(?:[A-Za-z0-9._-]|%h)+")
_NODE_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_IFPREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,3}")
MAX_JOB_ID_DIGITS = 10


def parse_job_id(value: str | int | None) -> int:
    """Return the job id as an int, or raise ValueError with a one-line reason.

    Accepts only canonical decimal (no sign, spaces or leading zeros) in 1..MAX_JOB_ID, so that
    one job has exactly one name and a crafted value can never produce a path.
    """
    if value is None:
        raise ValueError("job id is missing")
    text = str(value)
    if text == "":
        raise ValueError("job id is empty")
    if not _JOB_ID_RE.fullmatch(text):
        raise ValueError(f"job id {text[:40]!r} is not a positive decimal number")
    job = int(text)
    if job > MAX_JOB_ID:
        raise ValueError(f"job id {text} is out of range (1..{MAX_JOB_ID})")
    return job


def valid_netns_prefix(prefix: str) -> bool:
    """True if prefix can start a namespace file name (no '/', no dot-only names).

    '%h' stands for the host's short name (as in slurm.conf): for several slurmd on one
    machine, each in a UTS namespace of its own, which otherwise share /run/netns.
    """
    return (len(prefix) <= MAX_PREFIX_LEN and bool(_PREFIX_RE.fullmatch(prefix))
            and prefix not in {".", ".."})


def valid_host_name(host: str) -> bool:
    """True if host is safe to put into a file name."""
    return bool(_NODE_RE.fullmatch(host)) and host not in {".", ".."}


def short_hostname() -> str:
    """The host name up to its first dot (what the SPANK plugin uses for %h too)."""
    return os.uname().nodename.split(".")[0]


def default_node() -> str:
    """This node's SLURM name for the commands: $SLURMD_NODENAME, else the short host name."""
    return os.environ.get("SLURMD_NODENAME") or short_hostname()


def expand_prefix(prefix: str, host: str | None = None) -> str:
    """The prefix with %h replaced by the host's short name."""
    if "%h" not in prefix:
        return prefix
    host = short_hostname() if host is None else host
    if not valid_host_name(host):
        raise ValueError(f"host name {host[:64]!r} cannot be part of a namespace name")
    return prefix.replace("%h", host)


def valid_ifname_prefix(prefix: str) -> bool:
    """True if prefix + the longest job id + 'h' still fits IFNAMSIZ."""
    return bool(_IFPREFIX_RE.fullmatch(prefix)) and len(prefix) + MAX_JOB_ID_DIGITS < IFNAMSIZ


def netns_name(prefix: str, job_id: int, host: str | None = None) -> str:
    """Name of the job's network namespace (a file under /run/netns)."""
    return f"{expand_prefix(prefix, host)}{job_id}"


def host_ifname(ifname_prefix: str, job_id: int) -> str:
    """Node-side end of the job's veth pair."""
    name = f"{ifname_prefix}{job_id}"
    assert len(name) < IFNAMSIZ, name
    return name


def job_id_from_netns(prefix: str, name: str) -> int | None:
    """Inverse of netns_name: the job id, or None if name is not one of ours."""
    if not name.startswith(prefix):
        return None
    try:
        return parse_job_id(name[len(prefix):])
    except ValueError:
        return None


def job_id_from_ifname(ifname_prefix: str, name: str) -> int | None:
    """Inverse of host_ifname: the job id, or None if name is not one of ours."""
    if not name.startswith(ifname_prefix):
        return None
    try:
        return parse_job_id(name[len(ifname_prefix):])
    except ValueError:
        return None


def counter_name(klass: str, direction: str) -> str:
    """Name of an nft named counter inside the job's table, e.g. lan_out."""
    return f"{klass}_{direction}"


def nft_set(run: int, klass: str, version: int) -> str:
    """Name of the nft set of one run of a class in the job's table, e.g. r0_lan_v4 (runs:
    accounting.match_runs)."""
    return f"r{run}_{klass}_v{version}"


def node_mark(netns_inode: int, ruleset: str) -> Path:
    """The file that says "this node namespace has this node rule set" (cleared at boot)."""
    return RUN_DIR / f"node-{netns_inode}-nat-{hashlib.sha256(ruleset.encode()).hexdigest()[:16]}"


def node_marks_glob(netns_inode: int) -> str:
    """The glob (in RUN_DIR) of the node rule set marks of one node namespace."""
    return f"node-{netns_inode}-nat-*"


def forwarding_mark(netns_inode: int, version: int) -> Path:
    """The file that keeps what IPv4 or IPv6 forwarding of a node namespace was before a
    prolog turned it on (for netacct-reconcile --remove-node; cleared at boot, as the setting)."""
    return RUN_DIR / f"node-{netns_inode}-forwarding-v{version}"


def node_mark_inode(name: str) -> int | None:
    """The node namespace inode a mark of RUN_DIR (node_mark, forwarding_mark) belongs to."""
    parts = name.split("-")
    if len(parts) >= 3 and parts[0] == "node" and parts[1].isdigit() and parts[2] in ("nat", "forwarding"):
        return int(parts[1])
    return None


def lock_path(job_id: int) -> Path:
    """The lock file serialising work on a job (a fixed set: nothing accumulates in /run)."""
    return LOCK_DIR / f"stripe-{job_id % LOCK_STRIPES}"


def spool_token(node: str) -> str:
    """The node's part of a spool file name: the name itself if it is file-name safe."""
    if valid_host_name(node) and "." not in node:
        return node
    return "node-" + hashlib.sha256(node.encode()).hexdigest()[:16]


def spool_name(node: str, job_id: int, restart: int) -> str:
    """The spool file of one run of one job on one node (one file per key)."""
    return f"{spool_token(node)}.{job_id}.{restart}{SPOOL_SUFFIX}"


def bpf_object(job_id: int, what: str) -> str:
    """Name of a BPF map or program of a job as bpftool shows it (at most 15 characters):
    na<job id>_<what>, what one of c (counters), l4, l6 (class tries), o, i (programs)."""
    name = f"na{job_id}_{what}"
    assert len(name) < 16, name
    return name


def bpf_pin(bpffs: Path, netns: str) -> Path:
    """Where a job's counters are pinned: one file a job, named as its namespace."""
    return bpffs / BPF_PIN_DIR / netns


def bpf_prog_pin(bpffs: Path, name: str, direction: str) -> Path:
    """Where the cgroup engine pins one of a job's programs: beside its counters, with the
    direction as suffix (spank/netacct-cgroup.h builds the same path)."""
    return bpffs / BPF_PIN_DIR / f"{name}{BPF_PROG_SUFFIXES[direction]}"


def job_id_from_pin(prefix: str, name: str) -> int | None:
    """Inverse of bpf_pin and bpf_prog_pin: the job id of a pin's file name, or None."""
    for suffix in BPF_PROG_SUFFIXES.values():
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return job_id_from_netns(prefix, name)


def job_cgroup(root: Path, name: str) -> Path:
    """The cgroup engine's own cgroup of a job (mode "own"): <cgroup root>/<name>, name as the
    job's namespace would be called (spank/netacct-cgroup.h builds the same path)."""
    return root / name


def ipt_chain(suffix: str) -> str:
    """iptables chain name (x_tables allows 28 characters)."""
    name = f"{IPT_CHAIN_PREFIX}_{suffix}".upper()
    assert len(name) <= 28, name
    return name


class _NameConfig(Protocol):
    """What JobNames needs of the configuration (config.Config has it)."""

    netns_prefix: str
    netns_dir: Path
    ifname_prefix: str


@dataclass(frozen=True)
class JobNames:
    """Every name of one job's objects on a node, derived in one place."""

    job_id: int
    netns: str  # the namespace's file name in netns_dir
    netns_path: Path
    host_if: str  # the node's end of the job's veth pair

    @classmethod
    def of(cls, cfg: _NameConfig, job_id: int, host: str | None = None) -> "JobNames":
        """The names a prolog gives the job (host: for %h in netns_prefix; default this host's)."""
        try:
            name = netns_name(cfg.netns_prefix, job_id, host)
        except ValueError as exc:
            raise SetupError(str(exc)) from None
        return cls.stored(cfg, job_id, name)

    @classmethod
    def stored(cls, cfg: _NameConfig, job_id: int, netns: str) -> "JobNames":
        """The names of a job whose namespace name the prolog recorded (its %h may differ)."""
        return cls(job_id, netns, cfg.netns_dir / netns, host_ifname(cfg.ifname_prefix, job_id))

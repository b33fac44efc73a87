"""Counting a job's traffic: the interface every way of counting offers, and the one place
that picks a way by name (the configuration's, or the one a job's row recorded)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..config import Config
from ..errors import SetupError
from ..log import get as get_log
from ..naming import JobNames
from ..traffic import Counters

if TYPE_CHECKING:
    from ..node.plan import NodePlan

FIREWALLS = ("nftables", "iptables")
BPF = "bpf"
CGROUP = "cgroup"  # the cgroup engine's (counting/cgroup.py)


@dataclass(frozen=True)
class Counted:
    """A job's counters as its prolog made them: its names, and the classes it counts (in
    counter order), which a later reader must use whatever the configuration says by then."""

    names: JobNames
    classes: tuple[str, ...]

    @property
    def netns(self) -> str:
        return self.names.netns


class Counter(Protocol):
    """What the prolog, the epilog, the sampler and the reaper need of a way of counting."""

    name: str  # recorded with each job run: its counters are read back the same way
    outlives_namespace: bool  # its counters stay readable after the job's namespace is gone

    def install(self, cfg: Config, job: Counted, plan: "NodePlan") -> None:
        """Count the job's traffic from now on (its namespace and link exist; the calling
        thread is in the node's network namespace)."""

    def stop(self, cfg: Config, job: Counted) -> None:
        """Stop counting, before the final read (the epilog); nothing where the job's link,
        set down first, already stops everything."""

    def read(self, cfg: Config, job: Counted) -> Counters:
        """The job's counters now; SetupError if they cannot be read."""

    def read_many(self, cfg: Config, jobs: Sequence[Counted]) -> dict[str, Counters | str]:
        """Many jobs' counters at once, by namespace name; a job that cannot be read maps to
        the reason (one line)."""

    def remove(self, cfg: Config, job: Counted) -> None:
        """Let go of the counters once they are stored (what the namespace does not take
        along); nothing if there is nothing."""


class ReadsInBulk:
    """read() as read_many() of one job, for ways of counting whose bulk read is the primitive."""

    def read_many(self, cfg: Config, jobs: Sequence[Counted]) -> dict[str, Counters | str]:
        raise NotImplementedError

    def stop(self, cfg: Config, job: Counted) -> None:
        """Nothing: the job's link is set down before its counters are read."""

    def read(self, cfg: Config, job: Counted) -> Counters:
        got = self.read_many(cfg, [job])[job.netns]
        if isinstance(got, str):
            raise SetupError(got)
        return got


def firewall(cfg: Config) -> str:
    """The firewall backend the configuration asks for (NAT, the DNS redirect, and netfilter
    counting): `auto` is nftables unless the host's iptables is the legacy variant."""
    if cfg.firewall == "auto":
        from .ipt import host_iptables_is_legacy

        return "iptables" if host_iptables_is_legacy() else "nftables"
    if cfg.firewall not in FIREWALLS:
        raise SetupError(f"config key 'firewall': unknown backend {cfg.firewall!r}")
    return cfg.firewall


def named(name: str | None) -> Counter:
    """The way of counting a job's row names (rows of the first releases name none: nftables)."""
    if name == BPF:
        from .bpf import BpfCounter

        return BpfCounter()
    if name == CGROUP:
        from .cgroup import CgroupCounter

        return CgroupCounter()
    if name == "iptables":
        from .ipt import Iptables

        return Iptables()
    if name in (None, "", "nftables"):
        from .nft import Nftables

        return Nftables()
    raise SetupError(f"counters of a kind this version cannot read ({name!r}) were recorded for the job")


_bpf_missing: str | None = None
_bpf_probed = False


def bpf_unsupported() -> str | None:
    """Why this kernel cannot count with BPF (None: it can); asked once a process."""
    global _bpf_missing, _bpf_probed
    if not _bpf_probed:
        from .bpfcore import probe

        found = probe()
        bad = [f"{k}: {v}" for k, v in found.items() if k in ("lpm_trie", "tc gso_segs") and v != "ok"]
        _bpf_missing = "; ".join(bad) or None
        _bpf_probed = True
    return _bpf_missing


def choose(cfg: Config) -> Counter:
    """The way of counting new jobs use: `counting` = bpf, netfilter (the firewall backend's),
    or auto (bpf if the kernel can, else netfilter, with a warning in the log); with the cgroup
    engine, always its BPF programs on the job's cgroup."""
    if cfg.engine == CGROUP:
        return named(CGROUP)
    if cfg.counting == "netfilter":
        return named(firewall(cfg))
    if cfg.counting == BPF:
        return named(BPF)
    why = bpf_unsupported()
    if why is None:
        return named(BPF)
    get_log().warning("counting: BPF cannot be used on this kernel (%s): netfilter counts offloaded "
                      "super-packets as one packet (README, \"What is counted\")", why)
    return named(firewall(cfg))

"""Counting a job's traffic: the interface every way of counting offers, and the one place
that picks a way by name (the configuration's, or the one a job's row recorded)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from ..config import Config
from ..errors import ConfigError, SetupError
from ..naming import JobNames
from ..traffic import Counters

if TYPE_CHECKING:
    from ..node.plan import NodePlan

BACKENDS = ("nftables", "iptables")


class Counter(Protocol):
    """What the prolog, the epilog, the sampler and the reaper need of a way of counting."""

    name: str  # recorded with each job run: its counters are read back the same way

    def install(self, cfg: Config, job: JobNames, plan: "NodePlan") -> None:
        """Count the job's traffic from now on (its namespace and link exist)."""

    def read(self, cfg: Config, job: JobNames) -> Counters:
        """The job's counters now; SetupError if they cannot be read."""

    def read_many(self, cfg: Config, jobs: Sequence[JobNames]) -> dict[str, Counters | str]:
        """Many jobs' counters at once, by namespace name; a job that cannot be read maps to
        the reason (one line)."""

    def remove(self, job: JobNames) -> None:
        """Let go of the counters once they are stored (what the namespace does not take along)."""


class ReadsInBulk:
    """read() as read_many() of one job, for ways of counting whose bulk read is the primitive."""

    def read_many(self, cfg: Config, jobs: Sequence[JobNames]) -> dict[str, Counters | str]:
        raise NotImplementedError

    def read(self, cfg: Config, job: JobNames) -> Counters:
        got = self.read_many(cfg, [job])[job.netns]
        if isinstance(got, str):
            raise SetupError(got)
        return got


def firewall(cfg: Config) -> str:
    """The firewall backend the configuration asks for: `auto` is nftables unless the host's
    iptables is the legacy variant."""
    if cfg.firewall == "auto":
        from .ipt import host_iptables_is_legacy

        return "iptables" if host_iptables_is_legacy() else "nftables"
    if cfg.firewall not in BACKENDS:
        raise ConfigError(f"config key 'firewall': unknown backend {cfg.firewall!r}")
    return cfg.firewall


def named(name: str | None) -> Counter:
    """The way of counting a job's row names (rows of the first releases name none: nftables)."""
    if name == "iptables":
        from .ipt import Iptables

        return Iptables()
    if name in (None, "", "nftables"):
        from .nft import Nftables

        return Nftables()
    raise SetupError(f"counters of a kind this version cannot read ({name!r}) were recorded for the job")


def choose(cfg: Config) -> Counter:
    """The way of counting new jobs use."""
    return named(firewall(cfg))

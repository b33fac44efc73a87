"""Packet-accounting rules as data: which class a remote address is, in the configured order.

Every way of counting (BPF on the job's link, nftables or iptables in the job's namespace)
is driven by this one description, so that all of them classify alike: the pool first (job
to job), then each class's prefixes in the order listed, the first match wins, and anything
else is the default class.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Config, IPNetwork
from ..traffic import DIRECTIONS

# ICMPv6 link control (neighbour discovery, MLD) is the link's own business, not traffic.
ICMPV6_LINK_TYPES = (130, 131, 132, 133, 134, 135, 136, 137, 143)
ICMPV6_LINK_NAMES = (
    "mld-listener-query", "mld-listener-report", "mld-listener-done", "nd-router-solicit",
    "nd-router-advert", "nd-neighbor-solicit", "nd-neighbor-advert", "nd-redirect",
    "mld2-listener-report",
)


@dataclass(frozen=True)
class Rule:
    """One accounting rule: in `direction`, a remote address in `prefix` counts as `klass`.

    prefix None is the catch-all for the default class (the last rule of each direction).
    """

    direction: str
    klass: str
    prefix: IPNetwork | None


def rules(cfg: Config) -> list[Rule]:
    """The ordered rule list for a configuration: first match wins, default class last."""
    out: list[Rule] = []
    for direction in DIRECTIONS:
        for klass, prefix in cfg.class_prefixes():
            out.append(Rule(direction, klass, prefix))
        out.append(Rule(direction, cfg.default_class, None))
    return out


@dataclass(frozen=True)
class Run:
    """Consecutive prefixes of one class in match order: tested together (one nft set per
    family). A class listed twice in the order (the pool's class: its pool first, its own
    prefixes where the configuration lists them) has one run per place."""

    index: int
    klass: str
    prefixes: tuple[IPNetwork, ...]

    def by_family(self) -> dict[int, list[IPNetwork]]:
        """The run's prefixes per IP version (4 first), only the versions it has."""
        out: dict[int, list[IPNetwork]] = {}
        for p in sorted(self.prefixes, key=lambda p: p.version):
            out.setdefault(p.version, []).append(p)
        return out


def match_runs(cfg: Config) -> list[Run]:
    """The match order of cfg.class_prefixes() as runs of one class each.

    Testing a whole class's prefixes where its first prefix stands would let the class win
    over classes listed between its prefixes (the pool's class, whose pool comes first, over
    every class listed before it): a run keeps each prefix at its own place in the order."""
    runs: list[Run] = []
    for klass, prefix in cfg.class_prefixes():
        if runs and runs[-1].klass == klass:
            runs[-1] = Run(runs[-1].index, klass, runs[-1].prefixes + (prefix,))
        else:
            runs.append(Run(len(runs), klass, (prefix,)))
    return runs



"""Counting in the job's namespace with nftables: a table `inet netacct` with named counters.

A `postrouting` and an `input` hook see every packet a process of the job sends or receives,
whatever its destination, at a per-packet cost that does not depend on how many jobs run on
the node; the job's user has no CAP_NET_ADMIN there and cannot touch them. They count what
the stack hands them: with segmentation offload a TCP "packet" can be a 64 KB super-packet
(README, "What is counted").
"""

from __future__ import annotations

from collections.abc import Sequence

from .. import naming
from ..config import Config
from ..errors import NetacctError
from ..node.plan import NodePlan
from ..traffic import DIRECTIONS, Count, Counters, empty_counters
from . import Counted, ReadsInBulk
from .rules import ICMPV6_LINK_NAMES, match_runs


class Nftables(ReadsInBulk):
    """nftables backend: a table `inet netacct` with named counters in each job namespace."""

    name = "nftables"
    outlives_namespace = False

    def ruleset(self, cfg: Config, plan: NodePlan | None = None, fresh: bool = False) -> str:
        """The job namespace's complete table, as `nft -f` input: replacing any old one, or
        with `fresh` (a namespace just made, no table yet) only creating it.

        The replacing form deletes a table in the same transaction, and the kernel frees
        deleted objects after an RCU grace period that the closing of the netlink socket
        then waits for: 12 ms measured here, against 0.02 ms without a deletion."""
        t = naming.NFT_TABLE
        runs = match_runs(cfg)  # the rules, described once: sets and chains follow them
        lines = [] if fresh else [f"table inet {t} {{}}", f"delete table inet {t}"]
        lines.append(f"table inet {t} {{")
        for run in runs:
            for version, prefixes in run.by_family().items():
                kind = "ipv4_addr" if version == 4 else "ipv6_addr"
                lines.append(f"  set {naming.nft_set(run.index, run.klass, version)} {{ type {kind}; "
                             f"flags interval; auto-merge; elements = {{ {', '.join(map(str, prefixes))} }} }}")
        for klass in cfg.class_names:
            for d in DIRECTIONS:
                lines.append(f"  counter {naming.counter_name(klass, d)} {{ }}")
        link_types = ", ".join(ICMPV6_LINK_NAMES)
        # Outgoing packets are counted in postrouting: after a DNS redirect (below) has
        # re-routed them, so the interface and destination are the ones they leave with.
        for d, hook, ifmatch, field in (("out", "postrouting", "oif", "daddr"), ("in", "input", "iif", "saddr")):
            chain = naming.NFT_COUNT_CHAINS[d]
            lines.append(f"  chain {chain} {{ type filter hook {hook} priority -300; policy accept;")
            lines.append(f'    {ifmatch} "lo" return')
            lines.append(f"    icmpv6 type {{ {link_types} }} return")
            for run in runs:  # first match wins: one set per run of a class, in order
                counter = naming.counter_name(run.klass, d)
                for version in run.by_family():
                    fam = "ip" if version == 4 else "ip6"
                    lines.append(f'    {fam} {field} @{naming.nft_set(run.index, run.klass, version)} '
                                 f'counter name "{counter}" return')
            lines.append(f'    counter name "{naming.counter_name(cfg.default_class, d)}"')
            lines.append("  }")
        if plan is not None:
            lines += dns_chains(plan)
        lines.append("}")
        return "\n".join(lines) + "\n"

    def install(self, cfg: Config, job: Counted, plan: NodePlan) -> None:
        from ..kernel import nftlib

        # setup_job calls this right after creating the namespace: nothing to replace.
        nftlib.run(self.ruleset(cfg, plan, fresh=True), job.names.netns_path)

    def read_many(self, cfg: Config, jobs: Sequence[Counted]) -> dict[str, Counters | str]:
        """read() for many jobs, each namespace joined once (nftread.read_tables), by
        namespace name. A job that cannot be read maps to its error."""
        from ..kernel import nftread

        paths = [j.names.netns_path for j in jobs]
        out: dict[str, Counters | str] = {}
        for job, raw in zip(jobs, nftread.read_tables(paths, naming.NFT_TABLE)):
            path = job.names.netns_path
            keys = [(key, naming.counter_name(*key)) for key in empty_counters(job.classes)]
            if isinstance(raw, OSError):
                out[job.netns] = f"reading counters in {path}: {raw.strerror or raw}"
            elif isinstance(raw, NetacctError):
                out[job.netns] = str(raw)
            else:
                try:
                    out[job.netns] = {key: Count(*raw[name]) for key, name in keys}
                except KeyError as exc:
                    out[job.netns] = f"counter {exc.args[0]} is missing from {path}"
        return out

    def remove(self, cfg: Config, job: Counted) -> None:
        """Nothing: the counters go with the job's namespace."""


def dns_chains(plan: NodePlan) -> list[str]:
    """The job namespace's redirect of DNS queries for the node's loopback resolver to the
    node's end of the link (nat chains of the job's table), if the node has such a resolver."""
    if plan.dns_stub is None:
        return []
    return [
        f"  chain {naming.NFT_DNS_CHAINS[0]} {{ type nat hook output priority -100; policy accept;",
        f"    ip daddr {plan.dns_stub} meta l4proto {{ tcp, udp }} th dport 53 dnat ip to {plan.gateway4}",
        "  }",
        f"  chain {naming.NFT_DNS_CHAINS[1]} {{ type nat hook postrouting priority 100; policy accept;",
        '    oif != "lo" ip saddr 127.0.0.0/8 masquerade',
        "  }",
    ]


def install_dns(job: Counted, plan: NodePlan) -> None:
    """Only the DNS redirect in the job's namespace (when another way counts), if needed."""
    from ..kernel import nftlib

    if plan.dns_stub is not None:
        t = naming.NFT_TABLE
        nftlib.run("\n".join([f"table inet {t} {{", *dns_chains(plan), "}"]) + "\n", job.names.netns_path)

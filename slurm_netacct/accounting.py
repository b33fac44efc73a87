"""Packet-accounting rules, described once as data, installed and read by two backends.

Each job's counters live inside the job's own network namespace: a `postrouting` and an `input`
hook see every packet a process of the job sends or receives, whatever its destination (the
node itself, another job, the LAN, the WAN), at a per-packet cost that does not depend on how
many jobs run on the node. The job's user has no CAP_NET_ADMIN there and cannot touch them.
The node side only forwards and masquerades (one shared NAT rule set for the whole pool).
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from . import naming
from .config import Config, IPNetwork
from .errors import ConfigError, NetacctError, SetupError
from .netns import run_in_netns, setns

DIRECTIONS = ("out", "in")  # out: the job sent it (remote = daddr); in: the job received it
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


@dataclass(frozen=True)
class Count:
    """Packets and bytes of one counter."""

    packets: int = 0
    bytes: int = 0

    def __add__(self, other: "Count") -> "Count":
        return Count(self.packets + other.packets, self.bytes + other.bytes)


Counters = dict[tuple[str, str], Count]  # (class, direction) -> Count


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


def empty_counters(cfg: Config) -> Counters:
    return {(k, d): Count() for k in cfg.class_names for d in DIRECTIONS}


@dataclass(frozen=True)
class NodePlan:
    """What one node's jobs are built from: its pools, uplink, mode and DNS stub."""

    node: str
    uplink: str
    pool4: ipaddress.IPv4Network
    pool6: ipaddress.IPv6Network | None
    dns_stub: ipaddress.IPv4Address | None = None  # the node's loopback resolver, if any

    @property
    def gateway4(self) -> ipaddress.IPv4Address:
        """The node side of every job link on this node (the pool's first address)."""
        return self.pool4[1]


class Backend(Protocol):
    """What the prolog/epilog need from a packet-accounting backend."""

    name: str

    def install(self, cfg: Config, ns_path: Path, plan: NodePlan) -> None: ...  # into a namespace just made
    def read(self, cfg: Config, ns_path: Path) -> Counters: ...
    def read_many(self, cfg: Config, paths: list[Path]) -> dict[Path, Counters | str]: ...
    def install_node(self, cfg: Config, plan: NodePlan) -> None: ...
    def remove_node(self, cfg: Config) -> bool: ...


MARK_DIR = Path("/run/slurm-netacct")


def _netns_id() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def _node_mark(text: str) -> Path:
    """A file that says "this node namespace has this node ruleset" (cleared at boot: /run)."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return MARK_DIR / f"node-{_netns_id()}-{digest}"


def masquerade_exempt(cfg: Config) -> list[IPNetwork]:
    """Destinations that keep the job's own address: none (nat), or in routed mode every IPv4
    prefix of a non-default class and the pool (peers can connect back to the job). IPv6 is
    always masqueraded: SLURM's NodeAddr is IPv4, so there is no next hop to route it by."""
    if cfg.mode != "routed":
        return []
    return [p for p in cfg.routed_prefixes() if p.version == 4]


# --------------------------------------------------------------------------- nftables

class Nftables:
    """nftables backend: a table `inet netacct` with named counters in each job namespace."""

    name = "nftables"

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
        for d, chain, hook, ifmatch, field in (("out", "count_out", "postrouting", "oif", "daddr"),
                                               ("in", "count_in", "input", "iif", "saddr")):
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
        if plan is not None and plan.dns_stub is not None:
            lines += [
                "  chain dns_out { type nat hook output priority -100; policy accept;",
                f"    ip daddr {plan.dns_stub} meta l4proto {{ tcp, udp }} th dport 53 dnat ip to {plan.gateway4}",
                "  }",
                "  chain dns_post { type nat hook postrouting priority 100; policy accept;",
                '    oif != "lo" ip saddr 127.0.0.0/8 masquerade',
                "  }",
            ]
        lines.append("}")
        return "\n".join(lines) + "\n"

    def install(self, cfg: Config, ns_path: Path, plan: NodePlan) -> None:
        from . import nftlib

        # setup_job calls this right after creating the namespace: nothing to replace.
        nftlib.run(self.ruleset(cfg, plan, fresh=True), ns_path)

    def read(self, cfg: Config, ns_path: Path) -> Counters:
        """The job's named counters, straight from netlink (see nftread: ~40 us a job)."""
        got = self.read_many(cfg, [ns_path])[ns_path]
        if isinstance(got, str):
            raise SetupError(got)
        return got

    def read_many(self, cfg: Config, paths: list[Path]) -> dict[Path, Counters | str]:
        """read() for many namespaces, each joined once (nftread.read_tables). A namespace
        that cannot be read maps to its error."""
        from . import nftread

        keys = [(key, naming.counter_name(*key)) for key in empty_counters(cfg)]
        out: dict[Path, Counters | str] = {}
        for path, raw in zip(paths, nftread.read_tables(paths, naming.NFT_TABLE)):
            if isinstance(raw, OSError):
                out[path] = f"reading counters in {path}: {raw.strerror or raw}"
            elif isinstance(raw, NetacctError):
                out[path] = str(raw)
            else:
                try:
                    out[path] = {key: Count(*raw[name]) for key, name in keys}
                except KeyError as exc:
                    out[path] = f"counter {exc.args[0]} is missing from {path}"
        return out

    def node_ruleset(self, cfg: Config, plan: NodePlan) -> str:
        t = naming.NODE_NFT_TABLE
        up = plan.uplink
        exempt4 = [str(p) for p in masquerade_exempt(cfg) if p.version == 4]
        exempt6 = [str(p) for p in masquerade_exempt(cfg) if p.version == 6]
        lines = [f"table inet {t} {{}}", f"delete table inet {t}", f"table inet {t} {{",
                 "  chain postrouting { type nat hook postrouting priority srcnat; policy accept;"]
        if exempt4:
            lines.append(f'    oifname "{up}" ip saddr {plan.pool4} ip daddr {{ {", ".join(exempt4)} }} return')
        lines.append(f'    oifname "{up}" ip saddr {plan.pool4} masquerade')
        if plan.pool6 is not None:
            if exempt6:
                lines.append(f'    oifname "{up}" ip6 saddr {plan.pool6} ip6 daddr {{ {", ".join(exempt6)} }} return')
            lines.append(f'    oifname "{up}" ip6 saddr {plan.pool6} masquerade')
        lines.append("  }")
        if plan.dns_stub is not None:
            lines += [
                "  chain dns { type nat hook prerouting priority dstnat; policy accept;",
                f'    iifname "{cfg.ifname_prefix}*" ip daddr {plan.gateway4} meta l4proto {{ tcp, udp }} '
                f"th dport 53 dnat ip to {plan.dns_stub}",
                "  }",
            ]
        lines.append("}")
        return "\n".join(lines) + "\n"

    def install_node(self, cfg: Config, plan: NodePlan) -> None:
        """Replace the node table, unless this exact ruleset is already in place."""
        from . import nftlib, nftread

        text = self.node_ruleset(cfg, plan)
        mark = _node_mark(text)
        if mark.exists() and nftread.table_exists(naming.NODE_NFT_TABLE):
            return
        nftlib.run(text)
        try:
            mark.parent.mkdir(parents=True, exist_ok=True)
            mark.write_text(text)
        except OSError:
            pass  # only an optimisation: next time the table is rebuilt again

    def remove_node(self, cfg: Config) -> bool:
        from . import nftlib, nftread

        if not nftread.table_exists(naming.NODE_NFT_TABLE):
            return False
        nftlib.run(f"delete table inet {naming.NODE_NFT_TABLE}\n")
        for mark in MARK_DIR.glob(f"node-{_netns_id()}-*"):
            mark.unlink(missing_ok=True)
        return True


# --------------------------------------------------------------------------- iptables

@contextmanager
def _xtables_lock() -> Iterator[None]:
    """Serialize with iptables(8) and other prologs: libiptc replaces whole tables."""
    fd = os.open("/run/xtables.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _ipt_chain(klass: str, direction: str) -> str:
    return naming.ipt_chain(f"{klass}_{direction}")


def _iptc_family(version: int) -> tuple[type, type]:
    import iptc

    return (iptc.Table, iptc.Rule) if version == 4 else (iptc.Table6, iptc.Rule6)


# python-iptables initialises libxtables for one family per process (extensions of the other
# family are then "not found"), so each function below handles one family and runs in a
# process of its own (run_in_netns forks).

def _ipt_rule(rule_cls: type, target: str, goto: bool = False, **fields: str) -> Any:
    r = rule_cls()
    for key, value in fields.items():
        setattr(r, key, value)
    r.create_target(target, goto=goto)
    return r


def _ipt_install(cfg: Config, version: int, plan: NodePlan) -> None:
    """Runs inside the job namespace: build one family's chains with python-iptables (legacy).

    Counting is in the mangle table: POSTROUTING (after a DNS redirect re-routed the packet)
    and INPUT; each class chain holds exactly one rule, whose counters are the class's.
    """
    import iptc

    table_cls, rule_cls = _iptc_family(version)
    table = table_cls(table_cls.MANGLE)
    table.autocommit = False
    for d, builtin in (("out", "POSTROUTING"), ("in", "INPUT")):
        main = table.create_chain(naming.ipt_chain(d))
        lo = {"out_interface": "lo"} if d == "out" else {"in_interface": "lo"}
        main.append_rule(_ipt_rule(rule_cls, "RETURN", **lo))
        if version == 6:
            for icmp_type in ICMPV6_LINK_TYPES:
                r = rule_cls()
                r.protocol = "58"  # ipv6-icmp (numeric: no /etc/protocols needed)
                m = r.create_match("icmp6")
                m.icmpv6_type = str(icmp_type)
                r.create_target("RETURN")
                main.append_rule(r)
        for klass in cfg.class_names:
            table.create_chain(_ipt_chain(klass, d)).append_rule(_ipt_rule(rule_cls, "RETURN"))
        for r in rules(cfg):  # the same rule list as nftables, first match wins
            if r.direction != d or (r.prefix is not None and r.prefix.version != version):
                continue
            match = {} if r.prefix is None else ({"dst": str(r.prefix)} if d == "out" else {"src": str(r.prefix)})
            main.append_rule(_ipt_rule(rule_cls, _ipt_chain(r.klass, d), goto=True, **match))
        iptc.Chain(table, builtin).insert_rule(_ipt_rule(rule_cls, naming.ipt_chain(d)))
    table.commit()
    if version == 4 and plan.dns_stub is not None:
        nat = table_cls(table_cls.NAT)
        nat.autocommit = False
        out = iptc.Chain(nat, "OUTPUT")
        for proto in ("udp", "tcp"):
            r = rule_cls()
            r.dst = str(plan.dns_stub)
            r.protocol = proto
            r.create_match(proto).dport = "53"
            r.create_target("DNAT").to_destination = str(plan.gateway4)
            out.append_rule(r)
        iptc.Chain(nat, "POSTROUTING").append_rule(
            _ipt_rule(rule_cls, "MASQUERADE", src="127.0.0.0/8", out_interface="!lo"))
        nat.commit()


def _ipt_read(cfg: Config, version: int) -> dict[tuple[str, str], tuple[int, int]]:
    """Runs inside the job namespace: the counting rule of each class chain of one family."""
    import iptc

    result: dict[tuple[str, str], tuple[int, int]] = {}
    table_cls, _ = _iptc_family(version)
    table = table_cls(table_cls.MANGLE)
    table.refresh()
    for klass in cfg.class_names:
        for d in DIRECTIONS:
            name = _ipt_chain(klass, d)
            if not table.is_chain(name):
                raise SetupError(f"iptables chain {name} is missing")
            rules_ = iptc.Chain(table, name).rules
            if len(rules_) != 1:
                raise SetupError(f"iptables chain {name} has {len(rules_)} rules, expected 1")
            pkts, byts = rules_[0].get_counters()
            result[(klass, d)] = (pkts, byts)
    return result


def _ipt_read_many(cfg: Config, version: int, paths: list[Path]) -> dict[str, Any]:
    """Runs in one child per family: join each namespace in turn and read it (a fresh libiptc
    handle per namespace). {path: counts, or an exception's one-line text}."""
    out: dict[str, Any] = {}
    for path in paths:
        try:
            setns(path)
            out[str(path)] = _ipt_read(cfg, version)
        except Exception as exc:  # noqa: BLE001 - per namespace, reported to the caller
            out[str(path)] = f"{type(exc).__name__}: {exc}"
    return out


def _ipt_node(cfg: Config, plan: NodePlan | None, version: int) -> bool:
    """Runs in the node namespace: (re)build, or with plan None remove, NETACCT_NAT/_DNS."""
    import iptc

    changed = False
    table_cls, rule_cls = _iptc_family(version)
    pool: IPNetwork | None = None
    if plan is not None:
        pool = plan.pool4 if version == 4 else plan.pool6
    chains = (("POSTROUTING", naming.ipt_chain("nat")), ("PREROUTING", naming.ipt_chain("dns")))
    with _xtables_lock():
        table = table_cls(table_cls.NAT)
        table.autocommit = False
        table.refresh()
        for builtin, name in chains:  # remove our chains and the jumps to them, nothing else
            base = iptc.Chain(table, builtin)
            for r in list(base.rules):
                if r.target.name == name:
                    base.delete_rule(r)
                    changed = True
            if table.is_chain(name):
                chain = iptc.Chain(table, name)
                chain.flush()
                chain.delete()
                changed = True
        if plan is not None and pool is not None:
            nat = table.create_chain(naming.ipt_chain("nat"))
            for prefix in masquerade_exempt(cfg):
                if prefix.version == version:
                    nat.append_rule(_ipt_rule(rule_cls, "RETURN", dst=str(prefix)))
            nat.append_rule(_ipt_rule(rule_cls, "MASQUERADE", src=str(pool), out_interface=plan.uplink))
            iptc.Chain(table, "POSTROUTING").insert_rule(_ipt_rule(rule_cls, naming.ipt_chain("nat")))
            if version == 4 and plan.dns_stub is not None:
                dns = table.create_chain(naming.ipt_chain("dns"))
                for proto in ("udp", "tcp"):
                    r = rule_cls()
                    r.in_interface = f"{cfg.ifname_prefix}+"
                    r.dst = str(plan.gateway4)
                    r.protocol = proto
                    r.create_match(proto).dport = "53"
                    r.create_target("DNAT").to_destination = str(plan.dns_stub)
                    dns.append_rule(r)
                iptc.Chain(table, "PREROUTING").insert_rule(_ipt_rule(rule_cls, naming.ipt_chain("dns")))
        table.commit()
        table.refresh()
    return changed


class Iptables:
    """iptables backend (python-iptables, legacy x_tables): chains in each job namespace."""

    name = "iptables"

    def __init__(self) -> None:
        # Import once here (~180 ms); the per-family child processes inherit the module.
        # Importing does not bind libxtables to a family; first use in each child does.
        try:
            import iptc  # noqa: F401
        except (ImportError, OSError) as exc:  # python-iptables loads libip4tc/libxtables now
            raise SetupError("iptables backend unavailable: python-iptables cannot load the "
                             f"iptables libraries (is the iptables package installed?): {exc}") from None

    def install(self, cfg: Config, ns_path: Path, plan: NodePlan) -> None:
        try:
            for version in (4, 6):
                run_in_netns(ns_path, _ipt_install, cfg, version, plan)
        except SetupError:
            raise
        except Exception as exc:  # iptc.IPTCError and friends
            raise SetupError(f"iptables: {exc}") from None

    def read(self, cfg: Config, ns_path: Path) -> Counters:
        try:
            raw = [run_in_netns(ns_path, _ipt_read, cfg, version) for version in (4, 6)]
        except SetupError:
            raise
        except Exception as exc:
            raise SetupError(f"iptables: {exc}") from None
        return {k: Count(raw[0][k][0] + raw[1][k][0], raw[0][k][1] + raw[1][k][1]) for k in raw[0]}

    def read_many(self, cfg: Config, paths: list[Path]) -> dict[Path, Counters | str]:
        """read() for many namespaces with two child processes in all (one per family),
        instead of two per namespace. A namespace that cannot be read maps to its error."""
        try:
            raw = [run_in_netns(None, _ipt_read_many, cfg, version, paths) for version in (4, 6)]
        except Exception as exc:
            raise SetupError(f"iptables: {exc}") from None
        out: dict[Path, Counters | str] = {}
        for path in paths:
            v4, v6 = raw[0][str(path)], raw[1][str(path)]
            if isinstance(v4, str) or isinstance(v6, str):
                out[path] = v4 if isinstance(v4, str) else v6
            else:
                out[path] = {k: Count(v4[k][0] + v6[k][0], v4[k][1] + v6[k][1]) for k in v4}
        return out

    def install_node(self, cfg: Config, plan: NodePlan) -> None:
        try:
            run_in_netns(None, _ipt_node, cfg, plan, 4)
            if plan.pool6 is not None:
                run_in_netns(None, _ipt_node, cfg, plan, 6)
        except Exception as exc:
            raise SetupError(f"iptables NAT: {exc}") from None

    def remove_node(self, cfg: Config) -> bool:
        try:
            return any([run_in_netns(None, _ipt_node, cfg, None, v) for v in (4, 6)])
        except Exception as exc:
            raise SetupError(f"iptables NAT: {exc}") from None


def host_iptables_is_legacy() -> bool:
    """True if the host's iptables(8) is the legacy x_tables variant."""
    path = shutil.which("iptables") or shutil.which("iptables", path="/usr/sbin:/sbin")
    if path is None:
        return False
    real = os.path.basename(os.path.realpath(path))
    if "legacy" in real:
        return True
    if "nft" in real:
        return False
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "legacy" in out


def backend(cfg: Config) -> Backend:
    """The backend the configuration asks for (`auto`: nftables unless iptables is legacy)."""
    choice = cfg.firewall
    if choice == "auto":
        choice = "iptables" if host_iptables_is_legacy() else "nftables"
    if choice == "nftables":
        return Nftables()
    if choice == "iptables":
        return Iptables()
    raise ConfigError(f"config key 'firewall': unknown backend {choice!r}")

"""Packet-accounting rules, described once as data, installed and read by two backends.

Each job's counters live inside the job's own network namespace: an `output` and an `input`
hook see every packet a process of the job sends or receives, whatever its destination (the
node itself, another job, the LAN, the WAN), at a per-packet cost that does not depend on how
many jobs run on the node. The job's user has no CAP_NET_ADMIN there and cannot touch them.
The node side only forwards and masquerades (one shared NAT rule set for the whole pool).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from . import naming
from .config import Config, IPNetwork
from .errors import ConfigError, SetupError
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


def empty_counters(cfg: Config) -> Counters:
    return {(k, d): Count() for k in cfg.class_names for d in DIRECTIONS}


class Backend(Protocol):
    """What the prolog/epilog need from a packet-accounting backend."""

    name: str

    def install(self, cfg: Config, ns_path: Path) -> None: ...
    def read(self, cfg: Config, ns_path: Path) -> Counters: ...
    def install_node(self, cfg: Config, uplink: str) -> None: ...
    def remove_node(self, cfg: Config) -> bool: ...


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        raise SetupError(f"'{name}' is not installed (needed by the {name} backend)")
    return path


def _run(argv: list[str], stdin: str | None = None, ns_path: Path | None = None) -> str:
    """Run a tool, optionally inside a namespace, raising SetupError with its stderr."""
    preexec = (lambda: setns(ns_path)) if ns_path is not None else None
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                              preexec_fn=preexec, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SetupError(f"{argv[0]}: {exc}") from None
    if proc.returncode != 0:
        msg = " ".join(proc.stderr.split())[:300] or f"exit {proc.returncode}"
        raise SetupError(f"{os.path.basename(argv[0])} {' '.join(argv[1:3])}: {msg}")
    return proc.stdout


# --------------------------------------------------------------------------- nftables

class Nftables:
    """nftables backend: a table `inet netacct` with named counters in each job namespace."""

    name = "nftables"

    def ruleset(self, cfg: Config) -> str:
        """The job namespace's complete table, as `nft -f` input (replaces any old one)."""
        t = naming.NFT_TABLE
        lines = [f"table inet {t} {{}}", f"delete table inet {t}", f"table inet {t} {{"]
        by_set: dict[str, list[str]] = {}
        for klass, prefix in cfg.class_prefixes():
            by_set.setdefault(f"{klass}_v{prefix.version}", []).append(str(prefix))
        for set_name, prefixes in by_set.items():
            kind = "ipv4_addr" if set_name.endswith("_v4") else "ipv6_addr"
            lines.append(f"  set {set_name} {{ type {kind}; flags interval; auto-merge; "
                         f"elements = {{ {', '.join(prefixes)} }} }}")
        for klass in cfg.class_names:
            for d in DIRECTIONS:
                lines.append(f"  counter {naming.counter_name(klass, d)} {{ }}")
        link_types = ", ".join(ICMPV6_LINK_NAMES)
        for d, hook, ifmatch, field in (("out", "output", "oif", "daddr"),
                                        ("in", "input", "iif", "saddr")):
            lines.append(f"  chain {hook} {{ type filter hook {hook} priority -300; policy accept;")
            lines.append(f'    {ifmatch} "lo" return')
            lines.append(f"    icmpv6 type {{ {link_types} }} return")
            seen: set[str] = set()
            for klass, prefix in cfg.class_prefixes():
                set_name = f"{klass}_v{prefix.version}"
                if set_name in seen:
                    continue
                seen.add(set_name)
                fam = "ip" if prefix.version == 4 else "ip6"
                lines.append(f'    {fam} {field} @{set_name} counter name "{naming.counter_name(klass, d)}" return')
            lines.append(f'    counter name "{naming.counter_name(cfg.default_class, d)}"')
            lines.append("  }")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def install(self, cfg: Config, ns_path: Path) -> None:
        _run([_tool("nft"), "-f", "-"], stdin=self.ruleset(cfg), ns_path=ns_path)

    def read(self, cfg: Config, ns_path: Path) -> Counters:
        out = _run([_tool("nft"), "-j", "list", "counters", "table", "inet", naming.NFT_TABLE],
                   ns_path=ns_path)
        found: dict[str, Count] = {}
        for item in json.loads(out).get("nftables", []):
            c = item.get("counter")
            if c and c.get("table") == naming.NFT_TABLE:
                found[c["name"]] = Count(int(c["packets"]), int(c["bytes"]))
        counters = empty_counters(cfg)
        for key in counters:
            name = naming.counter_name(*key)
            if name not in found:
                raise SetupError(f"counter {name} is missing from {ns_path}")
            counters[key] = found[name]
        return counters

    def node_ruleset(self, cfg: Config, uplink: str) -> str:
        t = naming.NODE_NFT_TABLE
        lines = [f"table inet {t} {{}}", f"delete table inet {t}", f"table inet {t} {{",
                 "  chain postrouting { type nat hook postrouting priority srcnat; policy accept;",
                 f'    oifname "{uplink}" ip saddr {cfg.pool_ipv4} masquerade']
        if cfg.pool_ipv6 is not None:
            lines.append(f'    oifname "{uplink}" ip6 saddr {cfg.pool_ipv6} masquerade')
        lines += ["  }", "}"]
        return "\n".join(lines) + "\n"

    def install_node(self, cfg: Config, uplink: str) -> None:
        _run([_tool("nft"), "-f", "-"], stdin=self.node_ruleset(cfg, uplink))

    def remove_node(self, cfg: Config) -> bool:
        try:
            _run([_tool("nft"), "delete", "table", "inet", naming.NODE_NFT_TABLE])
        except SetupError as exc:
            if "No such file" in str(exc):
                return False
            raise
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

def _ipt_install(cfg: Config, version: int) -> None:
    """Runs inside the job namespace: build one family's chains with python-iptables (legacy)."""
    import iptc

    table_cls, rule_cls = _iptc_family(version)
    table = table_cls(table_cls.FILTER)
    table.autocommit = False
    for d, builtin in (("out", "OUTPUT"), ("in", "INPUT")):
        main = table.create_chain(naming.ipt_chain(d))
        r = rule_cls()
        if d == "out":
            r.out_interface = "lo"
        else:
            r.in_interface = "lo"
        r.create_target("RETURN")
        main.append_rule(r)
        if version == 6:
            for icmp_type in ICMPV6_LINK_TYPES:
                r = rule_cls()
                r.protocol = "58"  # ipv6-icmp (numeric: no /etc/protocols needed)
                m = r.create_match("icmp6")
                m.icmpv6_type = str(icmp_type)
                r.create_target("RETURN")
                main.append_rule(r)
        for klass in cfg.class_names:
            cchain = table.create_chain(_ipt_chain(klass, d))
            r = rule_cls()
            r.create_target("RETURN")
            cchain.append_rule(r)
        for klass, prefix in cfg.class_prefixes():
            if prefix.version != version:
                continue
            r = rule_cls()
            if d == "out":
                r.dst = str(prefix)
            else:
                r.src = str(prefix)
            r.create_target(_ipt_chain(klass, d), goto=True)
            main.append_rule(r)
        r = rule_cls()
        r.create_target(_ipt_chain(cfg.default_class, d), goto=True)
        main.append_rule(r)
        r = rule_cls()
        r.create_target(naming.ipt_chain(d))
        iptc.Chain(table, builtin).insert_rule(r)
    table.commit()


def _ipt_read(cfg: Config, version: int) -> dict[tuple[str, str], tuple[int, int]]:
    """Runs inside the job namespace: the counting rule of each class chain of one family."""
    import iptc

    result: dict[tuple[str, str], tuple[int, int]] = {}
    table_cls, _ = _iptc_family(version)
    table = table_cls(table_cls.FILTER)
    table.refresh()
    for klass in cfg.class_names:
        for d in DIRECTIONS:
            name = _ipt_chain(klass, d)
            if not table.is_chain(name):
                raise SetupError(f"iptables chain {name} is missing")
            chain = iptc.Chain(table, name)
            rules_ = chain.rules
            if len(rules_) != 1:
                raise SetupError(f"iptables chain {name} has {len(rules_)} rules, expected 1")
            pkts, byts = rules_[0].get_counters()
            old = result.get((klass, d), (0, 0))
            result[(klass, d)] = (old[0] + pkts, old[1] + byts)
    return result


def _ipt_node(cfg: Config, uplink: str | None, version: int) -> bool:
    """Runs in the node namespace: (re)build, or with uplink None remove, NETACCT_NAT."""
    import iptc

    changed = False
    chain_name = naming.ipt_chain("nat")
    table_cls, rule_cls = _iptc_family(version)
    pool: IPNetwork | None = cfg.pool_ipv4 if version == 4 else cfg.pool_ipv6
    with _xtables_lock():
        table = table_cls(table_cls.NAT)
        table.autocommit = False
        table.refresh()
        post = iptc.Chain(table, "POSTROUTING")
        for r in list(post.rules):
            if r.target.name == chain_name:
                post.delete_rule(r)
                changed = True
        if table.is_chain(chain_name):
            chain = iptc.Chain(table, chain_name)
            chain.flush()
            chain.delete()
            changed = True
        if uplink is not None and pool is not None:
            chain = table.create_chain(chain_name)
            r = rule_cls()
            r.src = str(pool)
            r.out_interface = uplink
            r.create_target("MASQUERADE")
            chain.append_rule(r)
            r = rule_cls()
            r.create_target(chain_name)
            post.insert_rule(r)
        table.commit()
        table.refresh()
    return changed


class Iptables:
    """iptables backend (python-iptables, legacy x_tables): chains in each job namespace."""

    name = "iptables"

    def __init__(self) -> None:
        # Import once here (~180 ms); the per-family child processes inherit the module.
        # Importing does not bind libxtables to a family; first use in each child does.
        import iptc  # noqa: F401

    def install(self, cfg: Config, ns_path: Path) -> None:
        try:
            for version in (4, 6):
                run_in_netns(ns_path, _ipt_install, cfg, version)
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

    def install_node(self, cfg: Config, uplink: str) -> None:
        try:
            run_in_netns(None, _ipt_node, cfg, uplink, 4)
            if cfg.pool_ipv6 is not None:
                run_in_netns(None, _ipt_node, cfg, uplink, 6)
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

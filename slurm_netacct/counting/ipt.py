"""Counting in the job's namespace with python-iptables (legacy x_tables), for hosts whose
iptables is the legacy variant: chains NETACCT_<CLASS>_<IN|OUT> with one counting rule each.

Like the nftables way, it counts what the stack hands it (super-packets with offloads on).
python-iptables initialises libxtables for one family per process (extensions of the other
family are then "not found"), so each function below that touches rules handles one family
and runs in a process of its own (run_in_netns forks).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .. import naming
from ..config import Config
from ..errors import SetupError
from ..kernel.netns import run_in_netns, setns
from ..node.plan import NodePlan
from ..traffic import DIRECTIONS, Count, Counters
from . import Counted, ReadsInBulk
from .rules import ICMPV6_LINK_TYPES, rules


@contextmanager
def xtables_lock() -> Iterator[None]:
    """Serialize with iptables(8) and other prologs: libiptc replaces whole tables."""
    fd = os.open("/run/xtables.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _ipt_chain(klass: str, direction: str) -> str:
    return naming.ipt_chain(f"{klass}_{direction}")


def iptc_family(version: int) -> tuple[type, type]:
    import iptc

    return (iptc.Table, iptc.Rule) if version == 4 else (iptc.Table6, iptc.Rule6)


def make_rule(rule_cls: type, target: str, goto: bool = False, **fields: str) -> Any:
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

    table_cls, rule_cls = iptc_family(version)
    table = table_cls(table_cls.MANGLE)
    table.autocommit = False
    for d, builtin in (("out", "POSTROUTING"), ("in", "INPUT")):
        main = table.create_chain(naming.ipt_chain(d))
        lo = {"out_interface": "lo"} if d == "out" else {"in_interface": "lo"}
        main.append_rule(make_rule(rule_cls, "RETURN", **lo))
        if version == 6:
            for icmp_type in ICMPV6_LINK_TYPES:
                r = rule_cls()
                r.protocol = "58"  # ipv6-icmp (numeric: no /etc/protocols needed)
                m = r.create_match("icmp6")
                m.icmpv6_type = str(icmp_type)
                r.create_target("RETURN")
                main.append_rule(r)
        for klass in cfg.class_names:
            table.create_chain(_ipt_chain(klass, d)).append_rule(make_rule(rule_cls, "RETURN"))
        for r in rules(cfg):  # the same rule list as nftables, first match wins
            if r.direction != d or (r.prefix is not None and r.prefix.version != version):
                continue
            match = {} if r.prefix is None else ({"dst": str(r.prefix)} if d == "out" else {"src": str(r.prefix)})
            main.append_rule(make_rule(rule_cls, _ipt_chain(r.klass, d), goto=True, **match))
        iptc.Chain(table, builtin).insert_rule(make_rule(rule_cls, naming.ipt_chain(d)))
    table.commit()
    _ipt_install_dns(version, plan)


def _ipt_install_dns(version: int, plan: NodePlan) -> None:
    """Runs inside the job namespace: the redirect of DNS queries for the node's loopback
    resolver to the node's end of the link (nat OUTPUT and POSTROUTING), if it has one."""
    import iptc

    table_cls, rule_cls = iptc_family(version)
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
            make_rule(rule_cls, "MASQUERADE", src="127.0.0.0/8", out_interface="!lo"))
        nat.commit()


def _ipt_read(classes: tuple[str, ...], version: int) -> dict[tuple[str, str], tuple[int, int]]:
    """Runs inside the job namespace: the counting rule of each class chain of one family."""
    import iptc

    result: dict[tuple[str, str], tuple[int, int]] = {}
    table_cls, _ = iptc_family(version)
    table = table_cls(table_cls.MANGLE)
    table.refresh()
    for klass in classes:
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


def _ipt_read_many(version: int, jobs: list[tuple[Path, tuple[str, ...]]]) -> dict[str, Any]:
    """Runs in one child per family: join each namespace in turn and read its classes (a fresh
    libiptc handle per namespace). {path: counts, or an exception's one-line text}."""
    out: dict[str, Any] = {}
    for path, classes in jobs:
        try:
            setns(path)
            out[str(path)] = _ipt_read(classes, version)
        except Exception as exc:  # noqa: BLE001 - per namespace, reported to the caller
            out[str(path)] = f"{type(exc).__name__}: {exc}"
    return out


class Iptables(ReadsInBulk):
    """iptables backend (python-iptables, legacy x_tables): chains in each job namespace."""

    name = "iptables"
    outlives_namespace = False

    def __init__(self) -> None:
        # Import once here (~180 ms); the per-family child processes inherit the module.
        # Importing does not bind libxtables to a family; first use in each child does.
        try:
            import iptc  # noqa: F401
        except (ImportError, OSError) as exc:  # python-iptables loads libip4tc/libxtables now
            raise SetupError("iptables backend unavailable: python-iptables cannot load the "
                             f"iptables libraries (is the iptables package installed?): {exc}") from None

    def install(self, cfg: Config, job: Counted, plan: NodePlan) -> None:
        try:
            for version in (4, 6):
                run_in_netns(job.names.netns_path, _ipt_install, cfg, version, plan)
        except SetupError:
            raise
        except Exception as exc:  # iptc.IPTCError and friends
            raise SetupError(f"iptables: {exc}") from None

    def read_many(self, cfg: Config, jobs: Sequence[Counted]) -> dict[str, Counters | str]:
        """The counters of many jobs with two child processes in all (one per family, each
        joining one namespace after another), by namespace name. A job that cannot be read
        maps to its error."""
        todo = [(j.names.netns_path, j.classes) for j in jobs]
        try:
            raw = [run_in_netns(None, _ipt_read_many, version, todo) for version in (4, 6)]
        except Exception as exc:
            raise SetupError(f"iptables: {exc}") from None
        out: dict[str, Counters | str] = {}
        for job in jobs:
            v4, v6 = raw[0][str(job.names.netns_path)], raw[1][str(job.names.netns_path)]
            if isinstance(v4, str) or isinstance(v6, str):
                out[job.netns] = v4 if isinstance(v4, str) else v6
            else:
                out[job.netns] = {k: Count(v4[k][0] + v6[k][0], v4[k][1] + v6[k][1]) for k in v4}
        return out

    def remove(self, cfg: Config, job: Counted) -> None:
        """Nothing: the counters go with the job's namespace."""


def install_dns(job: Counted, plan: NodePlan) -> None:
    """Only the DNS redirect in the job's namespace (when another way counts), if needed."""
    if plan.dns_stub is not None:
        try:
            run_in_netns(job.names.netns_path, _ipt_install_dns, 4, plan)
        except Exception as exc:
            raise SetupError(f"iptables: {exc}") from None


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

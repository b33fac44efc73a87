"""The node's side of every job link: masquerading of the job pool and the DNS redirect to a
loopback resolver, one rule set per node shared by all its jobs, in nftables or iptables."""

from __future__ import annotations

import os
from typing import Protocol

from .. import naming
from ..config import Config, IPNetwork
from ..counting import ipt
from ..errors import SetupError
from ..kernel import netns
from ..kernel.netns import run_in_netns
from ..log import get as get_log
from .plan import NodePlan

FORWARDING = {4: "net/ipv4/ip_forward", 6: "net/ipv6/conf/all/forwarding"}


class NodeNat(Protocol):
    """Install (idempotently) or remove the node's rule set."""

    name: str

    def install(self, cfg: Config, plan: NodePlan) -> None: ...
    def remove(self, cfg: Config) -> bool: ...


def _netns_id() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def prune_marks() -> list[str]:
    """Remove the marks (node_mark, forwarding_mark) of node namespaces that no longer exist.

    A node namespace of its own per slurmd (several on one host, or a test's) leaves its marks
    behind when it is deleted; and as the kernel reuses a deleted namespace's inode, a
    leftover mark could describe a new namespace. Run whenever a mark is written. The names
    of the marks removed."""
    try:
        marks = [(p, naming.node_mark_inode(p.name)) for p in naming.RUN_DIR.glob("node-*")]
    except OSError:
        return []
    if not marks:
        return []
    live = netns.live_netns_inodes()
    live.add(_netns_id())
    gone = []
    for path, inode in marks:
        if inode is not None and inode not in live:
            try:
                path.unlink()
                gone.append(path.name)
            except FileNotFoundError:
                pass
            except OSError as exc:
                get_log().info("cannot remove the stale mark %s: %s", path, exc.strerror or exc)
    return gone


def enable_forwarding(ipv6: bool) -> None:
    """Forwarding on, for IPv4 (and IPv6 with an IPv6 pool), as every job's traffic needs it.

    When this is what turns it on, the value it had is kept in RUN_DIR (gone at boot, as the
    setting is), so that `remove_node` can put it back."""
    for version in (4, 6) if ipv6 else (4,):
        old = netns.set_sysctl(FORWARDING[version], "1")
        if old is not None:
            get_log().warning("forwarding (%s) was %s on this node: turned on", FORWARDING[version], old)
            try:
                naming.RUN_DIR.mkdir(parents=True, exist_ok=True)
                prune_marks()
                naming.forwarding_mark(_netns_id(), version).write_text(old)
            except OSError as exc:  # only the uninstall path needs it
                get_log().error("cannot record that forwarding was %s: %s", old, exc.strerror or exc)


def remove_node(cfg: Config) -> list[str]:
    """Undo what the prologs set up on this node: the node rule set (of both firewall
    backends, whichever exist) and forwarding, where a prolog turned it on. What was undone."""
    done = [f"{n.name} node rules" for n in (NftNat(), IptNat()) if n.remove(cfg)]
    for version, name in FORWARDING.items():
        mark = naming.forwarding_mark(_netns_id(), version)
        try:
            old = mark.read_text().strip()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise SetupError(f"cannot read {mark}: {exc.strerror or exc}") from None
        netns.set_sysctl(name, old)
        mark.unlink(missing_ok=True)
        done.append(f"{name} back to {old}")
    return done


def masquerade_exempt(cfg: Config) -> list[IPNetwork]:
    """Destinations that keep the job's own address: none (nat), or in routed mode every IPv4
    prefix of a non-default class and the pool (peers can connect back to the job). IPv6 is
    always masqueraded: SLURM's NodeAddr is IPv4, so there is no next hop to route it by."""
    if cfg.mode != "routed":
        return []
    return [p for p in cfg.routed_prefixes() if p.version == 4]


class NftNat:
    """The node table `inet netacct_node`: a postrouting masquerade and a prerouting DNS redirect."""

    name = "nftables"

    def ruleset(self, cfg: Config, plan: NodePlan) -> str:
        t = naming.NODE_NFT_TABLE
        up = plan.uplink
        exempt4 = [str(p) for p in masquerade_exempt(cfg) if p.version == 4]
        exempt6 = [str(p) for p in masquerade_exempt(cfg) if p.version == 6]
        lines = [f"table inet {t} {{}}", f"delete table inet {t}", f"table inet {t} {{",
                 f"  chain {naming.NODE_NFT_CHAINS[0]} {{ type nat hook postrouting priority srcnat; policy accept;"]
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
                f"  chain {naming.NODE_NFT_CHAINS[1]} {{ type nat hook prerouting priority dstnat; policy accept;",
                f'    iifname "{cfg.ifname_prefix}*" ip daddr {plan.gateway4} meta l4proto {{ tcp, udp }} '
                f"th dport 53 dnat ip to {plan.dns_stub}",
                "  }",
            ]
        lines.append("}")
        return "\n".join(lines) + "\n"

    def install(self, cfg: Config, plan: NodePlan) -> None:
        """Replace the node table, unless this exact ruleset is already in place.

        Its mark (a file in RUN_DIR named after the ruleset) says so; installing a ruleset
        removes the marks of every other one of this node, so that a mark never outlives the
        table it describes (a job with another pool or DNS stub replaced it meanwhile)."""
        from ..kernel import nftlib, nftread

        text = self.ruleset(cfg, plan)
        mark = naming.node_mark(_netns_id(), text)
        if mark.exists() and nftread.table_exists(naming.NODE_NFT_TABLE):
            return
        for old in naming.RUN_DIR.glob(naming.node_marks_glob(_netns_id())):
            old.unlink(missing_ok=True)
        prune_marks()
        nftlib.run(text)
        try:
            mark.parent.mkdir(parents=True, exist_ok=True)
            mark.write_text(text)
        except OSError as exc:  # only an optimisation: the next prolog rebuilds the table
            get_log().info("cannot write %s (%s): the next job rebuilds the node table", mark, exc.strerror or exc)

    def remove(self, cfg: Config) -> bool:
        from ..kernel import nftlib, nftread

        if not nftread.table_exists(naming.NODE_NFT_TABLE):
            return False
        nftlib.run(f"delete table inet {naming.NODE_NFT_TABLE}\n")
        for mark in naming.RUN_DIR.glob(naming.node_marks_glob(_netns_id())):
            mark.unlink(missing_ok=True)
        return True


def _ipt_node(cfg: Config, plan: NodePlan | None, version: int) -> bool:
    """Runs in the node namespace: (re)build, or with plan None remove, NETACCT_NAT/_DNS."""
    import iptc

    changed = False
    table_cls, rule_cls = ipt.iptc_family(version)
    pool: IPNetwork | None = None
    if plan is not None:
        pool = plan.pool4 if version == 4 else plan.pool6
    chains = (("POSTROUTING", naming.ipt_chain("nat")), ("PREROUTING", naming.ipt_chain("dns")))
    with ipt.xtables_lock():
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
                    nat.append_rule(ipt.make_rule(rule_cls, "RETURN", dst=str(prefix)))
            nat.append_rule(ipt.make_rule(rule_cls, "MASQUERADE", src=str(pool), out_interface=plan.uplink))
            iptc.Chain(table, "POSTROUTING").insert_rule(ipt.make_rule(rule_cls, naming.ipt_chain("nat")))
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
                iptc.Chain(table, "PREROUTING").insert_rule(ipt.make_rule(rule_cls, naming.ipt_chain("dns")))
        table.commit()
        table.refresh()
    return changed


class IptNat:
    """Chains NETACCT_NAT (POSTROUTING) and NETACCT_DNS (PREROUTING) in the nat table."""

    name = "iptables"

    def install(self, cfg: Config, plan: NodePlan) -> None:
        try:
            run_in_netns(None, _ipt_node, cfg, plan, 4)
            if plan.pool6 is not None:
                run_in_netns(None, _ipt_node, cfg, plan, 6)
        except Exception as exc:
            raise SetupError(f"iptables NAT: {exc}") from None

    def remove(self, cfg: Config) -> bool:
        try:
            return any([run_in_netns(None, _ipt_node, cfg, None, v) for v in (4, 6)])
        except Exception as exc:
            raise SetupError(f"iptables NAT: {exc}") from None


def named(name: str) -> NodeNat:
    """The node rule set of a firewall backend ("nftables" or "iptables")."""
    return IptNat() if name == "iptables" else NftNat()

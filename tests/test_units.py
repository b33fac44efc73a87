"""Unit tests: naming, configuration, the rule specification and report arithmetic."""

from __future__ import annotations

import ipaddress
import socket
import sqlite3
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from slurm_netacct import config, naming
from slurm_netacct.counting import rules as accounting
from slurm_netacct.counting.nft import Nftables
from slurm_netacct.node.nat import NftNat
from slurm_netacct.node.plan import NodePlan, addresses, index_range
from slurm_netacct.report import records as report
from slurm_netacct.report.units import human_bytes
from slurm_netacct.store import db as store
from slurm_netacct.store import spool
from slurm_netacct.traffic import FIELDS
from slurm_netacct.errors import ConfigError, PoolExhaustedError
from slurm_netacct.naming import JobNames


# ----------------------------------------------------------------------------- naming

@given(st.integers(min_value=1, max_value=naming.MAX_JOB_ID))
def test_every_valid_job_id_round_trips_and_fits_ifnamsiz(job: int) -> None:
    assert naming.parse_job_id(str(job)) == job
    for prefix in ("na", "nacc"):
        name = naming.host_ifname(prefix, job)
        assert len(name) <= 15
        assert naming.job_id_from_ifname(prefix, name) == job
    assert naming.job_id_from_netns("netacct-", naming.netns_name("netacct-", job)) == job


@given(st.one_of(st.text(max_size=30), st.integers(-10, 2**33).map(str),
                 st.from_regex(r"[ +-]?0*[0-9]{1,11} ?", fullmatch=True)))
def test_parse_job_id_accepts_only_canonical_decimals(text: str) -> None:
    canonical = (text.isascii() and text.isdigit() and not text.startswith("0")
                 and 1 <= int(text) <= naming.MAX_JOB_ID)
    if canonical:
        assert naming.parse_job_id(text) == int(text)
    else:
        with pytest.raises(ValueError):
            naming.parse_job_id(text)


@pytest.mark.parametrize("bad", ["", "0", "00", "01", "-5", "+5", "1e3", "4294967294", "4294967295",
                                 "4294967296", " 1", "1 ", "../1", "१२"])
def test_parse_job_id_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        naming.parse_job_id(bad)


def test_ifname_prefix_must_leave_room_for_ten_digits() -> None:
    assert naming.valid_ifname_prefix("na")
    assert naming.valid_ifname_prefix("abcd")
    assert not naming.valid_ifname_prefix("abcde")
    assert not naming.valid_ifname_prefix("Na")
    assert not naming.valid_ifname_prefix("1a")


def test_job_names_come_from_one_place() -> None:
    cfg = config.parse({"netns_prefix": "acct.", "ifname_prefix": "ja", "netns_dir": "/run/netns"})
    n = JobNames.of(cfg, 4242)
    assert (n.netns, str(n.netns_path), n.host_if) == ("acct.4242", "/run/netns/acct.4242", "ja4242")


# ----------------------------------------------------------------------------- config

def test_defaults_match_the_documented_contract() -> None:
    cfg = config.load("/dev/null")
    assert cfg.uplink is None
    assert cfg.netns_prefix == "netacct-"
    assert cfg.db == Path("/var/lib/slurm-netacct/netacct.db")
    assert cfg.default_class == "wan"
    assert cfg.firewall == "auto"
    assert cfg.pool_ipv4 == ipaddress.ip_network("100.64.0.0/16")
    assert cfg.pool_ipv6 is None
    assert [str(p) for p in cfg.classes["lan"]] == ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]
    assert cfg.class_names == ["lan", "wan"]


def test_full_example_parses(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("""
uplink = "eth1"
netns_prefix = "acct-"
db = "/srv/netacct.db"
default_class = "internet"
firewall = "iptables"
[pool]
ipv4 = "100.65.0.0/20"
ipv6 = "fd00:1::/64"
[classes]
campus = ["10.0.0.0/8", "fd00::/8"]
partner = ["192.0.2.0/24"]
""")
    cfg = config.load(p)
    assert cfg.class_names == ["campus", "partner", "internet"]
    assert cfg.pool_class == "campus"  # no "lan" class: job-to-job traffic is the first class


def test_pool_class_defaults_to_lan_and_must_exist(tmp_path: Path) -> None:
    assert config.parse({}).pool_class == "lan"
    assert config.parse({"classes": {}, "default_class": "internet"}).pool_class == "internet"
    with pytest.raises(ConfigError, match="pool.class"):
        config.parse({"classes": {"campus": ["10.0.0.0/8"]}, "pool": {"class": "nope"}})
    cfg = config.parse({"classes": {"campus": ["10.0.0.0/8"]}, "pool": {"class": "campus"}})
    assert cfg.pool_class == "campus"


@pytest.mark.parametrize("data, key", [
    ({"unknown": 1}, "unknown"),
    ({"pool": {"ipv5": "x"}}, "pool.ipv5"),
    ({"pool": {"ipv4": "fd00::/64"}}, "pool.ipv4"),
    ({"pool": {"ipv6": "100.64.0.0/16"}}, "pool.ipv6"),
    ({"pool": {"ipv6": "fd00::/121"}}, "pool.ipv6"),
    ({"pool": {"ipv4": "127.0.0.0/8"}}, "pool.ipv4"),
    ({"classes": {"lan": "10.0.0.0/8"}}, "classes.lan"),
    ({"classes": {"LAN": ["10.0.0.0/8"]}}, "classes.LAN"),
    ({"classes": {"lan": ["10.0.0.0/33"]}}, "classes.lan"),
    ({"classes": {"lan": ["10.0.0.0/8"], "dc": ["100.64.0.0/10"]}}, "pool.ipv4"),
    ({"firewall": "ipfw"}, "firewall"),
    ({"ifname_prefix": "toolong"}, "ifname_prefix"),
    ({"db": "relative/path.db"}, "db"),
    ({"uplink": 5}, "uplink"),
    ({"uplink": "a" * 16}, "uplink"),
    ({"default_class": "Bad Class"}, "default_class"),
    ({"rps_cpus": "0"}, "rps_cpus"),
    ({"rps_cpus": "0,00000000"}, "rps_cpus"),
    ({"rps_cpus": "0x3"}, "rps_cpus"),
    ({"rps_cpus": "FF"}, "rps_cpus"),
    ({"rps_cpus": "1,2"}, "rps_cpus"),
    ({"rps_cpus": "none"}, "rps_cpus"),
    ({"rps_cpus": "all"}, "rps_cpus"),
    ({"rps_cpus": 3}, "rps_cpus"),
    ({"engine": "ebpf"}, "engine"),
    ({"engine": "cgroup", "counting": "netfilter"}, "counting"),
    ({"cgroup": {"mode": "v1"}}, "cgroup.mode"),
    ({"cgroup": {"root": "sys/fs/cgroup/x"}}, "cgroup.root"),
    ({"cgroup": {"root": "/sys/fs/cgroup/unified/../x"}}, "cgroup.root"),
    ({"cgroup": {"rooot": "/x"}}, "cgroup.rooot"),
])
def test_config_errors_name_the_key(data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(data)
    msg = str(info.value)
    assert f"config key '{key}'" in msg and "\n" not in msg


def test_engine_defaults_to_netns_and_cgroup_has_its_table() -> None:
    cfg = config.parse({})
    assert (cfg.engine, cfg.cgroup_mode, cfg.cgroup_root) == ("netns", "auto", None)
    cfg = config.parse({"engine": "cgroup", "cgroup": {"mode": "own", "root": "/sys/fs/cgroup/unified/na"}})
    assert (cfg.engine, cfg.cgroup_mode, str(cfg.cgroup_root)) == ("cgroup", "own", "/sys/fs/cgroup/unified/na")


def test_cgroup_engine_names_come_from_the_job_name() -> None:
    bpffs, root = Path("/sys/fs/bpf"), Path("/sys/fs/cgroup/unified/slurm-netacct")
    assert naming.bpf_prog_pin(bpffs, "netacct-77", "out") == bpffs / "slurm-netacct" / "netacct-77-out"
    assert naming.bpf_prog_pin(bpffs, "netacct-77", "in") == bpffs / "slurm-netacct" / "netacct-77-in"
    assert naming.job_cgroup(root, "netacct-77") == root / "netacct-77"
    for name in ("netacct-77", "netacct-77-out", "netacct-77-in"):
        assert naming.job_id_from_pin("netacct-", name) == 77
    for name in ("netacct-77.out", "netacct-077-in", "other-77-out", "netacct-77-up"):
        assert naming.job_id_from_pin("netacct-", name) is None


def test_rps_cpus_is_a_cpu_mask_or_nothing() -> None:
    assert config.parse({}).rps_cpus == ""
    assert config.parse({"rps_cpus": ""}).rps_cpus == ""
    assert config.parse({"rps_cpus": "1"}).rps_cpus == "1"
    assert config.parse({"rps_cpus": "ff,ffffffff"}).rps_cpus == "ff,ffffffff"


def test_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml")


@given(st.dictionaries(st.text(max_size=12), st.one_of(st.text(max_size=20), st.integers(), st.lists(st.text(max_size=20), max_size=3)), max_size=4))
def test_config_parser_never_crashes(data: dict) -> None:
    try:
        config.parse(data)
    except ConfigError as exc:
        assert "\n" not in str(exc)


# ----------------------------------------------------------------------------- rules

def test_rules_are_ordered_first_match_wins_default_last() -> None:
    cfg = config.parse({"classes": {"campus": ["10.0.0.0/8"], "partner": ["10.1.0.0/16", "2001:db8::/32"]},
                        "pool": {"class": "campus"}})
    out = [r for r in accounting.rules(cfg) if r.direction == "out"]
    assert [(r.klass, str(r.prefix)) for r in out] == [
        ("campus", "100.64.0.0/16"), ("campus", "10.0.0.0/8"), ("partner", "10.1.0.0/16"),
        ("partner", "2001:db8::/32"), ("wan", "None")]


def test_nft_ruleset_has_named_counters_for_every_class_and_direction() -> None:
    cfg = config.parse({"classes": {"lan": ["10.0.0.0/8", "fc00::/7"], "hpc": ["192.0.2.0/24"]},
                        "pool": {"ipv6": "fd00:1::/64"}})
    text = Nftables().ruleset(cfg)
    for name in ("lan_in", "lan_out", "hpc_in", "hpc_out", "wan_in", "wan_out"):
        assert f"counter {name} {{ }}" in text
    assert "set r0_lan_v4 { type ipv4_addr; flags interval; auto-merge; elements = { 100.64.0.0/16, 10.0.0.0/8 } }" in text
    assert "set r0_lan_v6 { type ipv6_addr; flags interval; auto-merge; elements = { fd00:1::/64, fc00::/7 } }" in text
    # first match wins: the lan set is tested before hpc, the default counts what is left
    out_chain = text.split("chain count_out")[1].split("}")[0:]
    body = "}".join(out_chain)
    assert body.index("@r0_lan_v4") < body.index("@r1_hpc_v4") < body.index('counter name "wan_out"')


def test_a_class_listed_before_the_pools_class_keeps_its_place() -> None:
    """The pool's class is tested first for the pool only; its own prefixes where it is listed."""
    cfg = config.parse({"default_class": "internet", "classes": {
        "site": ["10.123.0.10/32", "fd12:3456::10/128"], "lan": ["10.123.0.0/16", "fd12:3456::/48"],
        "backup": ["10.123.0.0/24"]}})
    runs = [(r.klass, [str(p) for p in r.prefixes]) for r in accounting.match_runs(cfg)]
    assert runs == [("lan", ["100.64.0.0/16"]), ("site", ["10.123.0.10/32", "fd12:3456::10/128"]),
                    ("lan", ["10.123.0.0/16", "fd12:3456::/48"]), ("backup", ["10.123.0.0/24"])]
    body = Nftables().ruleset(cfg).split("chain count_out")[1]
    assert (body.index("@r0_lan_v4") < body.index("@r1_site_v4") < body.index("@r1_site_v6")
            < body.index("@r2_lan_v4") < body.index("@r3_backup_v4"))


# ----------------------------------------------------------------------------- addresses

def _plan(cfg: config.Config, node: str = "n1") -> NodePlan:
    pool4, pool6 = cfg.node_pools(node)
    return NodePlan(node=node, uplink="eth0", pool4=pool4, pool6=pool6)


def test_address_indices_skip_network_gateway_broadcast() -> None:
    cfg = config.parse({"pool": {"ipv4": "100.64.0.0/29", "ipv6": "fd00::/120"}})
    plan = _plan(cfg)
    assert index_range(plan) == (2, 6)
    a = addresses(plan, 2)
    assert (str(a.ipv4), str(a.gateway4), str(a.ipv6)) == ("100.64.0.2", "100.64.0.1", "fd00::2")


def test_leases_reuse_the_lowest_free_index_and_run_out(tmp_path: Path) -> None:
    db = store.connect(tmp_path / "n.db")
    assert [store.lease(db, "n1", j, f"ns{j}", 2, 4) for j in (1, 2, 3)] == [2, 3, 4]
    assert store.lease(db, "n1", 2, "ns2", 2, 4) == 3  # idempotent for the same job
    with pytest.raises(PoolExhaustedError):
        store.lease(db, "n1", 9, "ns9", 2, 4)
    assert store.lease(db, "n2", 2, "ns2", 2, 4) == 2  # another node's leases are its own
    store.release(db, "n1", 2)
    assert store.lease(db, "n1", 9, "ns9", 2, 4) == 3


def test_a_lease_is_always_the_lowest_free_index(tmp_path: Path) -> None:
    """Random leases and releases against a model: the gapless fast path and the gap walk
    agree with "lowest free", and a full pool is refused."""
    import random

    rng = random.Random(6)
    db = store.connect(tmp_path / "n.db")
    held: dict[int, int] = {}
    for step in range(1500):
        if held and rng.random() < 0.45:
            job = rng.choice(sorted(held))
            store.release(db, "n1", job)
            del held[job]
            continue
        free = sorted(set(range(2, 41)) - set(held.values()))
        if not free:
            with pytest.raises(PoolExhaustedError):
                store.lease(db, "n1", 10_000 + step, "ns", 2, 40)
            continue
        held[10_000 + step] = store.lease(db, "n1", 10_000 + step, "ns", 2, 40)
        assert held[10_000 + step] == free[0]
    assert store.lease(db, "n2", 1, "ns", 2, 40) == 2  # other nodes' leases do not count


def test_spool_replay_stores_records_and_removes_only_stale_temp_files(tmp_path: Path) -> None:
    import os
    import time

    spool_dir = tmp_path / "spool"
    info = store.JobInfo(job_id=41, node="n1", user="alice")
    traffic = {"wan": {"in_bytes": 7, "out_bytes": 9, "in_packets": 1, "out_packets": 2}}
    spooled = spool.spool_write(spool_dir, spool.spool_record(info, "completed", traffic, None, False,
                                                              tmp_path / "n.db", "disk full"))
    old, new = spool_dir / ".tmp-old.part", spool_dir / ".tmp-new.part"  # a crashed write, and one under way
    old.write_text("")
    new.write_text("")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    db = store.connect(tmp_path / "n.db")
    assert spool.replay_spool(db, spool_dir, "n1") == 1
    assert not spooled.exists() and not old.exists() and new.exists()
    assert db.conn.execute("SELECT out_bytes FROM traffic WHERE job_id = 41").fetchall() == [(9,)]


def test_routed_mode_gives_each_node_its_own_prefix() -> None:
    cfg = config.parse({"mode": "routed", "pool": {"ipv4": "100.64.0.0/16", "ipv6": "fd00:1::/48"},
                        "routed": {"nodes": {"login": 200}}})
    assert [str(p) for p in cfg.node_pools("n1")] == ["100.64.1.0/24", "fd00:1:0:1::/64"]
    assert [str(p) for p in cfg.node_pools("cn0042")] == ["100.64.42.0/24", "fd00:1:0:2a::/64"]
    assert str(cfg.node_pools("login")[0]) == "100.64.200.0/24"
    assert str(_plan(cfg, "n7").gateway4) == "100.64.7.1"
    with pytest.raises(ConfigError, match="no trailing number"):
        cfg.node_pools("head")
    with pytest.raises(ConfigError, match="holds only 256"):
        cfg.node_pools("n256")
    with pytest.raises(ConfigError, match="same index"):
        config.parse({"mode": "routed", "routed": {"nodes": {"a": 1, "b": 1}}})
    # NAT mode: every node uses the whole pool
    assert str(config.parse({}).node_pools("n1")[0]) == "100.64.0.0/16"


def test_routed_mode_masquerades_only_wan_bound_traffic() -> None:
    cfg = config.parse({"mode": "routed"})
    text = NftNat().ruleset(cfg, _plan(cfg, "n3"))
    assert ('oifname "eth0" ip saddr 100.64.3.0/24 ip daddr { 100.64.0.0/16, 10.0.0.0/8, '
            '172.16.0.0/12, 192.168.0.0/16 } return') in text
    assert 'oifname "eth0" ip saddr 100.64.3.0/24 masquerade' in text
    nat = NftNat().ruleset(config.parse({}), _plan(config.parse({})))
    assert "return" not in nat and 'oifname "eth0" ip saddr 100.64.0.0/16 masquerade' in nat


def test_db_path_expands_the_node_name() -> None:
    cfg = config.parse({"db": "/var/lib/netacct/%n.db"})
    assert str(cfg.db_for("n2")) == "/var/lib/netacct/n2.db"


# ----------------------------------------------------------------------------- report

def _make_db(path: Path, node: str, jobs: list[tuple[int, int, str, dict[str, tuple[int, int, int, int]]]]) -> Path:
    db = store.connect(path)
    for job, restart, state, traffic in jobs:
        info = store.JobInfo(job_id=job, node=node, restart=restart, user="alice", account="phys", partition="batch")
        store.record_start(db, info, f"netacct-{job}", "100.64.0.2", None, "nftables")
        if state != "running":
            store.record_end(db, info, state, {k: dict(zip(FIELDS, v)) for k, v in traffic.items()})
    db.close()
    return path


def test_report_sums_nodes_and_ignores_the_same_db_twice(tmp_path: Path) -> None:
    a = _make_db(tmp_path / "a.db", "n1", [(7, 0, "completed", {"lan": (100, 200, 1, 2), "wan": (5, 6, 1, 1)})])
    b = _make_db(tmp_path / "b.db", "n2", [(7, 0, "completed", {"lan": (1000, 2000, 10, 20), "wan": (0, 0, 0, 0)}),
                                           (8, 0, "completed", {"lan": (1, 1, 1, 1), "wan": (0, 0, 0, 0)})])
    copy = tmp_path / "copy-of-a.db"
    copy.write_bytes(a.read_bytes())
    recs = report.load([a, b, a, copy], {7})
    assert len(recs) == 1
    r = recs[0]
    assert r.nodes == ["n1", "n2"]
    assert r.traffic["lan"] == {"in_bytes": 1100, "out_bytes": 2200, "in_packets": 11, "out_packets": 22}
    assert r.traffic["wan"] == {"in_bytes": 5, "out_bytes": 6, "in_packets": 1, "out_packets": 1}
    assert r.per_node["n2"]["lan"]["in_bytes"] == 1000
    assert r.as_json()["job_id"] == "7"


def test_report_state_running_wins_and_has_no_end(tmp_path: Path) -> None:
    a = _make_db(tmp_path / "a.db", "n1", [(9, 0, "completed", {"lan": (1, 1, 1, 1)})])
    b = _make_db(tmp_path / "b.db", "n2", [(9, 0, "running", {})])
    [r] = report.load([a, b])
    assert r.state == "running" and r.end is None


def test_report_sums_restarts_of_a_requeued_job(tmp_path: Path) -> None:
    a = _make_db(tmp_path / "a.db", "n1", [(5, 0, "completed", {"wan": (10, 20, 1, 1)}),
                                           (5, 1, "completed", {"wan": (1, 2, 1, 1)})])
    [r] = report.load([a])
    assert r.traffic["wan"]["in_bytes"] == 11 and r.traffic["wan"]["out_bytes"] == 22


@pytest.mark.parametrize("n, text", [(0, "0"), (1023, "1023"), (1024, "1.00K"), (1536, "1.50K"),
                                     (3 * 1024**2, "3.00M"), (5 * 1024**5, "5.00P")])
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text


def test_report_of_a_broken_db_is_a_store_error(tmp_path: Path) -> None:
    from slurm_netacct.errors import StoreError
    bad = tmp_path / "bad.db"
    bad.write_text("not sqlite")
    with pytest.raises(StoreError):
        report.load([bad])
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    with pytest.raises(StoreError):
        report.load([empty])



class _Kernel:
    """The kernel's side of a netlink socket for link_settings: answers each request with the
    errno of `refuse(request)` and keeps the requests."""

    def __init__(self, refuse: Callable[[bytes], int]) -> None:
        self.refuse = refuse
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)

    def recv(self, size: int) -> bytes:
        code = self.refuse(self.sent[-1])
        return struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", -code) + self.sent[-1][:16]


def _has_af(request: bytes, family: int) -> bool:
    """Whether the request's IFLA_AF_SPEC holds an attribute for this address family."""
    pos = 32  # nlmsghdr + ifinfomsg
    kind_len, kind = struct.unpack_from("=HH", request, pos)
    assert kind & 0x7FFF == 26 and pos + kind_len == len(request)
    pos += 4
    while pos < len(request):
        length, kind = struct.unpack_from("=HH", request, pos)
        if kind & 0x7FFF == family:
            return True
        pos += (length + 3) & ~3
    return False


def test_link_settings_without_ipv6_in_the_kernel() -> None:
    """A kernel booted with ipv6.disable=1 refuses AF_INET6 link attributes (EAFNOSUPPORT):
    there is no link-local address to prevent, and route_localnet is still set alone. Any
    other refusal is an error. (The real requests are checked by test_lifecycle's link-local
    test and test_dns: the links come up without link-local, and DNS to a loopback resolver
    crosses them.)"""
    import errno

    from slurm_netacct.kernel import links as netns

    no_ipv6 = _Kernel(lambda req: errno.EAFNOSUPPORT if _has_af(req, socket.AF_INET6) else 0)
    netns.link_settings(no_ipv6, 7, route_localnet=True)  # type: ignore[arg-type]
    assert [(_has_af(r, socket.AF_INET), _has_af(r, socket.AF_INET6)) for r in no_ipv6.sent] == \
        [(True, True), (True, False)]
    assert all(struct.unpack_from("=i", r, 20)[0] == 7 for r in no_ipv6.sent)  # ifinfomsg.ifi_index
    only_v6 = _Kernel(lambda req: errno.EAFNOSUPPORT)
    netns.link_settings(only_v6, 7, route_localnet=False)  # type: ignore[arg-type]
    assert len(only_v6.sent) == 1 and not _has_af(only_v6.sent[0], socket.AF_INET)
    with pytest.raises(OSError, match="Operation not permitted"):
        netns.link_settings(_Kernel(lambda req: errno.EPERM), 7, route_localnet=False)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- sacct time formats

@pytest.mark.parametrize("now, text, want", [
    # sacct reads -S/-E with parse_time(..., past=1): a date without a year whose month is
    # later than the current one is last year's; any other month (this one included) is this year's.
    ("2026-11-30T12:00:00", "1201", "2025-12-01T00:00:00"),
    ("2026-11-30T12:00:00", "12/01", "2025-12-01T00:00:00"),
    ("2026-11-30T12:00:00", "12.01-08:00", "2025-12-01T08:00:00"),
    ("2026-11-30T12:00:00", "12/1-08:00:30", "2025-12-01T08:00:30"),
    ("2026-11-30T12:00:00", "1130", "2026-11-30T00:00:00"),
    ("2026-11-30T12:00:00", "1115-23:00", "2026-11-15T23:00:00"),
    ("2026-11-10T12:00:00", "1125", "2026-11-25T00:00:00"),  # this month, a later day: this year (as sacct)
    ("2026-11-30T12:00:00", "0105", "2026-01-05T00:00:00"),
    ("2026-11-30T12:00:00", "120126", "2026-12-01T00:00:00"),  # a year given is kept
    ("2026-11-30T12:00:00", "12/01/25", "2025-12-01T00:00:00"),
    ("2027-01-02T00:30:00", "1231", "2026-12-31T00:00:00"),
    ("2027-01-02T00:30:00", "12.31-23:59:59", "2026-12-31T23:59:59"),
    ("2027-01-02T00:30:00", "0102", "2027-01-02T00:00:00"),
    ("2027-01-02T00:30:00", "0103", "2027-01-03T00:00:00"),
    ("2026-12-31T23:59:00", "1231", "2026-12-31T00:00:00"),
    ("2026-12-31T23:59:00", "0101", "2026-01-01T00:00:00"),
    ("2026-12-31T23:59:00", "23:59:30", "2026-12-31T23:59:30"),  # a time alone: today, even if later
])
def test_dates_without_a_year_follow_sacct(now: str, text: str, want: str) -> None:
    """Was: always the current year (`-S 1201` on 2026-11-30 meant tomorrow's date)."""
    from datetime import datetime

    from slurm_netacct.report import timeparse
    assert timeparse.parse(text, datetime.fromisoformat(now)) == datetime.fromisoformat(want)

"""The BPF counting core: first match as LPM entries (pure, hypothesis), the kernel's LPM lookup
of them, the generated programs run on hand-built frames (BPF_PROG_TEST_RUN), pinning, tc
attachment, and what the job's (unprivileged) user can do with any of it: nothing.

The kernel tests need root; the cgroup_skb ones make a network namespace with a veth pair of
their own (a test run's device must not be loopback, which the cgroup program skips), the tc
ones another, and the pinning ones a bpf filesystem of their own; all removed again.
"""

from __future__ import annotations

import ipaddress
import os
import struct
import errno
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import packets as P
from conftest import TAG
from slurm_netacct.counting import bpfcore as core
from slurm_netacct.counting.bpfcore import Attach, ClassTable
from slurm_netacct.kernel import bpf, tc
from slurm_netacct.traffic import Count

# --------------------------------------------------------------------------- pure: lpm_entries


def lpm_lookup(entries: dict, addr) -> int | None:
    """What an LPM trie returns: the value of the longest entry containing addr."""
    best = None
    for prefix, klass in entries.items():
        if prefix.version == addr.version and addr in prefix:
            if best is None or prefix.prefixlen > best[0].prefixlen:
                best = (prefix, klass)
    return None if best is None else best[1]


@st.composite
def v4_prefix(draw):
    # a small corner of the address space so that prefixes overlap a lot
    length = draw(st.sampled_from([0, 8, 16, 22, 23, 24, 25, 26, 28, 30, 31, 32]))
    addr = 0x0A000000 | draw(st.integers(0, 0x3FF))
    return ipaddress.ip_network((addr, length), strict=False)


@st.composite
def v6_prefix(draw):
    length = draw(st.sampled_from([0, 32, 48, 64, 118, 120, 121, 124, 127, 128]))
    addr = (0x20010DB8 << 96) | draw(st.integers(0, 0x3FF))
    return ipaddress.ip_network((addr, length), strict=False)


pairs_st = st.lists(st.tuples(st.integers(0, 5), st.one_of(v4_prefix(), v6_prefix())), max_size=12)
addr_st = st.one_of(st.integers(0x0A000000, 0x0A0003FF).map(ipaddress.IPv4Address),
                    st.integers(0x20010DB8 << 96, (0x20010DB8 << 96) | 0x3FF).map(ipaddress.IPv6Address),
                    st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address))


@given(pairs_st, st.lists(addr_st, min_size=1, max_size=20))
@settings(max_examples=400)
def test_lpm_entries_reproduce_first_match(pairs, addrs):
    entries = core.lpm_entries(pairs)
    default = 99
    for a in addrs:
        got = lpm_lookup(entries, a)
        assert (default if got is None else got) == core.first_match(pairs, a, default)


def test_lpm_entries_shadowed_prefix_takes_the_earlier_class():
    n = ipaddress.ip_network
    pairs = [(0, n("198.51.100.0/24")), (1, n("198.51.100.10/32")),  # /32 shadowed by the /24
             (2, n("10.1.0.0/16")), (1, n("10.0.0.0/8")), (3, n("10.1.2.0/24")),  # /24 shadowed
             (3, n("198.51.100.0/24"))]  # a duplicate: the first occurrence decides
    assert core.lpm_entries(pairs) == {
        n("198.51.100.0/24"): 0, n("198.51.100.10/32"): 0,
        n("10.1.0.0/16"): 2, n("10.0.0.0/8"): 1, n("10.1.2.0/24"): 2}


def test_layout_blocks_are_cache_lines():
    for n in range(1, 10):
        lay = core.Layout(n)
        assert lay.block % 64 == 0 and lay.block >= 16 * n + 16
        assert lay.diag("in") + 16 <= lay.value_size


# --------------------------------------------------------------------------- kernel tests

@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (bpf(2))", pytrace=False)


TABLE = ClassTable.build([
    ("pool", "100.64.0.0/16"), ("pool", "fd00:64::/64"),
    ("lan", "198.51.100.0/24"), ("special", "198.51.100.10/32"),  # shadowed: stays lan
    ("lan", "2001:db8:100::/48"), ("campus", "203.0.113.0/25"),
], "wan")
JOB4, JOB6 = "100.64.0.2", "fd00:64::2"


@given(st.lists(st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
                | st.sampled_from(["198.51.100.10", "198.51.100.200", "203.0.113.1", "203.0.113.129",
                                   "100.64.3.3"]).map(ipaddress.IPv4Address), min_size=1, max_size=30))
@settings(max_examples=30, deadline=None)
def test_kernel_lpm_trie_agrees_with_first_match(addrs):
    indexed = [(TABLE.names.index(k), p) for k, p in TABLE.pairs]
    with core.make_lpm(4, TABLE.entries(4), "t_lpm4") as m:
        for a in addrs:
            raw = m.lookup(struct.pack("=I", 32) + a.packed)
            got = TABLE.default_index if raw is None else struct.unpack("=I", raw)[0]
            assert got == core.first_match(indexed, a, TABLE.default_index)


def skb_ctx(gso_segs: int = 0, ifindex: int = 0) -> bytes:
    ctx = bytearray(192)  # sizeof(struct __sk_buff)
    struct.pack_into("=I", ctx, 40, ifindex)
    struct.pack_into("=I", ctx, 164, gso_segs)
    return bytes(ctx)


def cases(direction: str) -> list[tuple[str, bytes, int, str | None, int, int]]:
    """(what, frame, gso_segs, class or None (not counted), packets, IP bytes).

    A test run's frame must fit in one page, so the "super-packets" here are short: the
    program never checks gso_segs against the length, only multiplies the headers."""
    def f4(remote: str, proto: int, l4: bytes, options: int = 0) -> bytes:
        src, dst = (JOB4, remote) if direction == "out" else (remote, JOB4)
        return P.frame4(src, dst, proto, l4, options)

    def f6(remote: str, nh: int, l4: bytes, ext=None) -> bytes:
        src, dst = (JOB6, remote) if direction == "out" else (remote, JOB6)
        return P.frame6(src, dst, nh, l4, ext)

    return [
        ("v4 tcp", f4("198.51.100.7", 6, P.tcp(1000)), 0, "lan", 1, 20 + 32 + 1000),
        ("v4 tcp gso_segs=1", f4("198.51.100.7", 6, P.tcp(1000)), 1, "lan", 1, 1052),
        ("v4 tcp gso 10", f4("198.51.100.7", 6, P.tcp(2000)), 10, "lan", 10, 52 + 2000 + 9 * 52),
        ("v4 opts tcp gso 3", f4("203.0.113.5", 6, P.tcp(3000, 0), 8), 3, "campus", 3, 48 + 3000 + 2 * 48),
        ("v4 udp gso 5", f4("198.51.100.10", 17, P.udp(2000)), 5, "lan", 5, 28 + 2000 + 4 * 28),
        ("v4 udp default", f4("203.0.113.200", 17, P.udp(100)), 0, "wan", 1, 128),
        ("v4 icmp pool", f4("100.64.9.9", 1, bytes(64)), 0, "pool", 1, 84),
        ("v4 other gso", f4("198.51.100.7", 47, bytes(3000)), 4, "lan", 4, 3020 + 3 * 20),
        ("arp", P.arp(), 0, None, 0, 0),
        ("v6 tcp", f6("2001:db8:100::10", 6, P.tcp(500)), 0, "lan", 1, 40 + 32 + 500),
        ("v6 hbh+dst tcp gso 7", f6("2001:db8:100::10", 6, P.tcp(2000), [(0, 8), (60, 16)]), 7,
         "lan", 7, 40 + 24 + 32 + 2000 + 6 * (40 + 24 + 32)),
        ("v6 udp gso 3", f6("2001:db8:200::1", 17, P.udp(3000)), 3, "wan", 3, 48 + 3000 + 2 * 48),
        ("v6 echo", f6("fd00:64::9", 58, P.icmpv6(128)), 0, "pool", 1, 40 + 24),
        ("v6 echo reply", f6("2001:db8:200::1", 58, P.icmpv6(129)), 0, "wan", 1, 64),
        ("v6 neighbour solicit", f6("2001:db8:100::1", 58, P.icmpv6(135)), 0, None, 0, 0),
        ("v6 router advert", f6("2001:db8:100::1", 58, P.icmpv6(134)), 0, None, 0, 0),
        ("v6 mld query 130", f6("2001:db8:100::1", 58, P.icmpv6(130), [(0, 8)]), 0, None, 0, 0),
        ("v6 mldv2 report via hbh", f6("2001:db8:100::1", 58, P.icmpv6(143), [(0, 8)]), 0, None, 0, 0),
        ("v6 icmp 138 counted", f6("2001:db8:100::1", 58, P.icmpv6(138)), 0, "lan", 1, 64),
        ("v6 icmp 1 counted", f6("2001:db8:100::1", 58, P.icmpv6(1)), 0, "lan", 1, 64),
    ]


def run_cases(attach: Attach, atomic: bool, percpu: bool, ifindex: int = 0) -> list[str]:
    """Run every case through a freshly loaded job; the list of mismatches (empty: all good)."""
    bad: list[str] = []
    job = core.create_job(TABLE, attach, 7, percpu=percpu, atomic=atomic)
    try:
        for d in core.DIRECTIONS:
            for what, frame, segs, klass, npk, nby in cases(d):
                before = job.read()
                ret, _ = bpf.prog_test_run(job.progs[d], frame, 1, skb_ctx(segs, ifindex))
                want_ret = 0xFFFFFFFF if attach is Attach.TC else 1
                if ret != want_ret:
                    bad.append(f"{d} {what}: returned {ret:#x}")
                after = job.read()
                for key in after.counts:
                    c0, c1 = before.counts[key], after.counts[key]
                    got = Count(c1.packets - c0.packets, c1.bytes - c0.bytes)
                    want = Count(npk, nby) if key == (klass, d) else Count()
                    if got != want:
                        bad.append(f"{d} {what}: {key} got {got}, want {want}")
                ds = after.skbs[d] - before.skbs[d]
                dg = after.gso_skbs[d] - before.gso_skbs[d]
                if (ds, dg) != ((1 if klass else 0), (1 if klass and segs > 1 else 0)):
                    bad.append(f"{d} {what}: diagnostics skbs {ds} gso {dg}")
    finally:
        job.close()
    return bad


@pytest.mark.parametrize("atomic,percpu", [(True, False), (False, True), (True, True)])
def test_tc_program_counts_like_the_wire(atomic, percpu):
    assert run_cases(Attach.TC, atomic, percpu) == []


@pytest.fixture(scope="module")
def unit_netns() -> Iterator[str]:
    """A network namespace of our own with a veth pair (index > 1; this kernel has no dummy driver) for cgroup test runs."""
    name = f"{TAG}bpfunit"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "d0", "type", "veth", "peer", "name", "d1"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _cgroup_cases_in(ns: str) -> list[str]:
    from pathlib import Path

    from slurm_netacct.kernel.netns import run_in_netns

    def inner() -> list[str]:
        import socket

        idx = socket.if_nametoindex("d0")  # (sysfs would show the root namespace's links)
        bad = run_cases(Attach.CGROUP, True, False, ifindex=idx)
        # on loopback (ifindex 1, the test run's default device) nothing is counted
        job = core.create_job(TABLE, Attach.CGROUP, 8)
        try:
            bpf.prog_test_run(job.progs["out"], cases("out")[0][1], 1, skb_ctx(0, 0))
            r = job.read()
            if any(c != Count() for c in r.counts.values()):
                bad.append(f"loopback was counted: {r.counts}")
        finally:
            job.close()
        return bad

    return run_in_netns(Path(f"/run/netns/{ns}"), inner)


def test_cgroup_program_counts_like_the_wire(unit_netns):
    assert _cgroup_cases_in(unit_netns) == []


def test_verifier_refusal_carries_the_log():
    from slurm_netacct.kernel.bpfasm import Asm

    a = Asm()
    a.exit()  # r0 never set: "R0 !read_ok"
    with pytest.raises(bpf.ProgLoadError) as info:
        bpf.prog_load(bpf.PROG_SCHED_CLS, a.assemble(), "t_bad")
    assert "R0 !read_ok" in str(info.value) and info.value.errno == 13
    assert "\n" not in str(info.value) and "R0" in info.value.log


# --------------------------------------------------------------------------- pins

@pytest.fixture()
def bpffs() -> Iterator[Path]:
    """A bpf filesystem of the test's own."""
    d = Path(f"/run/netacct-{TAG}bpftest")
    d.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "bpf", "-o", "mode=0700", "bpf", str(d)], check=True)
    try:
        yield d
    finally:
        for f in d.glob("*_counters"):
            f.unlink()
        subprocess.run(["umount", str(d)], check=True)
        d.rmdir()


PIN_TABLE = ClassTable.build([("lan", "198.51.100.0/24")], "wan")


def _count(job: core.JobCore, n: int) -> None:
    """Put known values into the counter map (as the programs would)."""
    lay = core.Layout(len(PIN_TABLE.names))
    value = bytearray(lay.value_size)
    for i, d in enumerate(core.DIRECTIONS):
        base = lay.base(d) + PIN_TABLE.names.index("lan") * 16
        value[base:base + 16] = (n + i).to_bytes(8, "little") + (1000 * n + i).to_bytes(8, "little")
    job.counters.update(b"\0\0\0\0", bytes(value))


def test_pinned_counters_outlive_their_maker_and_read_back(bpffs: Path) -> None:
    paths = []
    for n in range(1, 4):
        job = core.create_job(PIN_TABLE, core.Attach.TC, n)
        _count(job, n)
        p = str(bpffs / f"job{n}_counters")
        bpf.obj_pin(job.counters.fd, p)
        job.close()  # nothing but the pin holds the map now
        paths.append(p)
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600 and os.stat(p).st_uid == 0
    assert stat.S_IMODE(os.stat(bpffs).st_mode) & 0o777 == 0o700  # (bpffs adds the sticky bit)
    one = core.read_pinned(paths[1], PIN_TABLE.names)
    assert one.counts[("lan", "out")] == (2, 2000) and one.counts[("lan", "in")] == (3, 2001)
    many = core.read_pinned_many(paths + [str(bpffs / "job9_counters")], PIN_TABLE.names)
    assert [many[p].counts[("lan", "out")] for p in paths] == [(1, 1000), (2, 2000), (3, 3000)]  # type: ignore[union-attr]
    assert "No such file" in many[str(bpffs / "job9_counters")]  # type: ignore[operator]


def test_job_user_cannot_touch_pins_or_bpf(bpffs: Path) -> None:
    job = core.create_job(PIN_TABLE, core.Attach.TC, 9)
    p = str(bpffs / "jobu_counters")
    bpf.obj_pin(job.counters.fd, p)
    map_id = bpf.map_info(job.counters.fd).id
    job.close()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)  # nobody: no capabilities, like a job's user
        errs = []
        for fn in (lambda: bpf.obj_get(p), lambda: bpf.map_fd_by_id(map_id),
                   lambda: bpf.map_create(bpf.MAP_ARRAY, 4, 8, 1)):
            try:
                fn()
                errs.append(0)
            except OSError as exc:
                errs.append(exc.errno or -1)
        os.write(w, ",".join(map(str, errs)).encode())
        os._exit(0)
    os.close(w)
    got = os.read(r, 100).decode()
    os.waitpid(pid, 0)
    os.close(r)
    codes = [int(x) for x in got.split(",")]
    assert all(c in (errno.EPERM, errno.EACCES) for c in codes), got


def test_decode_percpu_sums_cpus() -> None:
    lay = core.Layout(2)
    names = ("a", "b")
    one = bytearray(lay.value_size)
    one[0:16] = (5).to_bytes(8, "little") + (700).to_bytes(8, "little")
    raw = bytes(one) * 3
    r = core.decode(raw, names, lay.value_size)
    assert r.counts[("a", "out")] == (15, 2100)
    assert core.decode(bytes(one), names).counts[("a", "out")] == (5, 700)


# --------------------------------------------------------------------------- tc

@pytest.fixture()
def tc_netns() -> Iterator[Path]:
    name = f"{TAG}bpftc"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "a0", "type", "veth", "peer", "name", "b0"], check=True)
        yield Path("/run/netns") / name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _ifindex(ns: Path, name: str) -> int:
    out = subprocess.run(["ip", "-n", ns.name, "-o", "link", "show", name], capture_output=True, text=True, check=True)
    return int(out.stdout.split(":")[0])


def test_attach_list_detach_only_ours(tc_netns: Path) -> None:
    netns = tc_netns
    idx = _ifindex(netns, "a0")
    job = core.create_job(PIN_TABLE, core.Attach.TC, 10)
    other = core.create_job(PIN_TABLE, core.Attach.TC, 11)
    try:
        with tc.rtnl(netns) as sock:
            assert tc.attach(sock, idx, job.progs) is True
            # somebody else's filter on the same hook, another priority: must survive us
            sock.send(tc.filter_request(idx, "ingress", other.progs["out"], "foreign", 999, prio=7, handle=1))
            assert tc._acks(sock, {999}) == {999: 0}
            with pytest.raises(tc.TcError, match="File exists"):
                tc.attach(sock, idx, job.progs)  # ours is there already (EXCL)
            ids = {d: bpf.prog_info(fd).id for d, fd in job.progs.items()}
            assert tc.our_programs(sock, idx) == ids
            names = {(f.hook, f.name) for h in ("ingress", "egress") for f in tc.list_filters(sock, idx, h)}
            assert names == {("ingress", "netacct_out"), ("egress", "netacct_in"), ("ingress", "foreign")}
            # the same programs are found again from the filter: prog id -> map ids
            fd = bpf.prog_fd_by_id(ids["out"])
            try:
                assert job.counters.fd >= 0 and bpf.map_info(job.counters.fd).id in bpf.prog_info(fd).map_ids
            finally:
                os.close(fd)
            assert tc.detach(sock, idx) == 2
            assert tc.detach(sock, idx) == 0
            left = [f.name for f in tc.list_filters(sock, idx, "ingress")]
            assert left == ["foreign"]
            assert tc.delete_clsact(sock, idx) is True
            assert tc.list_filters(sock, idx, "ingress") == []
    finally:
        job.close()
        other.close()

"""The BPF counting core: one job's class tries, counter map and counting programs (no compiler:
the programs are generated here instruction by instruction, and loaded through bpf(2)).

Counts what a job sends ("out", remote = destination) and receives ("in", remote = source)
per class of remote address, as the wire carries it: a GSO/GRO super-packet of n segments is
n packets and its IP bytes plus the n-1 extra IP+L4 headers the segments carry on a wire.

The same generator serves two attach points:
  * tc clsact on the node's end of the job's veth (`Attach.TC`): packet data starts at the
    Ethernet header (l3_offset 14); ingress there is the job's "out", egress its "in";
  * cgroup_skb on the job's cgroup2 directory (`Attach.CGROUP`): data starts at the IP header
    (l3_offset 0); egress is "out", ingress "in"; must return 1 (allow).

Classes: the configured (class, prefix) list is ordered and the first match wins. Two LPM
tries (IPv4, IPv6) map a remote address to a class index; lpm_entries() computes entries so
that longest-prefix lookup reproduces first match. A miss is the default class.

Counter map: one ARRAY element per job (key 0), laid out as two direction blocks of whole
cache lines (out, then in; no false sharing between the two directions):
    block[d] = [ (packets, bytes) for each class ] + [ skbs, gso_skbs ]   (u64 each)
`skbs` counts program runs (super-packets), `gso_skbs` those with gso_segs > 1: a cheap
diagnostic that shows whether the link sees merged/unsegmented packets at all.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import os
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .. import naming
from ..config import MAX_CLASSES, Config, IPNetwork
from ..kernel import bpf
from ..kernel.bpfasm import (ADD, AND, B, DW, FN_MAP_LOOKUP_ELEM, FN_SKB_LOAD_BYTES, FP, JEQ, JGT, JNE, LSH,
                             MUL, R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, RSH, SUB, W, Asm)
from ..traffic import DIRECTIONS, Count
from .rules import ICMPV6_LINK_TYPES

# struct __sk_buff offsets (uapi, stable): len 0 (4.1), protocol 16 (4.1), ifindex 40 (4.1),
# gso_segs 164 (5.1)
SKB_LEN, SKB_PROTOCOL, SKB_IFINDEX, SKB_GSO_SEGS = 0, 16, 40, 164
ETH_P_IP_BE, ETH_P_IPV6_BE = socket.htons(0x0800), socket.htons(0x86DD)
IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6 = 6, 17, 58
IPV6_EXT_HEADERS = (0, 43, 60)  # hop-by-hop, routing, destination options (walked)
EXT_HEADERS_MAX = 4  # walked at most this many (an unrolled loop: no bounded-loop support needed)
LOOPBACK_IFINDEX = 1  # the same in every network namespace
TC_ACT_UNSPEC = -1  # "no verdict": the next filter runs, then the packet passes
CACHE_LINE = 64



class Attach(enum.Enum):
    TC = "tc"          # clsact on a veth end; Ethernet header present
    CGROUP = "cgroup"  # cgroup_skb ingress/egress; data starts at the IP header


# --------------------------------------------------------------------------- classes

def lpm_entries(pairs: Sequence[tuple[int, IPNetwork]]) -> dict[IPNetwork, int]:
    """LPM entries (prefix -> class index) equivalent to first match over `pairs`.

    pairs: (class index, prefix) in configured order, first match wins. The entry for a
    configured prefix q is the class of the earliest configured prefix p that contains q
    (q itself included). Why that suffices: the configured prefixes that contain an address
    a are nested, so they are exactly those that contain the longest of them, q; the earliest
    of those is what first match returns, and q is what the LPM lookup finds.
    Works for one family or both (a prefix never contains one of the other family).
    """
    entries: dict[IPNetwork, int] = {}
    for pos, (_, q) in enumerate(pairs):
        if q in entries:
            continue  # a duplicate: its earlier occurrence decides
        for klass, p in pairs[: pos + 1]:
            if p.version == q.version and q.subnet_of(p):  # type: ignore[arg-type]
                entries[q] = klass
                break
    return entries


def first_match(pairs: Sequence[tuple[int, IPNetwork]], addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
                default: int) -> int:
    """The reference semantics: the class of the first configured prefix containing addr."""
    for klass, p in pairs:
        if p.version == addr.version and addr in p:
            return klass
    return default


@dataclass(frozen=True)
class ClassTable:
    """Class names in counter order (index = position) and the ordered (class, prefix) list."""

    names: tuple[str, ...]
    default: str
    pairs: tuple[tuple[str, IPNetwork], ...]

    @classmethod
    def build(cls, pairs: Sequence[tuple[str, IPNetwork | str]], default: str) -> "ClassTable":
        norm = tuple((k, ipaddress.ip_network(p) if isinstance(p, str) else p) for k, p in pairs)
        names: list[str] = []
        for k, _ in norm:
            if k not in names:
                names.append(k)
        if default not in names:
            names.append(default)
        return cls(tuple(names), default, norm)

    @classmethod
    def from_config(cls, cfg: Config) -> "ClassTable":
        """The configuration's classes: counters in Config.class_names order, matched in
        Config.class_prefixes() order (the pool first)."""
        return cls(tuple(cfg.class_names), cfg.default_class, tuple(cfg.class_prefixes()))

    @property
    def default_index(self) -> int:
        return self.names.index(self.default)

    def entries(self, version: int) -> dict[IPNetwork, int]:
        indexed = [(self.names.index(k), p) for k, p in self.pairs]
        return {p: c for p, c in lpm_entries(indexed).items() if p.version == version}


def lpm_key(prefix: IPNetwork) -> bytes:
    """struct bpf_lpm_trie_key: u32 prefixlen (host order), then the address bytes."""
    return struct.pack("=I", prefix.prefixlen) + prefix.network_address.packed


# --------------------------------------------------------------------------- counter layout

@dataclass(frozen=True)
class Layout:
    """Where each u64 of the counter value lives (see the module docstring)."""

    nclasses: int

    @property
    def block(self) -> int:
        raw = self.nclasses * 16 + 16
        return (raw + CACHE_LINE - 1) // CACHE_LINE * CACHE_LINE

    @property
    def value_size(self) -> int:
        return 2 * self.block

    def base(self, direction: str) -> int:
        return DIRECTIONS.index(direction) * self.block

    def diag(self, direction: str) -> int:
        return self.base(direction) + self.nclasses * 16


@dataclass
class Reading:
    """Decoded counters of one job: (class, direction) -> Count, plus per-direction diagnostics."""

    counts: dict[tuple[str, str], Count] = field(default_factory=dict)
    skbs: dict[str, int] = field(default_factory=dict)
    gso_skbs: dict[str, int] = field(default_factory=dict)


@functools.lru_cache(maxsize=64)
def _plan(names: tuple[str, ...]) -> tuple[str, list[tuple[tuple[str, str], int]], dict[str, int], int]:
    """How to cut a value for these class names: (struct format, [(key, word index)],
    {direction: diagnostic word index}, number of words)."""
    lay = Layout(len(names))
    nwords = lay.value_size // 8
    keys = [((n, d), lay.base(d) // 8 + 2 * i) for d in DIRECTIONS for i, n in enumerate(names)]
    return f"={nwords}Q", keys, {d: lay.diag(d) // 8 for d in DIRECTIONS}, nwords


def decode(raw: bytes, names: Sequence[str], percpu_stride: int = 0) -> Reading:
    """Decode a counter value as MAP_LOOKUP_ELEM returned it. percpu_stride: the per-CPU slot
    size of a PERCPU_ARRAY value (0: a shared ARRAY, one copy)."""
    fmt, keys, diag, nwords = _plan(tuple(names))
    if percpu_stride:
        mv = memoryview(raw).cast("Q")
        step = percpu_stride // 8
        words: Sequence[int] = [sum(mv[i::step]) for i in range(nwords)]
    else:
        words = struct.unpack_from(fmt, raw)
    return Reading({key: Count(words[i], words[i + 1]) for key, i in keys},
                   {d: words[i] for d, i in diag.items()}, {d: words[i + 1] for d, i in diag.items()})


# --------------------------------------------------------------------------- the program

@dataclass(frozen=True)
class ProgSpec:
    """What one counting program is generated for."""

    attach: Attach
    direction: str             # "out" (remote = daddr) or "in" (remote = saddr)
    nclasses: int
    default_index: int
    atomic: bool = True        # lock-add (shared map, or preemptible hooks); False: plain adds
    diagnostics: bool = True   # count skbs and GSO skbs per direction

    @property
    def l3_offset(self) -> int:
        return 14 if self.attach is Attach.TC else 0

    @property
    def verdict(self) -> int:
        return TC_ACT_UNSPEC if self.attach is Attach.TC else 1


# stack frame (offsets from r10)
HDR = -48      # 40 bytes: the IPv4 (20) or IPv6 (40) fixed header
KEY = -72      # 24 bytes: LPM key, u32 prefixlen + 4 or 16 address bytes
SCR = -80      # 8 bytes: scratch for an extension header / TCP offset / ICMPv6 type
ZERO = -88     # u32 0: the counter map's key


def generate(spec: ProgSpec, counters_fd: int, lpm4_fd: int, lpm6_fd: int) -> Asm:
    """The counting program for one direction of one job (map fds baked in as immediates).

    Register use: r6 ctx, r7 class index then counter offset, r8 L3 header length (then the
    per-segment header length), r9 L4 protocol (then the counter value's base pointer).
    """
    L = spec.l3_offset
    lay = Layout(spec.nclasses)
    out_dir = spec.direction == "out"
    a = Asm()

    def load_bytes(off_reg: int | None, off: int, dst: int, size: int, fail: str) -> None:
        """bpf_skb_load_bytes(ctx, off_reg + off, fp + dst, size); on error goto fail."""
        a.mov64_reg(R1, R6)
        if off_reg is None:
            a.mov64_imm(R2, off)
        else:
            a.mov64_reg(R2, off_reg)
            if off:
                a.alu64_imm(ADD, R2, off)
        a.mov64_reg(R3, FP)
        a.alu64_imm(ADD, R3, dst)
        a.mov64_imm(R4, size)
        a.call(FN_SKB_LOAD_BYTES)
        a.jmp_imm(JNE, R0, 0, fail)

    a.mov64_reg(R6, R1)
    if spec.attach is Attach.CGROUP:  # loopback inside the job is not traffic
        a.ldx(W, R1, R6, SKB_IFINDEX)
        a.jmp_imm(JEQ, R1, LOOPBACK_IFINDEX, "pass")
    a.ldx(W, R1, R6, SKB_PROTOCOL)
    a.jmp_imm(JEQ, R1, ETH_P_IP_BE, "ipv4")
    a.jmp_imm(JEQ, R1, ETH_P_IPV6_BE, "ipv6")
    a.ja("pass")  # ARP and anything else that is not IP

    # IPv4: key = {32, daddr|saddr}; r8 = ihl * 4; r9 = protocol
    a.label("ipv4")
    load_bytes(None, L, HDR, 20, "pass")
    a.ldx(W, R1, FP, HDR + (16 if out_dir else 12))
    a.stx(W, FP, R1, KEY + 4)
    a.st(W, FP, KEY, 32)
    a.ldx(B, R8, FP, HDR)
    a.alu64_imm(AND, R8, 0x0F)
    a.alu64_imm(LSH, R8, 2)
    a.ldx(B, R9, FP, HDR + 9)
    a.ld_map_fd(R1, lpm4_fd)
    a.ja("classify")

    # IPv6: key = {128, daddr|saddr}; walk extension headers; skip ICMPv6 link control
    a.label("ipv6")
    load_bytes(None, L, HDR, 40, "pass")
    addr = HDR + (24 if out_dir else 8)
    for i in range(4):
        a.ldx(W, R1, FP, addr + 4 * i)
        a.stx(W, FP, R1, KEY + 4 + 4 * i)
    a.st(W, FP, KEY, 128)
    a.ldx(B, R9, FP, HDR + 6)
    a.mov64_imm(R8, 40)
    for i in range(EXT_HEADERS_MAX):
        for nh in IPV6_EXT_HEADERS:
            a.jmp_imm(JEQ, R9, nh, f"ext{i}")
        a.ja("ext_done")
        a.label(f"ext{i}")
        load_bytes(R8, L, SCR, 2, "v6_classify")  # truncated: count it, as far as we got
        a.ldx(B, R9, FP, SCR)
        a.ldx(B, R1, FP, SCR + 1)
        a.alu64_imm(ADD, R1, 1)
        a.alu64_imm(LSH, R1, 3)
        a.alu64_reg(ADD, R8, R1)
    a.label("ext_done")
    a.jmp_imm(JNE, R9, IPPROTO_ICMPV6, "v6_classify")
    load_bytes(R8, L, SCR, 1, "v6_classify")
    a.ldx(B, R1, FP, SCR)
    for icmp_type in ICMPV6_LINK_TYPES:  # neighbour discovery and MLD: the link's, not traffic
        a.jmp_imm(JEQ, R1, icmp_type, "pass")
    a.label("v6_classify")
    a.ld_map_fd(R1, lpm6_fd)

    # r1 = the family's LPM trie: r7 = class index (the default on a miss)
    a.label("classify")
    a.mov64_reg(R2, FP)
    a.alu64_imm(ADD, R2, KEY)
    a.call(FN_MAP_LOOKUP_ELEM)
    a.mov64_imm(R7, spec.default_index)
    a.jmp_imm(JEQ, R0, 0, "have_class")
    a.ldx(W, R7, R0, 0)
    a.jmp_imm(JGT, R7, spec.nclasses - 1, "bad_class")  # bounds the offset for the verifier
    a.ja("have_class")
    a.label("bad_class")
    a.mov64_imm(R7, spec.default_index)
    a.label("have_class")

    # a super-packet: r8 += the L4 header each segment repeats (TCP: doff * 4; UDP: 8)
    a.ldx(W, R1, R6, SKB_GSO_SEGS)
    a.jmp_imm(JGT, R1, 1, "gso")
    a.ja("count")
    a.label("gso")
    a.jmp_imm(JEQ, R9, IPPROTO_UDP, "udp")
    a.jmp_imm(JNE, R9, IPPROTO_TCP, "count")
    load_bytes(R8, L + 12, SCR, 1, "count")
    a.ldx(B, R1, FP, SCR)
    a.alu64_imm(RSH, R1, 4)
    a.alu64_imm(LSH, R1, 2)
    a.alu64_reg(ADD, R8, R1)
    a.ja("count")
    a.label("udp")
    a.alu64_imm(ADD, R8, 8)

    # the job's counter value: r9 = base, r0 = this (class, direction)'s {packets, bytes}
    a.label("count")
    a.alu64_imm(LSH, R7, 4)
    a.alu64_imm(ADD, R7, lay.base(spec.direction))
    a.st(W, FP, ZERO, 0)
    a.ld_map_fd(R1, counters_fd)
    a.mov64_reg(R2, FP)
    a.alu64_imm(ADD, R2, ZERO)
    a.call(FN_MAP_LOOKUP_ELEM)
    a.jmp_imm(JEQ, R0, 0, "pass")
    a.mov64_reg(R9, R0)
    a.alu64_reg(ADD, R0, R7)
    # r1 = packets, r2 = bytes, r3 = 1 if a super-packet
    a.ldx(W, R1, R6, SKB_GSO_SEGS)
    a.ldx(W, R2, R6, SKB_LEN)
    if L:
        a.alu64_imm(SUB, R2, L)
    a.mov64_imm(R3, 0)
    a.jmp_imm(JGT, R1, 1, "segments")
    a.mov64_imm(R1, 1)
    a.ja("add")
    a.label("segments")
    a.mov64_reg(R3, R1)
    a.alu64_imm(SUB, R3, 1)
    a.alu64_reg(MUL, R3, R8)
    a.alu64_reg(ADD, R2, R3)
    a.mov64_imm(R3, 1)
    a.label("add")

    def add(ptr: int, off: int, reg: int) -> None:
        if spec.atomic:
            a.atomic_add(DW, ptr, reg, off)
        else:
            a.ldx(DW, R5, ptr, off)
            a.alu64_reg(ADD, R5, reg)
            a.stx(DW, ptr, R5, off)

    add(R0, 0, R1)
    add(R0, 8, R2)
    if spec.diagnostics:
        a.mov64_imm(R4, 1)
        add(R9, lay.diag(spec.direction), R4)
        add(R9, lay.diag(spec.direction) + 8, R3)
    a.label("pass")
    a.mov64_imm(R0, spec.verdict)
    a.exit()
    return a


# --------------------------------------------------------------------------- one job's objects

@dataclass
class JobCore:
    """The kernel objects of one job: counter map, two LPM tries, the out and in programs.

    The programs hold references to all three maps; whoever attaches them (a tc filter, a
    cgroup) keeps them alive. Pin the counter map to read it after the maker has exited."""

    table: ClassTable
    counters: bpf.Map
    lpm4: bpf.Map
    lpm6: bpf.Map
    progs: dict[str, int]  # direction -> program fd

    def close(self) -> None:
        for fd in self.progs.values():
            os.close(fd)
        self.progs = {}
        for m in (self.counters, self.lpm4, self.lpm6):
            m.close()

    def read(self) -> Reading:
        return read_map(self.counters, self.table.names)


def make_lpm(version: int, entries: dict[IPNetwork, int], name: str) -> bpf.Map:
    key_size = 4 + (4 if version == 4 else 16)
    m = bpf.map_create(bpf.MAP_LPM_TRIE, key_size, 4, max(1, len(entries)), bpf.BPF_F_NO_PREALLOC, name)
    try:
        for prefix, klass in entries.items():
            m.update(lpm_key(prefix), struct.pack("=I", klass))
    except BaseException:
        m.close()
        raise
    return m


def create_job(table: ClassTable, attach: Attach, job_id: int, percpu: bool = False,
               atomic: bool = True, diagnostics: bool = True) -> JobCore:
    """Create and fill the maps and load both programs for one job, named after it (see
    naming.bpf_object: what `bpftool prog/map show` lists)."""
    lay = Layout(len(table.names))
    made: list[bpf.Map] = []
    progs: dict[str, int] = {}
    try:
        mtype = bpf.MAP_PERCPU_ARRAY if percpu else bpf.MAP_ARRAY
        counters = bpf.map_create(mtype, 4, lay.value_size, 1, 0, naming.bpf_object(job_id, "c"))
        made.append(counters)
        lpm4 = make_lpm(4, table.entries(4), naming.bpf_object(job_id, "l4"))
        made.append(lpm4)
        lpm6 = make_lpm(6, table.entries(6), naming.bpf_object(job_id, "l6"))
        made.append(lpm6)
        for d in DIRECTIONS:
            spec = ProgSpec(attach, d, len(table.names), table.default_index, atomic, diagnostics)
            code = generate(spec, counters.fd, lpm4.fd, lpm6.fd).assemble()
            ptype = bpf.PROG_SCHED_CLS if attach is Attach.TC else bpf.PROG_CGROUP_SKB
            expected = 0
            if attach is Attach.CGROUP:
                expected = bpf.ATTACH_CGROUP_INET_EGRESS if d == "out" else bpf.ATTACH_CGROUP_INET_INGRESS
            progs[d] = bpf.prog_load(ptype, code, naming.bpf_object(job_id, d[0]), "GPL", expected)
    except BaseException:
        for fd in progs.values():
            os.close(fd)
        for m in made:
            m.close()
        raise
    return JobCore(table, counters, lpm4, lpm6, progs)


def read_map(m: bpf.Map, names: Sequence[str]) -> Reading:
    raw = m.lookup(b"\0\0\0\0")
    if raw is None:
        raise bpf.BpfError(2, bpf.BPF_MAP_LOOKUP_ELEM, f"counter map {m.name} has no element 0")
    stride = (m.value_size + 7) & ~7 if m.percpu else 0
    return decode(raw, names, stride)


def read_pinned(path: str, names: Sequence[str]) -> Reading:
    """Read a pinned counter map (opened read-only, closed again)."""
    fd = bpf.obj_get(path, bpf.BPF_F_RDONLY)
    try:
        return read_map(bpf.open_map(fd), names)
    finally:
        os.close(fd)


def read_pinned_many(paths: Sequence[str], names: Sequence[str]) -> dict[str, Reading | str]:
    """read_pinned() for many jobs with one set of preallocated buffers: {path: Reading, or
    the one-line reason it could not be read}. All maps must be shared ARRAYs of this layout
    (the geometry is not asked for each one: that would be a third syscall per job)."""
    opener = bpf.PinOpener(bpf.BPF_F_RDONLY)
    # The kernel copies a whole value, however large the job's map: room for the largest.
    reader = bpf.Reader(b"\0\0\0\0", Layout(MAX_CLASSES).value_size)
    out: dict[str, Reading | str] = {}
    for path in paths:
        try:
            fd = opener.open(path)
        except OSError as exc:
            out[path] = str(exc)
            continue
        try:
            out[path] = decode(reader.lookup(fd), names)
        except OSError as exc:
            out[path] = str(exc)
        finally:
            os.close(fd)
    return out


def probe() -> dict[str, str]:
    """What this kernel supports of what the core needs: {feature: "ok" or the error}. Run it
    at daemon/prolog start to fail with one clear line instead of a verifier log per job."""
    _R0 = R0

    out: dict[str, str] = {}

    def check(name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
            out[name] = "ok"
        except (OSError, ValueError) as exc:
            out[name] = str(exc)

    def lpm() -> None:
        bpf.map_create(bpf.MAP_LPM_TRIE, 8, 4, 1, bpf.BPF_F_NO_PREALLOC, "na_probe").close()

    def gso_segs(ptype: int) -> Callable[[], None]:
        def load() -> None:
            a = Asm()
            a.ldx(W, _R0, R1, SKB_GSO_SEGS)  # __sk_buff.gso_segs: 5.1
            a.mov64_imm(_R0, 1)
            a.exit()
            os.close(bpf.prog_load(ptype, a.assemble(), "na_probe"))
        return load

    check("lpm_trie", lpm)
    check("tc gso_segs", gso_segs(bpf.PROG_SCHED_CLS))
    check("cgroup_skb gso_segs", gso_segs(bpf.PROG_CGROUP_SKB))
    return out

"""A minimal ctypes binding of the bpf(2) system call: maps, program loading, pinning, ids, info,
and the bpf filesystem the pins live in.

Only what the per-job counting core needs, built on the raw syscall (no libbpf, no compiler),
the way systemd's bpf-firewall does it. Every failure raises BpfError, an OSError whose text is
one line: the command, what it was for, and the kernel's errno; a rejected program raises
ProgLoadError, which also carries the verifier's log.

Kernel minimums of what is used here (mainline; RHEL backports most of it to 4.18):
map names and program names 4.15, PROG_QUERY 4.15, cgroup_skb with BPF_F_ALLOW_MULTI 4.15, OBJ_GET/PIN 4.4, GET_FD_BY_ID and OBJ_GET_INFO_BY_FD 4.13,
LPM_TRIE 4.11, BPF_F_RDONLY on OBJ_GET 4.15, MAP_LOOKUP_BATCH 5.6 (optional), BPF_ENABLE_STATS
5.8 (measurement only), run_time_ns/run_cnt in prog info 5.1.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# --------------------------------------------------------------------------- constants

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351}

BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM = 0, 1, 2, 3
BPF_MAP_GET_NEXT_KEY, BPF_PROG_LOAD, BPF_OBJ_PIN, BPF_OBJ_GET = 4, 5, 6, 7
BPF_PROG_ATTACH, BPF_PROG_DETACH, BPF_PROG_TEST_RUN = 8, 9, 10
BPF_PROG_GET_FD_BY_ID, BPF_MAP_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD = 13, 14, 15
BPF_PROG_QUERY = 16
BPF_MAP_LOOKUP_BATCH = 24
BPF_ENABLE_STATS = 32

MAP_ARRAY, MAP_PERCPU_ARRAY, MAP_LPM_TRIE = 2, 6, 11
PROG_SCHED_CLS, PROG_CGROUP_SKB = 3, 8
ATTACH_CGROUP_INET_INGRESS, ATTACH_CGROUP_INET_EGRESS = 0, 1
BPF_F_NO_PREALLOC = 1 << 0
BPF_F_RDONLY, BPF_F_WRONLY = 1 << 3, 1 << 4
BPF_F_ALLOW_MULTI = 1 << 1
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
BPF_STATS_RUN_TIME = 0
OBJ_NAME_LEN = 16

_ATTR_SIZE = 128  # bytes of union bpf_attr we pass (the kernel wants the unused tail zero)
_CMD_NAMES = {
    BPF_MAP_CREATE: "MAP_CREATE", BPF_MAP_LOOKUP_ELEM: "MAP_LOOKUP_ELEM",
    BPF_MAP_UPDATE_ELEM: "MAP_UPDATE_ELEM", BPF_MAP_DELETE_ELEM: "MAP_DELETE_ELEM",
    BPF_PROG_LOAD: "PROG_LOAD", BPF_OBJ_PIN: "OBJ_PIN", BPF_OBJ_GET: "OBJ_GET",
    BPF_PROG_ATTACH: "PROG_ATTACH", BPF_PROG_DETACH: "PROG_DETACH",
    BPF_PROG_TEST_RUN: "PROG_TEST_RUN", BPF_PROG_GET_FD_BY_ID: "PROG_GET_FD_BY_ID",
    BPF_MAP_GET_FD_BY_ID: "MAP_GET_FD_BY_ID", BPF_OBJ_GET_INFO_BY_FD: "OBJ_GET_INFO_BY_FD",
    BPF_MAP_LOOKUP_BATCH: "MAP_LOOKUP_BATCH", BPF_ENABLE_STATS: "ENABLE_STATS",
    BPF_PROG_QUERY: "PROG_QUERY",
}


class BpfError(OSError):
    """A bpf(2) command failed: one line saying which command, for what, and the errno."""

    def __init__(self, err: int, cmd: int, what: str) -> None:
        name = _CMD_NAMES.get(cmd, str(cmd))
        super().__init__(err, f"bpf {name} ({what}): {os.strerror(err)} [{errno.errorcode.get(err, err)}]")
        self.cmd = cmd

    def __str__(self) -> str:
        return str(self.strerror)


class ProgLoadError(BpfError):
    """The kernel refused a program; `log` holds the verifier's full log (may be empty)."""

    def __init__(self, err: int, what: str, log: str) -> None:
        super().__init__(err, BPF_PROG_LOAD, what)
        self.log = log
        lines = [line for line in log.splitlines() if line.strip()]
        if lines:  # the verifier's reason is its last line(s); keep the message one line
            reason = lines[-1] if not lines[-1].startswith("processed ") or len(lines) < 2 else lines[-2]
            self.strerror = f"{self.strerror}: verifier: {reason}"


# --------------------------------------------------------------------------- the system call

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_ulong]
_NR = _SYS_BPF.get(os.uname().machine, 321)


def _addr(buf: ctypes.Array | None) -> int:  # type: ignore[type-arg]
    return 0 if buf is None else ctypes.addressof(buf)


def sys_bpf(cmd: int, attr: ctypes.Array, what: str) -> int:  # type: ignore[type-arg]
    """bpf(cmd, attr); the non-negative result, or BpfError."""
    ret = _syscall(_NR, cmd, ctypes.addressof(attr), len(attr))
    if ret < 0:
        raise BpfError(ctypes.get_errno(), cmd, what)
    return int(ret)


def _attr(fmt: str, *values: object) -> ctypes.Array:  # type: ignore[type-arg]
    buf = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into(fmt, buf, 0, *values)
    return buf


def raise_memlock() -> None:
    """Lift RLIMIT_MEMLOCK: kernels before 5.11 charge BPF maps and programs against it (the
    default 64 KiB allows a handful of jobs); 5.11+ use memory cgroup accounting instead."""
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (ValueError, OSError):
        pass


def possible_cpus() -> int:
    """Number of possible CPUs: the size of a per-CPU map value array (holes included)."""
    text = open("/sys/devices/system/cpu/possible").read().strip()
    last = 0
    for part in text.split(","):
        last = max(last, int(part.split("-")[-1]))
    return last + 1


def _name(name: str) -> bytes:
    raw = name.encode()[: OBJ_NAME_LEN - 1]
    if any(not (chr(c).isalnum() or chr(c) in "_.") for c in raw):
        raise ValueError(f"BPF object name {name!r}: only [A-Za-z0-9_.] allowed")
    return raw


# --------------------------------------------------------------------------- maps

@dataclass
class Map:
    """An open BPF map: its descriptor and geometry. Close it (or use it as a context manager)."""

    fd: int
    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    name: str = ""

    @property
    def percpu(self) -> bool:
        return self.map_type in (MAP_PERCPU_ARRAY,)

    @property
    def value_buf_size(self) -> int:
        """Bytes a lookup returns: per-CPU maps give one 8-aligned slot per possible CPU."""
        if self.percpu:
            return ((self.value_size + 7) & ~7) * possible_cpus()
        return self.value_size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Map":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        update_elem(self.fd, key, value, flags, self.name)

    def lookup(self, key: bytes) -> bytes | None:
        return lookup_elem(self.fd, key, self.value_buf_size, self.name)


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int,
               flags: int = 0, name: str = "") -> Map:
    """BPF_MAP_CREATE; the new map (its fd is close-on-exec, as all bpf fds)."""
    attr = _attr("=IIIIIII16s", map_type, key_size, value_size, max_entries, flags, 0, 0, _name(name))
    fd = sys_bpf(BPF_MAP_CREATE, attr, f"map {name or '?'} type {map_type}")
    return Map(fd, map_type, key_size, value_size, max_entries, name)


def update_elem(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY, what: str = "") -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    sys_bpf(BPF_MAP_UPDATE_ELEM, _attr("=IxxxxQQQ", fd, _addr(k), _addr(v), flags), f"map {what or fd}")


def lookup_elem(fd: int, key: bytes, value_size: int, what: str = "") -> bytes | None:
    """The value of key, or None if there is none (ENOENT)."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    try:
        sys_bpf(BPF_MAP_LOOKUP_ELEM, _attr("=IxxxxQQQ", fd, _addr(k), _addr(v), 0), f"map {what or fd}")
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return v.raw


class Reader:
    """Repeated single-key lookups with preallocated buffers: the hot path of reading many
    jobs' counters (one syscall and no allocation per lookup but the returned bytes)."""

    def __init__(self, key: bytes, value_size: int) -> None:
        self._key = ctypes.create_string_buffer(key, len(key))
        self._val = ctypes.create_string_buffer(value_size)
        self._attr = ctypes.create_string_buffer(32)
        struct.pack_into("=Q", self._attr, 8, ctypes.addressof(self._key))
        struct.pack_into("=Q", self._attr, 16, ctypes.addressof(self._val))
        self._attr_addr = ctypes.addressof(self._attr)
        self._fd_slot = ctypes.c_uint32.from_buffer(self._attr, 0)

    def lookup(self, fd: int) -> bytes:
        self._fd_slot.value = fd
        if _syscall(_NR, BPF_MAP_LOOKUP_ELEM, self._attr_addr, 32) < 0:
            raise BpfError(ctypes.get_errno(), BPF_MAP_LOOKUP_ELEM, f"map fd {fd}")
        return self._val.raw


class PinOpener:
    """Repeated OBJ_GET of pinned paths with preallocated buffers (reading many jobs)."""

    def __init__(self, flags: int = BPF_F_RDONLY) -> None:
        self._path = ctypes.create_string_buffer(4096)
        self._attr = ctypes.create_string_buffer(16)
        struct.pack_into("=QII", self._attr, 0, ctypes.addressof(self._path), 0, flags)
        self._attr_addr = ctypes.addressof(self._attr)

    def open(self, path: str) -> int:
        raw = os.fsencode(path)
        if len(raw) >= len(self._path):
            raise ValueError(f"path too long: {path[:60]}...")
        ctypes.memmove(self._path, raw + b"\0", len(raw) + 1)
        fd = _syscall(_NR, BPF_OBJ_GET, self._attr_addr, 16)
        if fd < 0:
            raise BpfError(ctypes.get_errno(), BPF_OBJ_GET, f"open {path}")
        return int(fd)


def lookup_batch(fd: int, key_size: int, value_size: int, count: int) -> tuple[bytes, bytes, int]:
    """BPF_MAP_LOOKUP_BATCH (5.6+) from the start: (keys, values, number read). value_size is
    the per-element size as a lookup returns it (per-CPU: all CPUs)."""
    keys = ctypes.create_string_buffer(key_size * count)
    vals = ctypes.create_string_buffer(value_size * count)
    out_batch = ctypes.create_string_buffer(8)
    attr = _attr("=QQQQII", 0, _addr(out_batch), _addr(keys), _addr(vals), count, fd)
    try:
        sys_bpf(BPF_MAP_LOOKUP_BATCH, attr, f"map fd {fd}")
    except BpfError as exc:
        if exc.errno != errno.ENOENT:  # ENOENT: the last batch (all read)
            raise
    (got,) = struct.unpack_from("=I", attr, 32)
    return keys.raw, vals.raw, got


# --------------------------------------------------------------------------- programs

def prog_load(prog_type: int, insns: bytes, name: str = "", license: str = "GPL",
              expected_attach_type: int = 0, log_size: int = 1 << 20) -> int:
    """BPF_PROG_LOAD; the program's fd. On refusal, loads again with a verifier log (level 1)
    and raises ProgLoadError carrying it (the fast path asks for no log at all)."""
    lic = ctypes.create_string_buffer(license.encode())
    code = ctypes.create_string_buffer(insns, len(insns))

    def attempt(log_level: int, log: ctypes.Array | None) -> int:  # type: ignore[type-arg]
        attr = _attr("=IIQQIIQII16sII", prog_type, len(insns) // 8, _addr(code), _addr(lic),
                     log_level, len(log) if log is not None else 0, _addr(log), 0, 0,
                     _name(name), 0, expected_attach_type)
        return sys_bpf(BPF_PROG_LOAD, attr, f"program {name or '?'}")

    try:
        return attempt(0, None)
    except BpfError as first:
        log = ctypes.create_string_buffer(log_size)
        try:
            fd = attempt(1, log)
        except BpfError as exc:
            raise ProgLoadError(exc.errno or first.errno or 0, f"program {name or '?'}",
                                log.value.decode(errors="replace")) from None
        os.close(fd)  # loaded with a log but not without: should not happen; report the first
        raise ProgLoadError(first.errno or 0, f"program {name or '?'}", "") from None


def prog_attach(target_fd: int, prog_fd: int, attach_type: int, flags: int = 0) -> None:
    sys_bpf(BPF_PROG_ATTACH, _attr("=IIII", target_fd, prog_fd, attach_type, flags),
            f"attach type {attach_type}")


def prog_detach(target_fd: int, prog_fd: int, attach_type: int) -> None:
    sys_bpf(BPF_PROG_DETACH, _attr("=III", target_fd, prog_fd, attach_type), f"detach type {attach_type}")


def prog_query(target_fd: int, attach_type: int, max_progs: int = 64) -> tuple[int, tuple[int, ...]]:
    """BPF_PROG_QUERY (4.15): (attach flags, ids of the programs attached to target_fd as
    attach_type, in the order they run). Only programs attached to target itself, not those it
    inherits."""
    ids = (ctypes.c_uint32 * max_progs)()
    attr = _attr("=IIIIQI", target_fd, attach_type, 0, 0, ctypes.addressof(ids), max_progs)
    sys_bpf(BPF_PROG_QUERY, attr, f"query type {attach_type}")
    flags, = struct.unpack_from("=I", attr, 12)
    count, = struct.unpack_from("=I", attr, 24)
    return flags, tuple(ids[: min(count, max_progs)])


def prog_test_run(prog_fd: int, data: bytes, repeat: int = 1, ctx: bytes | None = None) -> tuple[int, int]:
    """BPF_PROG_TEST_RUN: (return value, average duration in ns per run)."""
    din = ctypes.create_string_buffer(data, len(data))
    cin = ctypes.create_string_buffer(ctx, len(ctx)) if ctx else None
    attr = _attr("=IIIIQQIIIIQQ", prog_fd, 0, len(data), 0, _addr(din), 0, repeat, 0,
                 len(ctx) if ctx else 0, 0, _addr(cin), 0)
    sys_bpf(BPF_PROG_TEST_RUN, attr, f"test run fd {prog_fd}")
    retval, = struct.unpack_from("=I", attr, 4)
    duration, = struct.unpack_from("=I", attr, 36)
    return retval, duration


# --------------------------------------------------------------------------- pinning and ids

def obj_pin(fd: int, path: str) -> None:
    """Pin a map or program in a bpffs instance (the file gets mode 0600 & ~umask, owner us)."""
    p = ctypes.create_string_buffer(os.fsencode(path))
    sys_bpf(BPF_OBJ_PIN, _attr("=QI", _addr(p), fd), f"pin {path}")


def obj_get(path: str, flags: int = 0) -> int:
    """Open a pinned object; flags BPF_F_RDONLY for a reader (4.15+)."""
    p = ctypes.create_string_buffer(os.fsencode(path))
    return sys_bpf(BPF_OBJ_GET, _attr("=QII", _addr(p), 0, flags), f"open {path}")


def prog_fd_by_id(prog_id: int) -> int:
    return sys_bpf(BPF_PROG_GET_FD_BY_ID, _attr("=I", prog_id), f"program id {prog_id}")


def map_fd_by_id(map_id: int, flags: int = 0) -> int:
    return sys_bpf(BPF_MAP_GET_FD_BY_ID, _attr("=III", map_id, 0, flags), f"map id {map_id}")


@dataclass(frozen=True)
class ProgInfo:
    """What OBJ_GET_INFO_BY_FD says about a program (the fields we use)."""

    prog_type: int
    id: int
    tag: bytes
    name: str
    map_ids: tuple[int, ...]
    run_time_ns: int
    run_cnt: int
    xlated_len: int
    jited_len: int


_PROG_INFO_SIZE = 232


def prog_info(fd: int, max_maps: int = 8) -> ProgInfo:
    ids = (ctypes.c_uint32 * max_maps)()
    info = ctypes.create_string_buffer(_PROG_INFO_SIZE)
    struct.pack_into("=IQ", info, 52, max_maps, ctypes.addressof(ids))
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, _attr("=IIQ", fd, len(info), _addr(info)), f"info of fd {fd}")
    ptype, pid, tag, jlen, xlen = struct.unpack_from("=II8sII", info, 0)
    (nmaps,) = struct.unpack_from("=I", info, 52)
    name = struct.unpack_from("=16s", info, 64)[0].rstrip(b"\0").decode()
    run_ns, run_cnt = struct.unpack_from("=QQ", info, 192)
    return ProgInfo(ptype, pid, tag, name, tuple(ids[: min(nmaps, max_maps)]), run_ns, run_cnt, xlen, jlen)


@dataclass(frozen=True)
class MapInfo:
    map_type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


def map_info(fd: int) -> MapInfo:
    info = ctypes.create_string_buffer(88)
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, _attr("=IIQ", fd, len(info), _addr(info)), f"info of fd {fd}")
    t, i, ks, vs, me, fl, name = struct.unpack_from("=IIIIII16s", info, 0)
    return MapInfo(t, i, ks, vs, me, fl, name.rstrip(b"\0").decode())


def open_map(fd: int) -> Map:
    """A Map for an fd got by id or path (geometry from the kernel)."""
    mi = map_info(fd)
    return Map(fd, mi.map_type, mi.key_size, mi.value_size, mi.max_entries, mi.name)


@contextmanager
def stats_enabled() -> Iterator[None]:
    """Per-program run time/count accounting for the block (BPF_ENABLE_STATS, 5.8+): the kernel
    turns it off again when the fd closes, even if we crash; it leaves the
    kernel.bpf_stats_enabled sysctl as it was."""
    fd = sys_bpf(BPF_ENABLE_STATS, _attr("=I", BPF_STATS_RUN_TIME), "run-time stats")
    try:
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the bpf filesystem

def is_bpffs(path: Path) -> bool:
    """True if a bpf filesystem is mounted at path (in this mount namespace)."""
    want = os.path.realpath(path)
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[2] == "bpf" and fields[1].replace("\\040", " ") == want:
                    return True
    except OSError:
        return False
    return False


def ensure_bpffs(path: Path) -> bool:
    """Mount a bpf filesystem at path unless one is there (as systemd does at /sys/fs/bpf);
    True if this mounted it. OSError if it cannot."""
    if is_bpffs(path):
        return False
    from .libc import mount

    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    mount("bpf", str(path), "bpf", 0)
    return True

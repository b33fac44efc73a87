"""cgroup v2 primitives for the cgroup engine: where the unified hierarchy is, a job's
directory (made, emptied of our programs, removed), moving processes into it, and attaching
BPF programs to it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from . import bpf

CGROUP_MOUNT = Path("/sys/fs/cgroup")
UNIFIED_MOUNT = Path("/sys/fs/cgroup/unified")  # hybrid hosts (systemd with cgroup v1 controllers)
CGROUP2_MAGIC = 0x63677270
INET_TYPES = {"in": bpf.ATTACH_CGROUP_INET_INGRESS, "out": bpf.ATTACH_CGROUP_INET_EGRESS}


def _mounts() -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount of this mount namespace."""
    out: list[tuple[str, str]] = []
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2:
                    out.append((fields[1].replace("\\040", " "), fields[2]))
    except OSError:
        pass
    return out


def is_cgroup2(path: Path) -> bool:
    """True if path is on a cgroup2 filesystem (the mount point or a cgroup below it)."""
    want = os.path.realpath(path)
    best = ""
    fstype = ""
    for mnt, typ in _mounts():
        if (want == mnt or want.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, fstype = mnt, typ
    return fstype == "cgroup2"


def unified_mount() -> Path | None:
    """The cgroup v2 hierarchy: /sys/fs/cgroup on a pure v2 host, /sys/fs/cgroup/unified on a
    hybrid one; None if there is none."""
    for mnt, typ in _mounts():
        if typ == "cgroup2" and Path(mnt) == CGROUP_MOUNT:
            return CGROUP_MOUNT
    for mnt, typ in _mounts():
        if typ == "cgroup2" and Path(mnt) == UNIFIED_MOUNT:
            return UNIFIED_MOUNT
    return None


def pure_v2() -> bool:
    """True if /sys/fs/cgroup itself is cgroup2 (what SLURM's cgroup/v2 plugin requires)."""
    return unified_mount() == CGROUP_MOUNT


def of_pid(pid: int | str = "self") -> str | None:
    """The cgroup v2 path of a process ("0::" line of /proc/<pid>/cgroup), relative to the
    hierarchy's root; None if it has none."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].rstrip("\n")
    except OSError:
        return None
    return None


def make(path: Path) -> bool:
    """mkdir the cgroup (mode 0755, root's); False if it was there already."""
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        return False
    return True


def remove(path: Path) -> bool:
    """rmdir the cgroup; False if it was not there. OSError (EBUSY) while processes are in it."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return False
    return True


def remove_tree(path: Path) -> bool:
    """rmdir a cgroup and every cgroup below it, deepest first (cgroups cannot be removed with
    their children); False if it was not there. OSError (EBUSY) if one still holds processes."""
    if not path.is_dir():
        return False
    for d in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        os.rmdir(d)
    os.rmdir(path)
    return True


def procs(path: Path) -> list[int]:
    """The processes in the cgroup itself (not its children)."""
    try:
        return [int(x) for x in (path / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def move(path: Path, pid: int = 0) -> None:
    """Move a process (0: the caller) into the cgroup."""
    with open(path / "cgroup.procs", "w") as f:
        f.write(f"{pid}\n")


def open_dir(path: Path) -> int:
    """An O_RDONLY|O_DIRECTORY descriptor of the cgroup: what bpf(2) attaches to."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def attach(path: Path, progs: dict[str, int]) -> None:
    """Attach the counting programs (direction -> fd) to the cgroup with BPF_F_ALLOW_MULTI, so
    that programs of others (SLURM's device program, systemd's) stay as they are. A program that
    is already attached there is left as it is (the kernel refuses a second attachment of one
    program with EINVAL: asked with PROG_QUERY)."""
    fd = open_dir(path)
    try:
        for direction, prog in progs.items():
            try:
                bpf.prog_attach(fd, prog, INET_TYPES[direction], bpf.BPF_F_ALLOW_MULTI)
            except bpf.BpfError as exc:
                if exc.errno not in (errno.EINVAL, errno.EEXIST):
                    raise
                if bpf.prog_info(prog).id not in bpf.prog_query(fd, INET_TYPES[direction])[1]:
                    raise
    finally:
        os.close(fd)


def detach(path: Path, progs: dict[str, int]) -> int:
    """Detach the programs (direction -> fd) from the cgroup; how many were attached there."""
    try:
        fd = open_dir(path)
    except FileNotFoundError:
        return 0
    n = 0
    try:
        for direction, prog in progs.items():
            try:
                bpf.prog_detach(fd, prog, INET_TYPES[direction])
                n += 1
            except bpf.BpfError as exc:
                if exc.errno != errno.ENOENT:
                    raise
    finally:
        os.close(fd)
    return n


def attached(path: Path) -> dict[str, tuple[int, ...]]:
    """Ids of the programs attached to the cgroup itself, per direction."""
    fd = open_dir(path)
    try:
        return {d: bpf.prog_query(fd, t)[1] for d, t in INET_TYPES.items()}
    finally:
        os.close(fd)

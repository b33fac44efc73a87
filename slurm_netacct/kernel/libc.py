"""The C library calls Python's standard library lacks (setns, unshare, mount, mallopt)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

CLONE_NEWNET = 0x40000000
MS_BIND, MS_REC, MS_SHARED = 0x1000, 0x4000, 0x100000
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """Move the calling thread into the namespace of fd; OSError if the kernel refuses."""
    _check(_libc.setns(fd, nstype), "setns")


def unshare(flags: int) -> None:
    """Give the calling thread new namespaces (flags: CLONE_NEW*); OSError if refused."""
    _check(_libc.unshare(flags), "unshare")


def mount(source: str, target: str, fstype: str | None, flags: int) -> None:
    """mount(2); OSError naming the target if refused."""
    _check(_libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags, None),
           f"mount {target}")


def umount2(target: str, flags: int) -> None:
    """umount2(2); OSError (errno kept) if refused."""
    _check(_libc.umount2(target.encode(), flags), f"umount {target}")


def mallopt(param: int, value: int) -> bool:
    """mallopt(3); False where the C library has none (not glibc) or refuses."""
    fn = getattr(_libc, "mallopt", None)
    return fn is not None and fn(param, value) == 1

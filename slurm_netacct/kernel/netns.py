"""Network namespaces: create, bind-mount, join (a thread or a forked child), remove."""

from __future__ import annotations

import errno
import os
import pickle
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from ..errors import NoNamespaceError, SetupError
from . import libc
from .libc import CLONE_NEWNET, MNT_DETACH, MS_BIND, MS_REC, MS_SHARED

T = TypeVar("T")
_NSFS_DEV: int | None = None


def _nsfs_dev() -> int:
    """The device number of nsfs, where every namespace file lives (fixed while we run)."""
    global _NSFS_DEV
    if _NSFS_DEV is None:
        _NSFS_DEV = os.stat("/proc/self/ns/net").st_dev
    return _NSFS_DEV


def is_netns(path: Path) -> bool:
    """True if path is a bind-mounted network namespace (not merely a leftover empty file)."""
    try:
        return os.stat(path).st_dev == _nsfs_dev()
    except OSError:
        return False


def live_netns_inodes() -> set[int]:
    """The inode of every network namespace that something on this host still holds: a thread
    in it, an open descriptor of it, or a bind mount of it (in any process's mount namespace).

    What is not in this set has been deleted (its inode may be reused by a new namespace)."""
    live: set[int] = set()
    mount_namespaces: set[int] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                live.add(os.stat(f"/proc/{pid}/task/{tid}/ns/net").st_ino)
            except OSError:
                pass
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("net:["):
                live.add(int(target[5:-1]))
        try:
            mnt = os.stat(f"/proc/{pid}/ns/mnt").st_ino
        except OSError:
            continue
        if mnt in mount_namespaces:  # one mountinfo per mount namespace
            continue
        mount_namespaces.add(mnt)
        try:
            with open(f"/proc/{pid}/mountinfo") as f:
                for line in f:
                    root = line.split(" ", 4)[3]
                    if root.startswith("net:["):
                        live.add(int(root[5:-1]))
        except OSError:
            pass
    return live


def setns(path: Path) -> None:
    """Move the calling thread (the whole process if single-threaded) into the namespace."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NoNamespaceError(f"{path}: no such network namespace") from None
    try:
        if not is_netns(path):
            raise NoNamespaceError(f"{path}: not a network namespace")
        try:
            libc.setns(fd, CLONE_NEWNET)
        except OSError as exc:
            raise SetupError(f"setns({path}): {os.strerror(exc.errno or 0)}") from None
    finally:
        os.close(fd)


def run_in_netns(path: Path | None, func: Callable[..., T], *args: Any) -> T:
    """Run func(*args) in a forked child that has joined the namespace; return its result.

    path None runs it in a child in the current namespace (for libraries that keep global
    state per process, such as python-iptables). The parent stays where it is. Exceptions
    raised by func are re-raised in the parent.
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(rfd)
        try:
            if path is not None:
                setns(path)
            payload: tuple[bool, Any] = (True, func(*args))
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
            try:
                pickle.dumps(exc)
                payload = (False, exc)
            except Exception:
                payload = (False, SetupError("".join(traceback.format_exception_only(exc)).strip()))
        try:
            with os.fdopen(wfd, "wb") as w:
                pickle.dump(payload, w)
        finally:
            os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        data = r.read()
    os.waitpid(pid, 0)
    if not data:
        raise SetupError(f"helper process in {path} died")
    ok, value = pickle.loads(data)
    if not ok:
        raise value
    return value


_shared_dirs: set[Path] = set()
_local = threading.local()


def home_fd() -> int:
    """A descriptor of the namespace this thread is in now, to come back to after a visit.

    Kept open per thread and namespace (a command's main thread has one; a daemon worker one
    per node it serves): holding it also pins the namespace, so its inode, the key, stays
    unique."""
    ino = os.stat("/proc/thread-self/ns/net").st_ino
    fds: dict[int, int] = _local.__dict__.setdefault("homes", {})
    fd = fds.get(ino)
    if fd is None:
        fd = fds[ino] = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    return fd


def go_home(home: int) -> None:
    """Back to the namespace of home_fd(); a thread must never stay in a job's namespace."""
    try:
        libc.setns(home, CLONE_NEWNET)
    except OSError:
        raise SetupError("cannot return to the node's network namespace") from None


@contextmanager
def entered(path: Path) -> Iterator[None]:
    """Move the calling thread into the namespace at path for the block, then back.

    Sockets opened inside (netlink, libnftables) stay bound to that namespace afterwards.
    Only the calling thread moves: a daemon's other threads are unaffected.
    """
    home = home_fd()
    setns(path)
    try:
        yield
    finally:
        go_home(home)


@contextmanager
def entered_fd(fd: int) -> Iterator[None]:
    """entered() for a namespace given by an open descriptor (a hook's, sent to the daemon)."""
    home = home_fd()
    libc.setns(fd, CLONE_NEWNET)
    try:
        yield
    finally:
        go_home(home)


def _share(directory: Path) -> None:
    """Make the namespace directory a shared mount point (as `ip netns add` does), once."""
    if directory in _shared_dirs:
        return
    directory.mkdir(parents=True, exist_ok=True)
    d = str(directory)
    try:
        libc.mount("", d, "none", MS_SHARED | MS_REC)
    except OSError:  # not a mount point yet
        try:
            libc.mount(d, d, "none", MS_BIND | MS_REC)
            libc.mount("", d, "none", MS_SHARED | MS_REC)
        except OSError as exc:
            raise SetupError(f"cannot make {directory} a shared mount: {os.strerror(exc.errno or 0)}") from None
    _shared_dirs.add(directory)


def create(path: Path, rps_mask: str | None = None) -> None:
    """Create a new network namespace bind-mounted at path (like `ip netns add`).

    The calling thread unshares into the new namespace just long enough to bind-mount it
    (and, with rps_mask, to set its net.core.rps_default_mask, which links made in it later
    start with), then returns to where it was: no helper process.

    Nothing else goes through /proc/sys here: with many namespaces on the machine, each
    sysctl file costs about 1 ms to open (0.2 ms with none; measured here with 1000).
    """
    _share(path.parent)
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0))
    except FileExistsError:
        raise SetupError(f"network namespace {path} already exists (made by something else)") from None
    except OSError as exc:
        raise SetupError(f"cannot create {path}: {exc.strerror}") from None
    home = home_fd()
    try:
        libc.unshare(CLONE_NEWNET)
    except OSError as exc:
        os.unlink(path)
        raise SetupError(f"cannot create network namespace {path}: unshare: {os.strerror(exc.errno or 0)}") from None
    try:
        try:
            libc.mount("/proc/thread-self/ns/net", str(path), "none", MS_BIND)
        except OSError as exc:
            os.unlink(path)
            raise SetupError(f"cannot create network namespace {path}: mount: "
                             f"{os.strerror(exc.errno or 0)}") from None
        if rps_mask is not None:  # links made here later (the job's end) start with it
            try:
                set_sysctl("net/core/rps_default_mask", rps_mask)
            except SetupError:
                remove(path)
                raise
    finally:
        go_home(home)


def remove(path: Path) -> bool:
    """Unmount and unlink a namespace file; False if there was nothing to remove."""
    if not os.path.lexists(path):
        return False
    try:
        libc.umount2(str(path), MNT_DETACH)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOENT):  # EINVAL: a leftover file, not mounted
            raise SetupError(f"umount {path}: {os.strerror(exc.errno or 0)}") from None
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def set_sysctl(name: str, value: str) -> str | None:
    """Write a sysctl of the current network namespace, e.g. net/ipv4/ip_forward; the value it
    had if this changed it, None if it already had this value."""
    path = Path("/proc/sys") / name
    try:
        old = path.read_text().strip()
        if old == value:
            return None
        path.write_text(value)
        return old
    except FileNotFoundError:
        raise SetupError(f"sysctl {name}={value}: no such setting") from None
    except OSError as exc:
        raise SetupError(f"sysctl {name}={value}: {exc.strerror}") from None

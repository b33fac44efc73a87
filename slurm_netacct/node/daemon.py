"""The resident service: the prolog and epilog hand their work to it over a unix socket.

Python and its libraries (pyroute2, sqlite-utils, libnftables) are loaded once here, so a
prolog costs the kernel's work and little else. The hooks (`client/netacct-hook`) send
their SLURM environment and a descriptor of their network namespace (SCM_RIGHTS); a worker
thread joins that namespace (threads have their own), does the work, answers, and only then
does what may wait (deleting the job's link). If the service is down, does not answer in
time or runs with another configuration, the hook does the work itself: no job fails
because of the service.

Protocol (one request per connection): "netacct/1\\0OP\\0KEY=VALUE\\0...", fds [netns,
resolv.conf?]; answer "RC MESSAGE\\n". RC 75 (EX_TEMPFAIL) means "do it yourself".
OP "flush" (no fds needed) answers once all deferred work queued before it is done.
OP "status" (no fds) answers "0 config=PATH sha256=HEX": the config it runs with, and the
SHA-256 of that file's bytes as it read them at start ("-" for built-in defaults); for
netacct-doctor.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from .. import config as config_mod
from .. import counting, naming
from ..kernel import libc, netns
from ..log import setup as setup_log
from . import hooks

MAGIC = b"netacct/1"
TEMPFAIL = 75
MAX_REQUEST = 1 << 20
ENV_KEYS = ("SLURM", "NETACCT_")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt(3)
MALLOC_THRESHOLD = 128 * 1024  # glibc's default for both


def pin_malloc_thresholds(nbytes: int = MALLOC_THRESHOLD) -> bool:
    """Fix glibc's mmap and trim thresholds for this process; False if not glibc.

    glibc raises both each time a mapped block above the mmap threshold is freed (imports
    already do: Python's table of interned strings, 200-400 KiB, moves as it grows). Then
    the 256 KiB buffer that asyncio, under pyroute2, receives every netlink answer into
    comes from the heap and is shrunk in place; the heap grows around the holes and RSS grew
    by ~0.75 KiB per job while Python's own allocations stayed flat (bench/RESULTS.md). Fixed
    thresholds (as the environment variable MALLOC_MMAP_THRESHOLD_ would set them) keep such
    buffers in mappings of their own and give a heap's free top back: RSS stays flat."""
    return libc.mallopt(M_MMAP_THRESHOLD, nbytes) and libc.mallopt(M_TRIM_THRESHOLD, nbytes)


def config_digest(path: Path) -> str:
    """SHA-256 of the config file's bytes, "-" if there is none (built-in defaults)."""
    import hashlib

    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return "-"


def ask_status(sock_path: Path, timeout: float = 5) -> tuple[Path, str]:
    """(config path, its digest) that the service at sock_path runs with; OSError if it does
    not answer, ValueError if the answer is not a status line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(timeout)
        c.connect(str(sock_path))
        c.sendall(MAGIC + b"\0status\0\0")
        c.shutdown(socket.SHUT_WR)
        data = b""
        while not data.endswith(b"\n"):
            chunk = c.recv(4096)
            if not chunk:
                break
            data += chunk
    text = data.decode(errors="replace").rstrip("\n")
    path, sep, digest = text.removeprefix("0 config=").rpartition(" sha256=")
    if not text.startswith("0 config=") or not sep:
        raise ValueError(f"unexpected answer {data[:80]!r}")
    return Path(path), digest


ACCEPT_POLL = 1.0  # seconds: how often the accept loop checks for a stop request


class _Once:
    """A deferred piece of work that runs exactly once, whoever asks first: the "later"
    thread in its turn, or a prolog of the same job that must not start before it."""

    def __init__(self, fn: Callable[[], object], cleanup: Callable[[], object]) -> None:
        self.fn = fn
        self.cleanup = cleanup
        self.lock = threading.Lock()
        self.done = False

    def run(self) -> None:
        with self.lock:
            if self.done:
                return
            self.done = True
            try:
                self.fn()
            finally:
                self.cleanup()


class Daemon:
    """Accepts hook requests; `workers` jobs are worked on at once."""

    def __init__(self, cfg_path: Path | None, sock_path: Path, workers: int = 4, max_jobs: int = 0) -> None:
        self.malloc_pinned = pin_malloc_thresholds()  # first: all that follows is allocated under it
        self.cfg_path = Path(cfg_path or os.environ.get(config_mod.ENV_VAR) or config_mod.DEFAULT_PATH)
        self.cfg = config_mod.load(self.cfg_path if self.cfg_path.exists() or cfg_path else None)
        self.cfg_digest = config_digest(self.cfg_path)
        self.log = setup_log(self.cfg.log_file, "netacct-daemon")
        if not self.malloc_pinned:
            self.log.warning("cannot fix the malloc thresholds (not glibc?): memory may grow per "
                             "job; --max-jobs N restarts the service every N requests")
        self.sock_path = sock_path
        self.workers = workers
        # After this many hook requests, stop (and let the service manager start a fresh
        # process). Not needed for memory since pin_malloc_thresholds (bench/RESULTS.md). 0: never.
        self.max_jobs = max_jobs
        self.served = 0
        self.count_lock = threading.Lock()
        self.conns: queue.Queue[socket.socket | None] = queue.Queue()
        self.later: queue.Queue[Callable[[], object] | None] = queue.Queue()
        # Deferred teardowns not yet done, by (node namespace inode, job id): a prolog of the
        # same job on the same node runs them first (the job was requeued onto this node, or
        # its id came round again), so that they cannot remove what the new run has made.
        self.pending: dict[tuple[int, str], list[_Once]] = {}
        self.pending_lock = threading.Lock()
        self.stopping = threading.Event()
        self.sock: socket.socket | None = None
        # Load what the first request would otherwise pay for.
        import pyroute2  # noqa: F401

        from ..kernel import links, nftlib, nftread  # noqa: F401
        from ..store import db, spool  # noqa: F401
        from . import lifecycle, nat  # noqa: F401
        nftlib.load()
        if counting.choose(self.cfg).name == counting.BPF:  # mounts the bpf filesystem if need be,
            from ..counting.bpf import pin_dir               # so that fallback hooks find it mounted

            pin_dir(self.cfg)

    def start(self) -> None:
        self.sock_path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        try:
            self.sock_path.unlink()
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is root's only: it changes the node's network
        try:
            sock.bind(str(self.sock_path))
        finally:
            os.umask(old)
        sock.listen(256)
        self.sock = sock
        self.later_thread = threading.Thread(target=self._run_later, name="later", daemon=True)
        self.later_thread.start()
        # A fixed pool of workers (not a thread per request): memory stays flat.
        for i in range(self.workers):
            threading.Thread(target=self._work, name=f"worker-{i}", daemon=True).start()
        self.log.info("listening on %s (config %s)", self.sock_path, self.cfg_path)
        if self.cfg.ledger is not None:
            threading.Thread(target=self._ship_loop, name="ship", daemon=True).start()
        from .agreement import disagreements

        for line in disagreements(self.cfg):
            self.log.warning("%s", line)

    def serve_forever(self) -> None:
        assert self.sock is not None
        # A timeout, so that this loop looks at `stopping` at least once a second: the Python
        # signal handler runs in this thread, but only when it executes bytecode.
        self.sock.settimeout(ACCEPT_POLL)
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self.stopping.is_set():
                    break
                raise
            conn.settimeout(None)
            self.conns.put(conn)

    def stop(self) -> None:
        """Stop accepting; deferred work already queued is still done (see drain)."""
        self.stopping.set()
        if self.sock is not None:
            try:  # wakes the accept() of the main thread (closing alone would not)
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
        try:
            self.sock_path.unlink()
        except FileNotFoundError:
            pass

    def drain(self, timeout: float = 30) -> None:
        self.later.put(None)
        self.later_thread.join(timeout)

    def _ship_loop(self) -> None:
        """Every [ledger] interval seconds, ship this node's database to the ledger (as
        netacct-ship does); a failure is logged once until shipping works again."""
        from ..errors import NetacctError
        from ..store import ship

        led = self.cfg.ledger
        assert led is not None
        node = naming.default_node()
        path = self.cfg.db_for(node)
        failing = False
        while not self.stopping.wait(led.interval):
            if not path.exists():
                continue
            try:
                done = ship.ship(path, led)
            except NetacctError as exc:
                if not failing:
                    self.log.error("node %s: shipping to the ledger failed (retried every %d s): %s",
                                   node, led.interval, exc)
                failing = True
                continue
            except Exception:  # a bug: logged, the service goes on
                self.log.exception("node %s: shipping to the ledger failed", node)
                continue
            if failing or done.rows:
                self.log.info("node %s: %d rows shipped to the ledger (watermark %d)", node, done.rows,
                              done.watermark)
            failing = False

    def _work(self) -> None:
        while True:
            conn = self.conns.get()
            if conn is None:
                return
            self._handle(conn)

    def _run_later(self) -> None:
        while True:
            fn = self.later.get()
            if fn is None:
                return
            try:
                fn()
            except Exception:  # logged, never fatal: the reaper finds what is left
                self.log.exception("deferred teardown failed")

    def _handle(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            conn.settimeout(10)
            data, fds = _recv_request(conn)
            parts = data.split(b"\0")
            if len(parts) >= 2 and parts[0] == MAGIC and parts[1] == b"flush":
                done = threading.Event()
                self.later.put(done.set)
                done.wait(60)
                conn.sendall(b"0 \n")
                return
            if len(parts) >= 2 and parts[0] == MAGIC and parts[1] == b"status":
                conn.sendall(f"0 config={self.cfg_path} sha256={self.cfg_digest}\n".encode())
                return
            if len(parts) < 2 or parts[0] != MAGIC or parts[1] not in (b"prolog", b"epilog") or not fds:
                conn.sendall(f"{TEMPFAIL} bad request\n".encode())
                return
            op = parts[1].decode()
            env = dict(p.decode(errors="replace").split("=", 1) for p in parts[2:] if b"=" in p)
            if env.get("NETACCT_FAILPOINT"):  # a test's fault injection runs in the hook itself
                conn.sendall(f"{TEMPFAIL} failpoints run in-process\n".encode())
                return
            wanted = env.get(config_mod.ENV_VAR)
            if wanted and Path(wanted) != self.cfg_path:
                conn.sendall(f"{TEMPFAIL} the service runs with config {self.cfg_path}\n".encode())
                return
            resolv = Path(f"/proc/self/fd/{fds[1]}") if len(fds) > 1 else None
            key = (os.fstat(fds[0]).st_ino, env.get("SLURM_JOB_ID", ""))
            if op == "prolog":
                self._finish_pending(key)
            rc, msg = self._in_namespace(fds[0], lambda: hooks.run_hook(
                op, env, self.cfg, self.log, resolv_conf=resolv, defer=self._defer_in(fds[0], key)))
            conn.sendall(f"{rc} {msg}\n".encode())
            if self.max_jobs:
                with self.count_lock:
                    self.served += 1
                    if self.served == self.max_jobs:
                        self.log.info("served %d requests: stopping for a fresh start", self.served)
                        self.stop()
        except (OSError, ValueError) as exc:
            self.log.error("request failed: %s", exc)
        finally:
            conn.close()
            for fd in fds:
                os.close(fd)

    def _defer_in(self, ns_fd: int, key: tuple[int, str]) -> Callable[[Callable[[], object]], None]:
        """Run fn later, in the requester's network namespace (or sooner: _finish_pending)."""
        def defer(fn: Callable[[], object]) -> None:
            keep = os.dup(ns_fd)  # the request's own descriptor is closed when it is answered
            task = _Once(lambda: self._in_namespace(keep, fn), lambda: os.close(keep))
            with self.pending_lock:
                self.pending.setdefault(key, []).append(task)

            def later() -> None:
                try:
                    task.run()
                finally:
                    with self.pending_lock:
                        tasks = self.pending.get(key, [])
                        if task in tasks:
                            tasks.remove(task)
                        if not tasks:
                            self.pending.pop(key, None)
            self.later.put(later)
        return defer

    def _finish_pending(self, key: tuple[int, str]) -> None:
        """Do now what an earlier epilog of this job on this node left for later."""
        with self.pending_lock:
            tasks = list(self.pending.get(key, []))
        for task in tasks:
            try:
                task.run()
            except Exception:  # logged; the prolog removes any leftover of an earlier run itself
                self.log.exception("job %s: the teardown of its earlier run failed", key[1])

    def _in_namespace(self, ns_fd: int, fn: Callable[[], object]) -> object:
        """fn() with this thread in the namespace of ns_fd, then back."""
        home = netns.home_fd()
        try:
            libc.setns(ns_fd)
        except OSError:
            raise OSError("cannot join the hook's network namespace") from None
        try:
            return fn()
        finally:
            try:
                libc.setns(home)
            except OSError:
                os._exit(70)  # a worker stuck in a node's namespace must not serve again


MAX_FDS = 4  # a request carries two: the hook's network namespace and its resolv.conf


def _recv_request(conn: socket.socket) -> tuple[bytes, list[int]]:
    """A whole request (it ends with an empty entry) and the descriptors that came with it."""
    data = b""
    fds: list[int] = []
    while True:
        msg, got, _flags, _addr = socket.recv_fds(conn, 65536, MAX_FDS)
        fds.extend(got)
        if not msg:
            break
        data += msg
        if len(data) > MAX_REQUEST:
            raise ValueError("request too large")
        if data.endswith(b"\0\0"):  # the client ends its request with an empty entry
            break
    return data, fds

"""Serialising work on one job on one node: the service, a fallback hook and the reaper may race."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

from .. import naming
from ..errors import SetupError


@contextmanager
def job_lock(job_id: int) -> Iterator[None]:
    """Hold the job's lock for the block (a fixed set of lock files: nothing accumulates)."""
    path = naming.lock_path(job_id)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:  # e.g. /run read-only or full: nothing has been made yet
        raise SetupError(f"cannot create the job lock {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)

"""Private data: who asks for a report, and which jobs they may see (config [report])."""

from __future__ import annotations

import grp
import os
import pwd
from pathlib import Path

from ..config import Config
from ..errors import NotAllowedError
from ..store import read


def viewer() -> tuple[str | None, bool]:
    """(who asks, whether they are root): the sudo caller when run through sudo."""
    if os.geteuid() == 0:
        sudo_user, sudo_uid = os.environ.get("SUDO_USER"), os.environ.get("SUDO_UID")
        if sudo_user and sudo_uid and sudo_uid != "0":
            return sudo_user, False
        return "root", True
    try:
        return pwd.getpwuid(os.getuid()).pw_name, False
    except KeyError:
        return None, False


def is_report_admin(cfg: Config, user: str | None) -> bool:
    """True if [report] admins names the user or one of their groups (%group)."""
    if user is None:
        return False
    for entry in cfg.report_admins:
        if entry.startswith("%"):
            try:
                g = grp.getgrnam(entry[1:])
            except KeyError:
                continue
            if user in g.gr_mem or pwd.getpwnam(user).pw_gid == g.gr_gid:
                return True
        elif entry == user:
            return True
    return False


def private_viewer(cfg: Config) -> str | None:
    """The caller's user name if private data limits the report to their own jobs (config
    [report] private, not root, not a report admin); None if they may see every job."""
    who, root = viewer()
    if not cfg.report_private or root or is_report_admin(cfg, who):
        return None
    if who is None:
        raise NotAllowedError("you may see only your own jobs, and your user id has no name "
                              "(config [report] private = true)")
    return who


def check_jobs(who: str | None, job_ids: frozenset[int] | None, sources: list[Path]) -> None:
    """Under private data, asking by id for a job a database holds for another user is refused."""
    if who is None or job_ids is None:
        return
    others = read.others_jobs(sources, job_ids, who)
    if others:
        raise NotAllowedError(f"job {others[0]} is another user's: {who} may see only "
                              "their own jobs (config [report] private = true)")

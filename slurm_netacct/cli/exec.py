"""netacct-exec: run a command in a job's network namespace (or, with the cgroup engine, its
cgroup), as root or as a user."""

from __future__ import annotations

import argparse
import os
import pwd
import sys

from .. import config as config_mod
from .. import naming
from ..errors import JobIdError, NoNamespaceError, UsageError
from ..kernel import netns
from .common import Command, Parser

EXEC_FAILED, NOT_FOUND = 126, 127


def _arguments(p: Parser) -> None:
    p.add_argument("--job", required=True, metavar="ID", help="SLURM job id")
    p.add_argument("--user", metavar="NAME", help="run as this user (uid, gid and groups)")
    p.add_argument("--host", metavar="NAME",
                   help="the host name for a netns_prefix with %%h (default: this host's short name)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")


def drop_privileges(name: str) -> None:
    """Become user `name`: supplementary groups, gid, then uid (cannot be undone)."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise UsageError(f"no such user {name!r}") from None
    os.initgroups(pw.pw_name, pw.pw_gid)
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    os.environ.update(USER=pw.pw_name, LOGNAME=pw.pw_name, HOME=pw.pw_dir)


def _body(args: argparse.Namespace) -> int:
    cmd = list(args.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("no command given (usage: netacct-exec --job ID [--user NAME] -- CMD ...)")
    try:
        job_id = naming.parse_job_id(args.job)
    except ValueError as exc:
        raise JobIdError(f"--job: {exc}") from None
    cfg = config_mod.load()
    if cfg.engine == "cgroup":
        _enter_cgroup(cfg, job_id, args.host, args.user)
    else:
        _enter_netns(cfg, job_id, args.host, args.user)
    if args.user is not None:
        drop_privileges(args.user)
    try:
        os.execvp(cmd[0], cmd)
    except FileNotFoundError:
        COMMAND.complain(f"{cmd[0]}: command not found")
        return NOT_FOUND
    except OSError as exc:
        COMMAND.complain(f"{cmd[0]}: {exc.strerror}")
        return EXEC_FAILED
    return 0  # not reached: execvp does not return


def _check_user(user: str | None) -> None:
    if user is not None:  # resolve before joining: NSS may need the node's network
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise UsageError(f"no such user {user!r}") from None


def _enter_cgroup(cfg: config_mod.Config, job_id: int, host: str | None, user: str | None) -> None:
    """The cgroup engine: move this process into the job's own cgroup (mode "own"). SLURM's
    job cgroup (mode "slurm") is SLURM's to fill: use srun --jobid=ID --overlap there."""
    from ..counting import cgroup as cgc
    from ..kernel import cgroup as cg

    if cgc.mode(cfg) != "own":
        raise UsageError("engine \"cgroup\" in mode \"slurm\": the job's cgroup is SLURM's; "
                         f"run the command with srun --jobid={job_id} --overlap")
    try:
        name = naming.netns_name(cfg.netns_prefix, job_id, host)
        where = naming.job_cgroup(cgc.root(cfg), name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not where.is_dir():
        raise NoNamespaceError(f"job {job_id} has no accounted cgroup on this node ({where})")
    _check_user(user)
    cg.move(where)


def _enter_netns(cfg: config_mod.Config, job_id: int, host: str | None, user: str | None) -> None:
    try:
        path = cfg.netns_dir / naming.netns_name(cfg.netns_prefix, job_id, host)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not netns.is_netns(path):
        raise NoNamespaceError(f"job {job_id} has no network namespace on this node ({path})")
    _check_user(user)
    netns.setns(path)


COMMAND = Command("netacct-exec", "Run a command inside a job's accounted network namespace (its cgroup with engine = \"cgroup\").",
                  _arguments, _body, {EXEC_FAILED: "the command could not be executed",
                                      NOT_FOUND: "the command was not found"})
main = COMMAND.main


if __name__ == "__main__":
    sys.exit(COMMAND.run())

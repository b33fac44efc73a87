"""netacct-doctor: is this node (or login node, or controller) set up right? One line a check."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .. import naming
from ..errors import NetacctError, UsageError
from ..node import doctor
from ..node.doctor import Result, Verdict
from .common import Command, Parser, name_addrs, node_name

FAILED, WARNED = 20, 21

DESCRIPTION = f"""\
Check this host's slurm-netacct setup, one line a check: "OK", "FAIL" (jobs are not, or
wrongly, accounted, or hooks fail), "WARN" (works, not as recommended) or "SKIP" (does not
apply here, with the reason), each FAIL and WARN with its fix. Checks: config, plugstack,
pam, prolog, epilog, prologflags (slurm.conf), service, routes, forwarding, uplink, store
(the database and spool are root's only), and with --self-test a throwaway job (prolog,
traffic inside namespaces of its own, epilog) on job id {naming.SELFTEST_JOB_ID} whose
counters must come out exact. Changes nothing but what the self-test makes and removes."""


def _arguments(p: Parser) -> None:
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="netacct.toml (default: $NETACCT_CONFIG, /etc/slurm/netacct.toml)")
    p.add_argument("--slurm-conf", type=Path, metavar="FILE",
                   help="slurm.conf (default: $SLURM_CONF, /etc/slurm/slurm.conf)")
    p.add_argument("--plugstack", type=Path, metavar="FILE",
                   help="plugstack.conf (default: slurm.conf's PlugStackConfig, else beside slurm.conf)")
    p.add_argument("--pam", type=Path, metavar="FILE", default=Path("/etc/pam.d/sshd"),
                   help="sshd's PAM stack (default: /etc/pam.d/sshd)")
    p.add_argument("--socket", type=Path, metavar="PATH",
                   default=Path(os.environ.get("NETACCT_SOCKET", naming.DAEMON_SOCKET)),
                   help=f"netacct-daemon's socket (default: $NETACCT_SOCKET, {naming.DAEMON_SOCKET})")
    p.add_argument("--node", metavar="NAME",
                   help="this host's SLURM node name (default: $SLURMD_NODENAME, else the slurm.conf node "
                        "with this host's name or one of its addresses)")
    p.add_argument("--role", choices=doctor.ROLES,
                   help="what this host is (default: compute if it is a node of slurm.conf, controller if "
                        "it is its SlurmctldHost, else login)")
    p.add_argument("--cluster-node", action="append", metavar="NAME=ADDR",
                   help="a node and its address for the routes check (repeatable; default: slurm.conf's "
                        "NodeName lines)")
    p.add_argument("--check", action="append", metavar="NAME", choices=doctor.CHECK_NAMES,
                   help=f"run only this check (repeatable): {', '.join(doctor.CHECK_NAMES)}")
    p.add_argument("--self-test", action="store_true",
                   help="also run a throwaway job and check its counters (compute nodes; root)")


def _body(args: argparse.Namespace) -> int:
    only = set(args.check) if args.check else None
    if args.self_test and only is not None:
        only.add("self-test")
    setup = doctor.Setup(
        config_path=args.config,
        slurm_conf=args.slurm_conf or Path(os.environ.get("SLURM_CONF") or doctor.DEFAULT_SLURM_CONF),
        plugstack=args.plugstack, pam=args.pam, socket=args.socket,
        node=node_name(args.node) if args.node else None, role=args.role,
        cluster_nodes=name_addrs(args.cluster_node, "--cluster-node") if args.cluster_node else None)
    if str(setup.socket) == "":
        raise UsageError("--socket: an empty path")
    ctx = doctor.context(setup)
    print(f"{COMMAND.prog}: {ctx.role} host, node {ctx.node}; config {ctx.cfg_path}, slurm.conf {setup.slurm_conf}",
          flush=True)
    results: list[Result] = []
    for result in doctor.run(ctx, only):
        results.append(result)
        print(result.line(), flush=True)
    if args.self_test or (only is not None and "self-test" in only):
        from ..node.selftest import self_test

        try:
            result = self_test(ctx)
        except NetacctError as exc:
            result = Result("self-test", Verdict.FAIL, str(exc), "fix what it says")
    elif only is None:
        result = Result("self-test", Verdict.SKIP, "not asked for (--self-test)")
    else:
        result = None
    if result is not None:
        results.append(result)
        print(result.line(), flush=True)
    counts = {v: sum(r.verdict is v for r in results) for v in Verdict}
    print(f"{COMMAND.prog}: " + ", ".join(f"{n} {v.value}" for v, n in counts.items()))
    if counts[Verdict.FAIL]:
        return FAILED
    return WARNED if counts[Verdict.WARN] else 0


COMMAND = Command("netacct-doctor", DESCRIPTION, _arguments, _body,
                  extra_codes={FAILED: "a check failed (its FAIL line says what and how to fix it)",
                               WARNED: "no check failed, but one warned (WARN)"},
                  summary="Check this host's setup (compute node, login node or controller), one line "
                          "a check with its fix; --self-test runs a throwaway job")
main = COMMAND.main

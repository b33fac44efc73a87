"""netacct-routes: routed mode's routes to every node's job prefix on this host."""

from __future__ import annotations

import argparse
import os

from .. import config as config_mod
from ..node import identity, routes
from .common import Command, Parser, name_addrs


def _arguments(p: Parser) -> None:
    p.add_argument("action", choices=["install", "remove", "show"])
    p.add_argument("--node", action="append", metavar="NAME=ADDR",
                   help="a node and its address (repeatable); default: ask `scontrol show nodes`")
    p.add_argument("--self", dest="self_node", metavar="NAME",
                   help="this host's node name, skipped (default: $SLURMD_NODENAME; a node whose NodeAddr "
                        "is an address of this host is skipped in any case)")


def _body(args: argparse.Namespace) -> None:
    if args.action == "remove":
        print(f"removed {routes.remove()} routes")
        return
    if args.action == "show":
        for prefix, via in routes.installed():
            print(f"{prefix} via {via}")
        return
    cfg = config_mod.load()
    nodes = name_addrs(args.node, "--node") if args.node else routes.slurm_nodes()
    self_node = args.self_node or os.environ.get("SLURMD_NODENAME")
    planned = routes.plan(cfg, nodes, self_node, identity.local_addresses())
    added, removed = routes.install(planned)
    for r in planned:
        print(f"{r.prefix} via {r.via} ({r.node})")
    routed = {r.node for r in planned}
    for name in sorted(set(nodes) - routed - {self_node}):
        print(f"skipped {name}: its address {nodes[name]} is this host's")
    print(f"installed {added} routes, removed {removed} stale ones")


COMMAND = Command("netacct-routes",
                  "Routed mode: install, remove or show the routes to every node's job prefix on this "
                  "host (compute node, controller or login host). Routes carry protocol 222, and only "
                  "those are ever changed.", _arguments, _body)
main = COMMAND.main

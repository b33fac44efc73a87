"""netacct-routes: plans in which nodes collide are refused, and no route but its own is touched."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import TAG, VENV_BIN
from slurm_netacct import config
from slurm_netacct.node import routes
from slurm_netacct.errors import ConfigError
from topology import in_ns, sh

ROUTED = {"mode": "routed", "pool": {"ipv4": "100.64.0.0/16"}}


@pytest.mark.parametrize("nodes,self_node,listed", [
    ({"n1": "10.9.0.1", "n01": "10.9.0.2"}, None, {}),  # the same trailing number
    ({"n01": "10.9.0.2"}, "n1", {}),  # this host is one of the two
    ({"n1": "10.9.0.1", "login": "10.9.0.9"}, None, {"login": 1}),  # a listed index taken by a name
])
def test_two_nodes_with_one_index_are_refused(nodes: dict[str, str], self_node: str | None,
                                              listed: dict[str, int]) -> None:
    cfg = config.parse({**ROUTED, "routed": {"nodes": listed}})
    with pytest.raises(ConfigError, match=r"both have index 1 \(job prefix 100\.64\.1\.0/24\)"):
        routes.plan(cfg, nodes, self_node)


def test_a_plan_skips_this_host_and_gives_every_other_node_its_prefix() -> None:
    cfg = config.parse({**ROUTED, "routed": {"nodes": {"login": 9}}})
    planned = routes.plan(cfg, {"n1": "10.9.0.1", "n2": "10.9.0.2", "login": "10.9.0.9"}, "n1")
    assert [(r.node, str(r.prefix), str(r.via)) for r in planned] == [
        ("login", "100.64.9.0/24", "10.9.0.9"), ("n2", "100.64.2.0/24", "10.9.0.2")]


@pytest.fixture
def host(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A throwaway host namespace on a LAN 10.9.0.0/24 (a veth pair), and a routed config."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces)", pytrace=False)
    ns = f"{TAG}routes"
    sh("ip", "netns", "add", ns)
    try:
        in_ns(ns, "ip", "link", "add", "lan0", "type", "veth", "peer", "name", "lan1")
        in_ns(ns, "ip", "addr", "add", "10.9.0.1/24", "dev", "lan0")
        in_ns(ns, "ip", "link", "set", "lan1", "up")
        in_ns(ns, "ip", "link", "set", "lan0", "up")
        cfg = tmp_path / "netacct.toml"
        cfg.write_text('mode = "routed"\n[pool]\nipv4 = "100.64.0.0/16"\n')
        yield ns, cfg
    finally:
        sh("ip", "netns", "del", ns, check=False)


def _routes_cmd(ns: str, cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", f"--net=/run/netns/{ns}", str(VENV_BIN / "netacct-routes"), *args],
                          capture_output=True, text=True, env=dict(os.environ, NETACCT_CONFIG=str(cfg)))


def _table(ns: str) -> list[str]:
    return sorted(in_ns(ns, "ip", "-4", "route", "show", "table", "main").stdout.splitlines())


def test_an_administrators_route_is_never_replaced_or_removed(host: tuple[str, Path]) -> None:
    ns, cfg = host
    in_ns(ns, "ip", "route", "add", "100.64.2.0/24", "via", "10.9.0.254", "proto", "static")
    before = _table(ns)
    r = _routes_cmd(ns, cfg, "install", "--node", "n2=10.9.0.2", "--node", "n3=10.9.0.3", "--self", "n1")
    assert r.returncode == 7, r.stderr
    assert r.stderr.count("\n") == 1
    assert ("route 100.64.2.0/24 via 10.9.0.254 proto static is not netacct-routes' (protocol 222): "
            "refusing to replace it") in r.stderr
    assert _table(ns) == before  # nothing at all was added: n3's route neither
    r = _routes_cmd(ns, cfg, "remove")
    assert r.returncode == 0 and r.stdout == "removed 0 routes\n"
    assert _table(ns) == before


def test_install_updates_and_removes_only_its_own_routes(host: tuple[str, Path]) -> None:
    ns, cfg = host
    in_ns(ns, "ip", "route", "add", "100.64.0.0/16", "via", "10.9.0.254", "proto", "static")  # wider: fine
    r = _routes_cmd(ns, cfg, "install", "--node", "n2=10.9.0.2", "--node", "n3=10.9.0.3", "--self", "n1")
    assert r.returncode == 0, r.stderr
    assert "installed 2 routes, removed 0 stale ones" in r.stdout
    assert _routes_cmd(ns, cfg, "show").stdout == "100.64.2.0/24 via 10.9.0.2\n100.64.3.0/24 via 10.9.0.3\n"
    # n3 moved, n2 left the cluster: our routes follow, the administrator's stays.
    r = _routes_cmd(ns, cfg, "install", "--node", "n3=10.9.0.33", "--self", "n1")
    assert r.returncode == 0 and "installed 1 routes, removed 1 stale ones" in r.stdout, r.stderr
    table = _table(ns)
    assert "100.64.3.0/24 via 10.9.0.33 dev lan0 proto 222 " in table
    assert "100.64.0.0/16 via 10.9.0.254 dev lan0 proto static " in table
    assert not any(line.startswith("100.64.2.0/24") for line in table)
    r = _routes_cmd(ns, cfg, "remove")
    assert r.returncode == 0 and r.stdout == "removed 1 routes\n"
    assert [line for line in _table(ns) if line.startswith("100.64.")] == [
        "100.64.0.0/16 via 10.9.0.254 dev lan0 proto static "]


def test_colliding_nodes_are_a_config_error_on_the_command_line(host: tuple[str, Path]) -> None:
    ns, cfg = host
    r = _routes_cmd(ns, cfg, "install", "--node", "n01=10.9.0.2", "--self", "n1")
    assert r.returncode == 3
    assert r.stderr.strip() == ("netacct-routes: config key 'routed.nodes': nodes 'n01' and 'n1' both have "
                                "index 1 (job prefix 100.64.1.0/24): give one of them an index of its own "
                                "under [routed.nodes]")
    assert _table(ns) == ["10.9.0.0/24 dev lan0 proto kernel scope link src 10.9.0.1 "]


def test_a_node_whose_address_is_this_hosts_gets_no_route_without_slurmd_nodename(host: tuple[str, Path]) -> None:
    """Was: on a compute node without $SLURMD_NODENAME or --self, install routed the node's own
    job prefix through its own address."""
    ns, cfg = host
    env = {k: v for k, v in os.environ.items() if k != "SLURMD_NODENAME"}
    r = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", str(VENV_BIN / "netacct-routes"), "install",
                        "--node", "n1=10.9.0.1", "--node", "n2=10.9.0.2"],
                       capture_output=True, text=True, env=dict(env, NETACCT_CONFIG=str(cfg)))
    assert r.returncode == 0, r.stderr
    assert r.stdout == ("100.64.2.0/24 via 10.9.0.2 (n2)\nskipped n1: its address 10.9.0.1 is this host's\n"
                        "installed 1 routes, removed 0 stale ones\n")
    assert [line for line in _table(ns) if line.startswith("100.64.")] == [
        "100.64.2.0/24 via 10.9.0.2 dev lan0 proto 222 "]


@pytest.mark.slow  # scontrol tries to reach slurmctld for 9 s
def test_scontrols_own_message_is_shown_when_slurmctld_is_not_up(host: tuple[str, Path], tmp_path: Path) -> None:
    """Was: `scontrol show nodes failed: Command '[...]' returned non-zero exit status 1.`"""
    ns, cfg = host
    in_ns(ns, "ip", "link", "set", "lo", "up")
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=x\nSlurmctldHost=ctl(10.9.0.1)\nSlurmctldPort=6999\nAuthType=auth/munge\n"
                    f"AuthInfo=socket={tmp_path}/munge.socket\nNodeName=n1 NodeAddr=10.9.0.1\nPartitionName=p Nodes=n1\n")
    r = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", str(VENV_BIN / "netacct-routes"), "install"],
                       capture_output=True, text=True, env=dict(os.environ, NETACCT_CONFIG=str(cfg), SLURM_CONF=str(conf)))
    assert r.returncode == 7 and r.stdout == ""
    assert r.stderr == ("netacct-routes: scontrol show nodes failed (exit 1): slurm_load_node error: Unable to "
                        "contact slurm controller (connect failure) (is slurmctld up? Or give the nodes with "
                        "--node NAME=ADDR)\n")

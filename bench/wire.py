#!/usr/bin/env python3
"""What each way of counting counts against what the wire carried, and what BPF costs a packet.

    .venv/bin/python bench/wire.py [--mbytes 20] [--backends bpf,cgroup,nftables,iptables]

For each way of counting (and the cgroup engine, `cgroup`: its own cgroup per job), one job in the sandbox (tests/topology.py: the links to the servers
are wires, the node's uplink merges what it receives) sends and receives MBYTES of TCP to the
WAN server over IPv4 and IPv6 and 2000 UDP datagrams of 1200 bytes, and the script prints the
job's counts next to what came off the wire (bytes and packets, each direction), with the
shortfall in percent. For BPF (both engines) it also reads the kernel's run-time statistics of the job's two
programs (BPF_ENABLE_STATS: off again when the script ends) and prints the time per program
run, per wire packet and per GB on the wire (CPU ms; both directions of the case). Nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import BACKENDS, CG_ROOT, EXACT, Node  # noqa: E402
from topology import PORT, WAN4, WAN6, Topology  # noqa: E402

from slurm_netacct import naming  # noqa: E402
from slurm_netacct.kernel import bpf, cgroup, tc  # noqa: E402
from slurm_netacct.kernel.netns import entered  # noqa: E402

CASES = [("tcp-up", WAN4), ("tcp-down", WAN4), ("tcp-up", WAN6), ("tcp-down", WAN6),
         ("udp-up", WAN4), ("udp-down", WAN6)]


def program_ids(node: Node, job: int) -> list[int]:
    """The job's two programs: the tc filters on its link, or those on its cgroup."""
    if node.backend == "cgroup":
        where = naming.job_cgroup(CG_ROOT, naming.netns_name(node.cfg.netns_prefix, job))
        return [i for ids in cgroup.attached(where).values() for i in ids]
    with entered(Path(f"/run/netns/{node.topo.node}")):
        with tc.rtnl() as sock:
            return list(tc.our_programs(sock, socket.if_nametoindex(f"na{job}")).values())


def program_stats(node: Node, job: int) -> tuple[int, int]:
    """(run count, run time ns) of the job's two programs."""
    runs = ns = 0
    for prog_id in program_ids(node, job):
        fd = bpf.prog_fd_by_id(prog_id)
        try:
            info = bpf.prog_info(fd)
        finally:
            os.close(fd)
        runs += info.run_cnt
        ns += info.run_time_ns
    return runs, ns


def run_backend(topo: Topology, work: Path, backend: str, mbytes: int) -> list[dict[str, object]]:
    node = Node(topo, work / backend, backend, daemon=False)
    rows: list[dict[str, object]] = []
    try:
        for i, (kind, host) in enumerate(CASES):
            job = 9100 + i
            topo.reset_servers()
            node.prolog(job)
            before = program_stats(node, job) if backend in EXACT else (0, 0)
            args = [str(mbytes * 1_000_000)] if kind.startswith("tcp") else ["2000", "1200"]
            node.traffic(job, kind, host, str(PORT), *args)
            topo.wait_quiet()
            wire = topo.server_counts("wan")
            live = node.live(job)
            after = program_stats(node, job) if backend in EXACT else (0, 0)
            node.epilog(job)
            for d, side in (("out", "rx"), ("in", "tx")):
                c = live[("wan", d)]
                w = wire[side]
                rows.append({"backend": backend, "case": f"{kind} v{6 if ':' in host else 4}", "direction": d,
                             "counted": [c.packets, c.bytes], "wire": list(w),
                             "bytes_short_pct": round(100 * (w[1] - c.bytes) / w[1], 2) if w[1] else 0.0,
                             "packets_ratio": round(w[0] / c.packets, 1) if c.packets else None})
            if backend in EXACT:
                runs, ns = after[0] - before[0], after[1] - before[1]
                packets = sum(wire[s][0] for s in ("rx", "tx"))
                wire_bytes = sum(wire[s][1] for s in ("rx", "tx"))
                rows[-1]["bpf_ns_per_run"] = round(ns / runs) if runs else None
                rows[-1]["bpf_ns_per_wire_packet"] = round(ns / packets) if packets else None
                rows[-1]["bpf_ms_per_wire_gbyte"] = round(ns / wire_bytes * 1e3, 1) if wire_bytes else None  # CPU ms per GB
    finally:
        node.cleanup()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mbytes", type=int, default=20, help="TCP transfer size, in MB")
    ap.add_argument("--backends", default="bpf,cgroup,nftables,iptables")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tag = f"bw{os.getpid() % 10000}-"
    work = Path(tempfile.mkdtemp(prefix="netacct-bench-wire-"))
    topo = Topology(tag).up()
    stats = bpf.stats_enabled()
    rows: list[dict[str, object]] = []
    try:
        with stats:
            for backend in args.backends.split(","):
                assert backend in BACKENDS or backend == "cgroup", backend
                (work / backend).mkdir()
                rows += run_backend(topo, work, backend, args.mbytes)
    finally:
        topo.down()
        for left in Path("/run/netns").glob(f"{tag}*"):
            subprocess.run(["ip", "netns", "del", left.name], check=False)
        cgroup.remove_tree(CG_ROOT)  # the cgroup engine's subtree (its jobs' cgroups are gone: empty)
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'backend':9} {'case':13} {'dir':3} {'counted pkts':>12} {'wire pkts':>9} {'counted bytes':>13} "
          f"{'wire bytes':>11} {'short %':>7} {'ns/run':>6} {'ns/pkt':>6} {'ms/GB':>6}")
    for r in rows:
        c, w = r["counted"], r["wire"]
        print(f"{r['backend']:9} {r['case']:13} {r['direction']:3} {c[0]:>12} {w[0]:>9} {c[1]:>13} {w[1]:>11} "  # type: ignore[index]
              f"{r['bytes_short_pct']:>7} {r.get('bpf_ns_per_run', '') or '':>6} {r.get('bpf_ns_per_wire_packet', '') or '':>6} "
              f"{r.get('bpf_ms_per_wire_gbyte', '') or '':>6}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

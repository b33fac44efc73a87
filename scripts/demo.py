"""The quick-start demo: one job, real traffic to a LAN and a WAN server, then its report.

Everything runs in network namespaces made here and removed at the end: the "node", a
router, a LAN server (10.77.0.10) and a WAN server (198.51.100.10, a documentation prefix).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from topology import LAN4, PORT, UPLINK, WAN4, Topology  # noqa: E402

BIN = Path(sys.executable).parent
JOB = "4242"
UP, DOWN = 5_000_000, 20_000_000


def main() -> int:
    if os.geteuid() != 0:
        print("demo: must run as root (it creates network namespaces)", file=sys.stderr)
        return 2
    tag = f"demo{os.getpid() % 10000}-"
    work = Path(tempfile.mkdtemp(prefix="netacct-demo-"))
    cfg = work / "netacct.toml"
    cfg.write_text(f'uplink = "{UPLINK}"\nnetns_prefix = "{tag}job-"\ndb = "{work}/netacct.db"\n'
                   f'log_file = "{work}/netacct.log"\n[pool]\nipv6 = "fd00:6e61:6363::/64"\n')
    env = {"NETACCT_CONFIG": str(cfg), "SLURM_JOB_ID": JOB, "SLURM_JOB_USER": "nobody",
           "SLURM_JOB_UID": "65534", "SLURMD_NODENAME": "node1", "SLURM_JOB_ACCOUNT": "demo"}
    topo = Topology(tag)
    print(f"demo: building the sandbox network ({', '.join(topo.namespaces)})")
    topo.up()
    try:
        node = ["nsenter", f"--net=/run/netns/{topo.node}"]
        print(f"demo: prolog for job {JOB}")
        subprocess.run([*node, str(ROOT / "prolog")], env=env, check=True)
        run = [str(BIN / "netacct-exec"), "--job", JOB, "--user", "nobody", "--", sys.executable,
               str(ROOT / "tests" / "traffic.py")]
        xenv = dict(os.environ, NETACCT_CONFIG=str(cfg))
        print(f"demo: the job (as user nobody) uploads {UP:,} bytes to the LAN server {LAN4}")
        subprocess.run([*run, "tcp-up", LAN4, str(PORT), str(UP)], env=xenv, check=True, stdout=subprocess.DEVNULL)
        print(f"demo: the job downloads {DOWN:,} bytes from the WAN server {WAN4}")
        subprocess.run([*run, "tcp-down", WAN4, str(PORT), str(DOWN)], env=xenv, check=True, stdout=subprocess.DEVNULL)
        topo.wait_quiet()
        lan, wan = topo.server_counts("lan"), topo.server_counts("wan")
        print(f"demo: epilog for job {JOB}")
        subprocess.run([*node, str(ROOT / "epilog")], env=env, check=True)
        print("\n$ netacct-report -j 4242")
        subprocess.run([str(BIN / "netacct-report"), "-j", JOB], env=xenv, check=True)
        print("\n$ netacct-report -j 4242 --json")
        subprocess.run([str(BIN / "netacct-report"), "-j", JOB, "--json"], env=xenv, check=True)
        print("\nwhat the servers saw at their IP layer (bytes):")
        print(f"  LAN server received {lan['rx'][1]:>12,}  sent {lan['tx'][1]:>12,}")
        print(f"  WAN server received {wan['rx'][1]:>12,}  sent {wan['tx'][1]:>12,}")
    finally:
        topo.down()
        print(f"\ndemo: sandbox removed; database and log kept in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

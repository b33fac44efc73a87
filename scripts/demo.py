"""The quick-start demo: a real SLURM job talks to a LAN and a WAN server; then its report.

Everything runs in network namespaces made here and removed at the end: a SLURM controller
and one compute node (real slurmctld and slurmd, with the prolog, epilog and SPANK plugin),
a router, a LAN server (10.77.0.10) and a WAN server (198.51.100.10, a documentation prefix).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from slurmharness import NodeSpec, SlurmCluster, ensure_user, make_workdir  # noqa: E402
from topology import CTL4, LAN4, PORT, WAN4, Topology  # noqa: E402

BIN = Path(sys.executable).parent
USER = "netacct-demo"
UP, DOWN = 5_000_000, 20_000_000


def main() -> int:
    if os.geteuid() != 0:
        print("demo: must run as root (it creates network namespaces and starts SLURM)", file=sys.stderr)
        return 2
    subprocess.run(["make", "-s", "-C", str(ROOT / "spank")], check=True)
    ensure_user(USER)
    tag = f"demo{os.getpid() % 10000}-"
    work = make_workdir("netacct-demo")
    shutil.copy(ROOT / "tests" / "traffic.py", work / "traffic.py")
    cfg = work / "netacct.toml"
    topo = Topology(tag, nodes=("n1",), controller=True)
    cfg.write_text(f'uplink = "up0"\nnetns_prefix = "{tag}job-"\nmode = "routed"\n'
                   f'db = "{work}/%n.db"\nlog_file = "{work}/netacct.log"\nspool_dir = "{work}/spool"\n'
                   f'bpffs = "{topo.bpffs}"\n')
    env = dict(os.environ, NETACCT_CONFIG=str(cfg))
    print(f"demo: sandbox network: {', '.join(topo.namespaces)}")
    topo.up()
    slurm = None
    try:
        for ns, extra in ((topo.node, ["--self=n1"]), (topo.ctl, []), (topo.router, [])):
            subprocess.run(["nsenter", f"--net=/run/netns/{ns}", str(BIN / "netacct-routes"), "install",
                            f"--node=n1={topo.node_addr(0)}", *extra], env=env, check=True, stdout=subprocess.DEVNULL)
        slurm = SlurmCluster(work, topo.ctl, CTL4, [NodeSpec("n1", topo.node, topo.node_addr(0), cpus=4)],
                             prolog=str(ROOT / "prolog"), epilog=str(ROOT / "epilog"),
                             plugstack_lines=[f"required {ROOT}/spank/netacct.so prefix={tag}job-"],
                             extra_env={"NETACCT_CONFIG": str(cfg)})
        slurm.start()
        print("demo: SLURM is up (slurmctld + slurmd n1, prolog/epilog and SPANK plugin of slurm-netacct)")
        script = f"""#!/bin/bash
#SBATCH -J netacct-demo
set -e
echo "job $SLURM_JOB_ID on $(hostname), address $(ip -o -4 addr show dev eth0 | awk '{{print $4}}')"
python3 {work}/traffic.py tcp-up {LAN4} {PORT} {UP} > /dev/null
srun python3 {work}/traffic.py tcp-down {WAN4} {PORT} {DOWN} > /dev/null
echo "uploaded {UP} bytes to the LAN server, downloaded {DOWN} bytes from the WAN server"
"""
        print(f"demo: user {USER} submits a job: the batch script uploads {UP:,} bytes to the LAN "
              f"server {LAN4}, an srun step downloads {DOWN:,} bytes from the WAN server {WAN4}")
        job = slurm.sbatch(script, "-o", "demo-%j.out", user=USER)
        state = slurm.wait_job(job, timeout=120)
        out = (slurm.job_dir(USER) / f"demo-{job}.out").read_text()
        print(f"demo: job {job} {state}; its output:\n    " + "\n    ".join(out.strip().splitlines()))
        time.sleep(0.2)
        lan, wan = topo.server_counts("lan", reset=False), topo.server_counts("wan", reset=False)
        print(f"\n$ netacct-report -j {job}")
        subprocess.run([str(BIN / "netacct-report"), "--db", str(work / "n1.db"), "-j", str(job)], env=env, check=True)
        print(f"\n$ netacct-report -j {job} --json")
        subprocess.run([str(BIN / "netacct-report"), "--db", str(work / "n1.db"), "-j", str(job), "--json"],
                       env=env, check=True)
        print("\nwhat the servers saw at their IP layer (bytes):")
        print(f"  LAN server received {lan['rx'][1]:>12,}  sent {lan['tx'][1]:>12,}"
              "   (the job's LAN bytes also hold SLURM's own srun traffic)")
        print(f"  WAN server received {wan['rx'][1]:>12,}  sent {wan['tx'][1]:>12,}")
        if state != "COMPLETED":
            print(slurm.dump_logs(30), file=sys.stderr)
            return 1
    finally:
        if slurm is not None:
            slurm.stop()
        for ns in (topo.node, topo.ctl, topo.router):
            subprocess.run(["nsenter", f"--net=/run/netns/{ns}", str(BIN / "netacct-routes"), "remove"],
                           env=env, stdout=subprocess.DEVNULL, check=False)
        topo.down()
        print(f"\ndemo: SLURM stopped, sandbox removed; database and logs kept in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""End to end with the ledger: real slurmctld, two slurmd, slurmdbd and MariaDB.

The sandbox (tests/topology.py) with nodes n1, n2 and the controller; MariaDB runs in the
controller's namespace and serves both slurmdbd (its accounting database, on 127.0.0.1 there)
and the ledger (the nodes ship to it over the cluster LAN). A 2-node job and an array run as an
unprivileged user; each node ships its database; the ledger report equals the node-database
report; netacct-sacct writes the summaries, and sacct shows them, never overwriting another
tool's text.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, VENV_BIN, cluster_routes, need_root
from mariadb import MariaDB
from slurm_netacct.store import sacct
from slurmharness import NodeSpec, SlurmCluster, ensure_user, make_workdir
from topology import CTL4, LAN4, PORT, Topology

pytestmark = pytest.mark.e2e

USER = "netacct-test"
BASE = f"nle{os.getpid() % 100000}-"
JOB_PREFIX = f"{BASE}%h-"
SHIP_PW, REPORT_PW, SLURMDB_PW = "ship-pw-e2e", "report-pw-e2e", "slurmdb-pw-e2e"


@dataclass
class Lab:
    topo: Topology
    slurm: SlurmCluster
    db: MariaDB
    work: Path
    config: Path

    def env(self) -> dict[str, str]:
        return dict(os.environ, NETACCT_CONFIG=str(self.config))

    def ship(self, i: int) -> str:
        node = f"n{i + 1}"
        r = subprocess.run(["nsenter", f"--net=/run/netns/{self.topo.node_ns(i)}", str(VENV_BIN / "netacct-ship"),
                            "--node", node], capture_output=True, text=True, env=self.env(), timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def report(self, *args: str) -> subprocess.CompletedProcess[str]:
        """netacct-report on the controller (the ledger is reached over the sandbox's LAN only)."""
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.topo.ctl}", str(VENV_BIN / "netacct-report"),
                               *args], capture_output=True, text=True, env=self.env(), timeout=120)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    need_root()
    ensure_user(USER)
    subprocess.run(["make", "-s", "-C", str(ROOT / "spank")], check=True)
    topo = Topology(f"le{os.getpid() % 10000}-", nodes=("n1", "n2"), controller=True)
    work = make_workdir("netacct-ledger-e2e")
    shutil.copy(ROOT / "tests" / "traffic.py", work / "traffic.py")
    for f, pw in (("ship.pw", SHIP_PW), ("report.pw", REPORT_PW)):
        (work / f).write_text(pw + "\n")
        os.chmod(work / f, 0o600)
    config = work / "netacct.toml"
    config.write_text(f'uplink = "up0"\nnetns_prefix = "{JOB_PREFIX}"\nmode = "routed"\n'
                      f'db = "{work}/%n.db"\nlog_file = "{work}/netacct-%n.log"\nspool_dir = "{work}/spool-%n"\n'
                      f'bpffs = "{topo.bpffs}"\n[pool]\nipv4 = "100.64.0.0/16"\n'
                      f'[ledger]\nurl = "mysql://netacct_ship@{CTL4}:3306/netacct"\n'
                      f'password_file = "{work}/ship.pw"\nreport_url = "mysql://netacct_report@{CTL4}:3306/netacct"\n'
                      f'report_password_file = "{work}/report.pw"\ncluster = "lab"\n')
    topo.up()
    slurm = None
    db = None
    try:
        db = MariaDB(netns=topo.ctl, addr="0.0.0.0", port=3306).start()
        db.create_accounts("netacct", SHIP_PW, REPORT_PW)
        db.sql(f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{SLURMDB_PW}';"
               "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';")
        cluster_routes(topo, config, "install")
        nodes = [NodeSpec(f"n{i + 1}", topo.node_ns(i), topo.node_addr(i), cpus=8) for i in range(len(topo.nodes))]
        slurm = SlurmCluster(work, topo.ctl, CTL4, nodes, prolog=str(ROOT / "prolog"), epilog=str(ROOT / "epilog"),
                             plugstack_lines=[f"required {ROOT}/spank/netacct.so netns_dir=/run/netns prefix={JOB_PREFIX}"],
                             extra_env={"NETACCT_CONFIG": str(config),
                                        "NETACCT_SOCKET": str(work / "no-daemon.sock")},
                             cluster_name="lab",
                             slurmdbd_storage={"StorageHost": "127.0.0.1", "StoragePort": "3306",
                                               "StorageUser": "slurm", "StoragePass": SLURMDB_PW})
        slurm.start(timeout=90)
        yield Lab(topo, slurm, db, work, config)
    finally:
        try:
            if slurm is not None:
                slurm.stop()
            if db is not None:
                db.remove()
            leftovers = [n for n in os.listdir("/run/netns") if n.startswith(BASE)]
            cluster_routes(topo, config, "remove")
        finally:
            topo.down()
        assert leftovers == [], f"left behind: {leftovers}"
        shutil.rmtree(work, ignore_errors=True)


def _sacct(lab: Lab, job: int, field: str = "SystemComment") -> str:
    r = lab.slurm.run("sacct", "-M", "lab", "-X", "-n", "-P", "-j", str(job), "-o", f"JobIDRaw,{field}")
    [line] = [ln for ln in r.stdout.splitlines() if ln.startswith(f"{job}|")]
    return line.split("|", 1)[1]


def test_two_node_job_and_array_reach_the_ledger_and_sacct(lab: Lab) -> None:
    two = f"""#!/bin/bash
#SBATCH -N2 -n2 --ntasks-per-node=1 -w n1,n2
srun python3 {lab.work}/traffic.py tcp-up {LAN4} {PORT} 300000
"""
    arr = f"""#!/bin/bash
#SBATCH --array=1-3 -n1
python3 {lab.work}/traffic.py tcp-up {LAN4} {PORT} $((SLURM_ARRAY_TASK_ID * 100000))
"""
    job = lab.slurm.sbatch(two, "-o", "two-%j.txt", user=USER)
    array = lab.slurm.sbatch(arr, "-o", "arr-%A_%a.txt", user=USER)
    assert lab.slurm.wait_job(job, timeout=120) == "COMPLETED", lab.slurm.dump_logs(40)
    assert set(lab.slurm.wait_array(array, timeout=120).values()) == {"COMPLETED"}
    tasks = sorted(int(r["JobId"]) for r in lab.slurm.jobcomp_records() if r.get("ArrayJobId") == str(array))
    assert len(tasks) == 3
    ids = ",".join(map(str, [job, *tasks]))

    # Another tool's text in the field of one task (a site's note), and jobstats' in AdminComment.
    first = next(r["ArrayTaskId"] for r in lab.slurm.jobcomp_records() if r["JobId"] == str(tasks[0]))
    lab.slurm.run("sacctmgr", "-i", "modify", "job", "where", f"jobid={array}_{first}", "set",
                  "SystemComment=site-note")
    lab.slurm.run("sacctmgr", "-i", "modify", "job", "where", f"jobid={job}", "set", "AdminComment=js1:abc")

    # Before shipping nothing is final in the ledger: netacct-sacct writes nothing.
    r = lab.slurm.run(str(VENV_BIN / "netacct-sacct"), env={"NETACCT_CONFIG": str(lab.config)}, check=False)
    assert r.returncode == 0 and r.stdout.startswith("lab: 0 summaries written"), r.stdout + r.stderr

    assert "rows shipped" in lab.ship(0)
    # Only n1 has shipped: the 2-node job is not complete in the ledger, the array tasks on n1 are.
    r = lab.slurm.run(str(VENV_BIN / "netacct-sacct"), env={"NETACCT_CONFIG": str(lab.config)})
    assert _sacct(lab, job) == ""
    assert "rows shipped" in lab.ship(1)
    lab.ship(0)

    dbs = [a for p in sorted(lab.work.glob("n*.db")) for a in ("--db", str(p))]
    nodes = lab.report("--json", "--per-node", "-j", ids, *dbs)
    ledger = lab.report("--json", "--per-node", "-j", ids, "--ledger")
    assert nodes.returncode == 0 and ledger.returncode == 0, nodes.stderr + ledger.stderr
    assert ledger.stdout == nodes.stdout
    recs = {int(r["job_id"]): r for r in json.loads(ledger.stdout)}
    assert recs[job]["nodes"] == ["n1", "n2"] and recs[job]["state"] == "completed"
    assert recs[job]["traffic"]["lan"]["out_bytes"] > 600000
    assert set(recs) == {job, *tasks}

    r = lab.slurm.run(str(VENV_BIN / "netacct-sacct"), env={"NETACCT_CONFIG": str(lab.config)})
    assert f"1 jobs left alone, their SystemComment holds another tool's text (first: job {tasks[0]})" in r.stdout, r.stdout
    for j in (job, *tasks[1:]):
        summ = sacct.parse(_sacct(lab, j))
        t = recs[j]["traffic"]
        assert summ == {k: (v["in_bytes"], v["out_bytes"]) for k, v in t.items()}, (j, _sacct(lab, j))
    assert _sacct(lab, tasks[0]) == "site-note"
    assert _sacct(lab, job, "AdminComment") == "js1:abc"
    # A second run writes nothing again.
    r = lab.slurm.run(str(VENV_BIN / "netacct-sacct"), env={"NETACCT_CONFIG": str(lab.config)})
    assert r.stdout.startswith("lab: 0 summaries written"), r.stdout

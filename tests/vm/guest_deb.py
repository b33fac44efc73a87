"""Inside a pristine test VM: the Debian package's life on a node (install, jobs, upgrade, purge).

The second part of the ``deb`` scenario (tests/vm/guest_deb.sh, which removed the checkout,
listed the file system and installed the OLDER package, runs this with the Debian python3 that
the package's Depends brought). Only installed files of the package are used: the prolog and
epilog in /usr/lib/slurm-netacct, ``netacct-exec``, ``netacct-report``, the SPANK plugin's
``netacct-nspath``, the ``netacct-daemon`` unit. The sandbox network is tests/topology.py's
(router, LAN and WAN servers in namespaces); this VM is node n1 with its uplink up0 on the
router's bridge, in the default NAT mode of the shipped /etc/slurm/netacct.toml.

Steps: the admin edits the conffile (uplink = "up0"); job 1 runs (prolog, an upload and a
download in the job's namespace, epilog: no service, the hooks run Python themselves); the
newer package is installed over it (apt); the conffile must keep the edit; the admin enables
and starts netacct-daemon; job 2 runs through it; then ``apt-get purge``: the service is
stopped, the node database (billing data) kept with one line saying so; the admin removes
it; the file system is listed again (after.txt) for the host to compare with before.txt.
Each job's WAN bytes and packets from ``netacct-report --json`` go into result.json with what
the WAN server's nftables counters saw; tests/test_vm.py compares them exactly.

Python standard library only.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
from topology import PORT, WAN4, Topology, sh as tsh  # noqa: E402

SYS_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CONF = Path("/etc/slurm/netacct.toml")
LIB = Path("/usr/lib/slurm-netacct")
NODE_ADDR = "10.77.1.2"
UP, DOWN = 1_500_000, 2_500_000  # bytes each job uploads to / downloads from the WAN server


def console(msg: str) -> None:
    print(f"== {msg}", flush=True)
    try:
        with open("/dev/console", "w") as c:
            c.write(f"NETACCT-VM: deb: {msg}\n")
    except OSError:
        pass


class Failed(Exception):
    """A step failed; the message says which and why."""


def sh(*argv: str, check: bool = True, timeout: float = 600,
       env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, cwd="/",
                       env={"PATH": SYS_PATH, "LANG": "C.UTF-8", "HOME": "/root",
                            "DEBIAN_FRONTEND": "noninteractive", **(env or {})})
    if check and r.returncode != 0:
        raise Failed(f"{' '.join(argv)[:200]} exited {r.returncode}:\n{r.stdout[-2000:]}{r.stderr[-3000:]}")
    return r


def package_version() -> str:
    return sh("dpkg-query", "-W", "-f", "${Version} ${Status}", "slurm-netacct", check=False).stdout.strip()


def unit_state(unit: str) -> dict[str, str]:
    return {"enabled": sh("systemctl", "is-enabled", unit, check=False).stdout.strip(),
            "active": sh("systemctl", "is-active", unit, check=False).stdout.strip()}


def hook(which: str, job: int) -> None:
    """The installed prolog/epilog as slurmd runs it: as root, no PATH, the job in the environment."""
    env = {"SLURM_JOB_ID": str(job), "SLURM_JOB_USER": "root", "SLURM_JOB_UID": "0",
           "SLURMD_NODENAME": "n1", "SLURM_JOB_ACCOUNT": "physics", "SLURM_JOB_PARTITION": "batch"}
    r = subprocess.run([str(LIB / which)], env=env, capture_output=True, text=True, timeout=120, cwd="/")
    if r.returncode != 0:
        raise Failed(f"{which} of job {job} exited {r.returncode}: {r.stdout}{r.stderr}")


def job(topo: Topology, job_id: int) -> dict[str, Any]:
    """One job: prolog, an upload and a download in its namespace, epilog; its report."""
    topo.server_counts("wan", reset=True)
    hook("prolog", job_id)
    # Where the SPANK plugin would put the job's tasks (the same C code, as a program).
    nspath = sh(str(LIB / "spank" / "netacct-nspath"), str(job_id)).stdout.strip()
    exec_ = ["/usr/sbin/netacct-exec", "--job", str(job_id), "--", "/usr/bin/python3", str(TOOLS / "traffic.py")]
    up = sh(*exec_, "tcp-up", WAN4, str(PORT), str(UP)).stdout.strip()
    down = sh(*exec_, "tcp-down", WAN4, str(PORT), str(DOWN)).stdout.strip()
    netns = sh("/usr/sbin/netacct-exec", "--job", str(job_id), "--", "readlink", "/proc/self/ns/net").stdout.strip()
    in_nspath = sh("nsenter", f"--net={nspath}", "readlink", "/proc/self/ns/net").stdout.strip()
    topo.wait_quiet()
    hook("epilog", job_id)
    wan = topo.server_counts("wan", reset=False)
    report = json.loads(sh("/usr/bin/netacct-report", "-j", str(job_id), "--json").stdout)
    return {"id": job_id, "nspath": nspath, "netns": netns, "nspath_netns": in_nspath,
            "traffic_up": up, "traffic_down": down, "wan_server": wan, "report": report}


def main() -> int:
    inp, out = Path(sys.argv[1]), Path(sys.argv[2])
    result: dict[str, Any] = {"scenario": "deb", "ok": False, "facts": {}, "timings": {}, "steps": []}
    t0 = time.monotonic()
    topo: Topology | None = None

    def mark(name: str) -> None:
        result["timings"][name] = round(time.monotonic() - t0, 1)
        result["steps"].append(name)
        console(name)

    try:
        debs = sorted((inp / "debs").glob("*.deb"))
        old = [d for d in debs if "old" in d.name]
        new = [d for d in debs if "old" not in d.name]
        if len(old) != 1 or len(new) != 1:
            raise Failed(f"expected one older and one newer .deb, got {[d.name for d in debs]}")
        f = result["facts"]
        f["debian"] = Path("/etc/debian_version").read_text().strip()
        f["pid1"] = Path("/proc/1/comm").read_text().strip()
        f["checkout_present"] = (inp / "src").exists()
        f["version_old"] = package_version()
        f["units_after_install"] = {u: unit_state(u) for u in ("netacct-daemon.service", "netacct-sample.timer")}
        f["conffiles"] = sh("dpkg-query", "-W", "-f", "${Conffiles}", "slurm-netacct").stdout.strip()
        f["python_of_commands"] = sh("readlink", "-f", "/usr/lib/slurm-netacct/venv/bin/python").stdout.strip()
        f["pip_list"] = sh("/usr/lib/slurm-netacct/venv/bin/python", "-c",
                           "import importlib.metadata as m; print(sorted(d.metadata['Name'] for d in m.distributions()))"
                           ).stdout.strip()
        mark("installed old")

        # The admin's edit of the conffile (README, "Installing on a cluster", step 2).
        text = CONF.read_text()
        if '# uplink = "eth0"' not in text:
            raise Failed(f"the shipped {CONF} has no '# uplink = \"eth0\"' line to edit")
        edited = text.replace('# uplink = "eth0"', 'uplink = "up0"  # edited by the admin (VM test)')
        CONF.write_text(edited)

        topo = Topology("vm-", nodes=(), controller=False).up()
        rtr = topo.router
        tsh("ip", "link", "add", "up0", "type", "veth", "peer", "name", "p0", "netns", rtr)
        tsh("ip", "-n", rtr, "link", "set", "p0", "master", "br0")
        tsh("ip", "-n", rtr, "link", "set", "p0", "up")
        tsh("ip", "link", "set", "up0", "up")
        tsh("ip", "addr", "add", f"{NODE_ADDR}/24", "dev", "up0")
        tsh("ip", "route", "add", "default", "via", "10.77.1.1")
        mark("network up")

        result["jobs"] = [job(topo, 101)]
        mark("job 1 (old package, no service)")

        r = sh("apt-get", "install", "-y", "--no-install-recommends", str(new[0]))  # see guest_deb.sh
        (out / "logs" / "apt-install-new.log").write_text(r.stdout + r.stderr)
        f["version_new"] = package_version()
        f["conffile_kept"] = CONF.read_text() == edited
        f["conffile_leftovers"] = sorted(str(p) for p in CONF.parent.glob("netacct.toml.dpkg-*"))
        mark("upgraded")

        sh("systemctl", "enable", "--now", "netacct-daemon.service")
        time.sleep(1)
        f["daemon_after_enable"] = unit_state("netacct-daemon.service")
        result["jobs"].append(job(topo, 102))
        f["daemon_log"] = sh("journalctl", "-u", "netacct-daemon", "--no-pager", "-o", "cat", check=False).stdout[-3000:]
        f["daemon_pid_before_purge"] = sh("systemctl", "show", "-p", "MainPID", "--value",
                                          "netacct-daemon.service").stdout.strip()
        mark("job 2 (new package, through netacct-daemon)")

        topo.down()
        tsh("ip", "link", "del", "up0", check=False)
        topo = None
        r = sh("apt-get", "purge", "-y", "slurm-netacct")
        (out / "logs" / "apt-purge.log").write_text(r.stdout + r.stderr)
        f["purge_output"] = (r.stdout + r.stderr)[-3000:]
        f["version_after_purge"] = package_version()
        f["daemon_after_purge"] = unit_state("netacct-daemon.service")
        pid = f["daemon_pid_before_purge"]
        f["daemon_process_after_purge"] = Path(f"/proc/{pid}").exists() if pid not in ("", "0") else None
        kept = Path("/var/lib/slurm-netacct")
        f["kept_after_purge"] = sorted(str(p) for p in kept.rglob("*")) if kept.exists() else []
        f["run_after_purge"] = sh("find", "/run", "-name", "*netacct*", "-not", "-name", "*netacct-vm*").stdout.split()
        sh("rm", "-rf", str(kept))  # the admin, once the billing data is no longer needed
        mark("purged")

        with open(out / "after.txt", "w") as fh:
            subprocess.run(["sh", "-c", "find / -xdev -path /var/lib/netacct-vm -prune -o -print | sort"],
                           stdout=fh, check=True)
        owned = sh("sh", "-c", "dpkg-query -W -f '${Package}\\n' | xargs dpkg -L 2>/dev/null").stdout
        (out / "owned-after.txt").write_text(owned)
        (out / "packages-after.txt").write_text(sh("sh", "-c", "dpkg-query -W -f '${Package}\\n' | sort").stdout)
        # Symlinks update-alternatives made (e.g. iptables'): owned by no package, but by its database.
        alt = sh("sh", "-c", "find / -xdev -path /var/lib/netacct-vm -prune -o -type l -lname '/etc/alternatives/*' -print"
                 ).stdout
        (out / "alternatives-links.txt").write_text(alt)
        mark("listed")
        result["ok"] = True
    except Exception as e:  # everything goes back to the host in result.json
        result["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        console(f"FAILED: {e}")
    finally:
        if topo is not None:
            try:
                topo.down()
            except Exception:
                pass
        (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

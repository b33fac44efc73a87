"""A pristine install of the Debian package in a VM (issue 19's third scenario; tests/vmharness.py).

The host builds two packages from this work tree with ``scripts/build-deb`` (an older version
``0.1.0~old1`` and the current one); the VM is a pristine Debian 12 (systemd, no checkout, no
venv of ours, no network) whose apt cache holds the package's Depends. Inside
(tests/vm/guest_deb.sh, then tests/vm/guest_deb.py): install the older package with apt, edit
its conffile, run a job with the installed prolog/epilog (no service), upgrade to the current
package, check the edit survived, enable and start netacct-daemon, run a job through it, purge.
Here: each job's WAN bytes and packets from ``netacct-report --json`` equal what the WAN
server's nftables counters saw; the service was not enabled by the install and is stopped by
the purge; the node database was kept by the purge (billing data); and once the admin removes
it, every path the file system gained since before the install belongs to a package still
installed (the Depends) or is the package manager's own bookkeeping.

Slow (the image takes minutes to build, once per machine; each run boots a VM under software
emulation, about 12 min; bench/RESULTS.md):
marked ``vm``. CI runs it.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, need_root
from vmharness import Recipe, VMResult, ensure_image, run_scenario

pytestmark = pytest.mark.vm

OLD = "0.1.0~old1"
# Test tools the guest installs from the image's apt cache before its "before" listing.
TEST_TOOLS = ("ethtool",)

# What apt, dpkg, systemd and the Debian python3 keep by themselves while packages come and go.
NOISE = [
    re.compile(p) for p in (
        r"^/var/lib/(dpkg|apt|systemd|ucf|python)(/|$)",
        r"^/var/cache/(apt|debconf|ldconfig)(/|$)",
        r"^/var/log/(apt(/|$)|dpkg\.log$|journal(/|$)|alternatives\.log$)",
        r"^/etc/ld\.so\.cache$",
        r"^/etc/alternatives/",
        r"^/usr/lib/python3(\.\d+)?/.*__pycache__(/|$)",  # py3compile of Debian's python3 packages
        r"^/usr/share/python3(/|$)",
    )
]

# Files the Depends' maintainer scripts make (dpkg lists them under no package): allowed only
# while the package whose script made them is installed.
MADE_BY_DEPENDS = [
    (re.compile(r"^/etc/inputrc$"), "readline-common"),
    (re.compile(r"^/etc/networks$"), "netbase"),
    (re.compile(r"^/etc/python3(/debian_config)?$"), "python3"),
    (re.compile(r"^/usr/local/lib/python3\.\d+(/dist-packages)?$"), "python3-minimal"),
]


def build_deb(version: str | None, out: Path) -> Path:
    argv = [str(ROOT / "scripts" / "build-deb"), "--out", str(out)]
    if version:
        argv += ["--version", version]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    return Path(r.stdout.strip().splitlines()[-1].split(": ", 1)[1])


def depends(deb: Path) -> list[str]:
    """The package names of a .deb's Depends (versions and alternatives dropped)."""
    text = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True,
                          check=True).stdout
    return sorted({alt.split()[0] for dep in text.split(",") for alt in dep.split("|") if alt.strip()})


def _usr_merged(path: str) -> str:
    for top in ("/lib", "/bin", "/sbin", "/lib64"):
        if path == top or path.startswith(top + "/"):
            return "/usr" + path
    return path


def leftovers(files: dict[str, str]) -> list[str]:
    """Paths the file system gained from before the install to after the purge that no installed
    package owns and that are no package manager's bookkeeping."""
    before = set(files["before.txt"].splitlines())
    after = set(files["after.txt"].splitlines())
    owned = {_usr_merged(p) for p in files["owned-after.txt"].splitlines() if p.startswith("/")}
    alt_links = set(files.get("alternatives-links.txt", "").splitlines())
    installed = set(files["packages-after.txt"].split())
    made = [rx for rx, pkg in MADE_BY_DEPENDS if pkg in installed]
    return sorted(p for p in after - before
                  if _usr_merged(p) not in owned and p not in alt_links and not any(n.search(p) for n in NOISE)
                  and not any(rx.search(p) for rx in made))


def _pair(v: Any) -> tuple[int, int]:
    return int(v[0]), int(v[1])


def _explain(res: VMResult) -> str:
    return "\n".join([str(res.result.get("error", "")), res.files.get("guest.log", "")[-3000:],
                      res.log_tail("logs/apt-install-old.log", 30), res.log_tail("journal.txt", 40)])


def test_deb_install_upgrade_purge_in_a_pristine_debian12(tmp_path: Path) -> None:
    need_root()
    old = build_deb(OLD, tmp_path)
    new = build_deb(None, tmp_path)
    assert "old" in old.name and "old" not in new.name, (old, new)
    image = ensure_image(Recipe.for_release("bookworm", ROOT, node=False,
                                            download_only=[*depends(new), *TEST_TOOLS]), log=print)
    keep = os.environ.get("NETACCT_VM_KEEP")
    res = run_scenario(image, "deb", debs=[old, new], entry="src/tests/vm/guest_deb.sh", timeout=2400,
                       keep=None if keep is None else ROOT / keep / "deb")
    print(f"VM deb: image {image.dir.name} (built in {image.build['seconds']} s), run {res.seconds} s, "
          f"marks {res.marks}, guest timings {res.result.get('timings')}")
    r = res.result
    assert r["ok"], _explain(res)
    f = r["facts"]
    assert f["pid1"] == "systemd" and f["checkout_present"] is False
    assert f["version_old"] == f"{OLD} install ok installed", f
    assert f["version_new"] == "0.1.0 install ok installed", f
    # Installing enables and starts nothing.
    for unit, state in f["units_after_install"].items():
        assert state == {"enabled": "disabled", "active": "inactive"}, (unit, state)
    assert "/etc/slurm/netacct.toml" in f["conffiles"]
    assert f["python_of_commands"].startswith("/usr/bin/python3"), f
    # The conffile as the admin edited it survived the upgrade, with no .dpkg-dist beside it.
    assert f["conffile_kept"] is True and f["conffile_leftovers"] == [], f
    assert f["daemon_after_enable"] == {"enabled": "enabled", "active": "active"}, f

    # Each job: exactly what the WAN server saw, bytes and packets, both directions.
    for job in r["jobs"]:
        assert job["netns"] == job["nspath_netns"], job  # the SPANK plugin's path = the prolog's namespace
        assert job["nspath"] == f"/run/netns/netacct-{job['id']}", job
        [rec] = job["report"]
        assert rec["job_id"] == str(job["id"]) and rec["state"] == "completed", rec
        t, wan = rec["traffic"]["wan"], job["wan_server"]
        assert (t["out_packets"], t["out_bytes"]) == _pair(wan["rx"]), (t, wan)
        assert (t["in_packets"], t["in_bytes"]) == _pair(wan["tx"]), (t, wan)
        assert t["out_bytes"] > 1_500_000 and t["in_bytes"] > 2_500_000, t
    assert len(r["jobs"]) == 2
    # Job 2 went through the service (it logs each job it handles).
    assert "102" in f["daemon_log"], f["daemon_log"]

    # Purge: the service stopped, the billing data kept (one line says so), nothing else left.
    assert f["version_after_purge"] == "", f
    assert f["daemon_after_purge"]["active"] != "active" and f["daemon_process_after_purge"] is False, f
    # The database with its write-ahead log, if the service's last connection left one (it holds
    # committed records: it belongs with the database).
    db = "/var/lib/slurm-netacct/netacct.db"
    assert db in f["kept_after_purge"] and set(f["kept_after_purge"]) <= {db, f"{db}-wal", f"{db}-shm"}, f
    assert "purge keeps /var/lib/slurm-netacct" in f["purge_output"], f["purge_output"]
    assert f["run_after_purge"] == [], f
    left = leftovers(res.files)
    assert left == [], f"left after purge: {left[:50]}"
    gained = set(res.files["packages-after.txt"].split()) - set(res.files.get("packages-before.txt", "").split())
    assert "slurm-netacct" not in gained and gained, gained  # its Depends stay, as apt leaves them

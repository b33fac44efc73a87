"""The SPANK plugin's and the PAM module's netns_dir and prefix are checked against the config."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import VENV_BIN
from slurm_netacct import config
from slurm_netacct.node import agreement


def _files(tmp_path: Path, plugin_args: str, pam_args: str) -> tuple[Path, Path]:
    conf_d = tmp_path / "plugstack.conf.d"
    conf_d.mkdir()
    plugstack = tmp_path / "plugstack.conf"
    plugstack.write_text(f"# SLURM's own\ninclude {conf_d}/*.conf\noptional /usr/lib/other.so x=1\n")
    (conf_d / "netacct.conf").write_text(f"required /usr/lib/x86_64-linux-gnu/slurm-wlm/netacct.so {plugin_args}\n")
    pam = tmp_path / "sshd"
    pam.write_text("account required pam_slurm_adopt.so\n"
                   f"session required /lib/security/pam_netacct.so {pam_args}  # ssh into jobs\n")
    return plugstack, pam


def test_agreeing_places_say_nothing(tmp_path: Path) -> None:
    cfg = config.parse({"netns_prefix": "acct-%h-", "netns_dir": "/run/netns/"})
    plugstack, pam = _files(tmp_path, "netns_dir=/run/netns prefix=acct-%h-", "prefix=acct-%h-")
    assert agreement.disagreements(cfg, plugstack, pam) == []


def test_each_disagreement_is_one_line_naming_the_file_and_key(tmp_path: Path) -> None:
    cfg = config.parse({"netns_prefix": "acct-"})
    plugstack, pam = _files(tmp_path, "netns_dir=/var/run/netns", "prefix=netacct-")
    lines = agreement.disagreements(cfg, plugstack, pam)
    assert lines == [
        f"{tmp_path}/plugstack.conf.d/netacct.conf: the SPANK plugin's netns_dir=/var/run/netns differs from "
        "the config's /run/netns (netns_dir): its jobs' namespaces will not be found",
        f"{tmp_path}/plugstack.conf.d/netacct.conf: the SPANK plugin's prefix=netacct- differs from the "
        "config's acct- (netns_prefix): its jobs' namespaces will not be found",
        f"{tmp_path}/sshd: the PAM module's prefix=netacct- differs from the config's acct- (netns_prefix): "
        "its jobs' namespaces will not be found"]


def test_the_cgroup_engines_arguments_are_checked_too(tmp_path: Path) -> None:
    cfg = config.parse({"engine": "cgroup", "netns_prefix": "acct-", "bpffs": "/run/bpf",
                        "cgroup": {"mode": "own", "root": "/sys/fs/cgroup/unified/na"}})
    good = "engine=cgroup prefix=acct- bpffs=/run/bpf/ cgroup=own cgroup_root=/sys/fs/cgroup/unified/na"
    plugstack, pam = _files(tmp_path, good, good)
    assert agreement.disagreements(cfg, plugstack, pam) == []
    (tmp_path / "x").mkdir()
    plugstack, pam = _files(tmp_path / "x", "prefix=acct- bpffs=/sys/fs/bpf cgroup=own cgroup_root=/sys/fs/cgroup/unified/na",
                            good.replace("cgroup=own", "cgroup=slurm"))
    where = f"{tmp_path}/x/plugstack.conf.d/netacct.conf"
    assert agreement.disagreements(cfg, plugstack, pam) == [
        f"{where}: the SPANK plugin's engine=netns differs from the config's cgroup (engine): its jobs' "
        "counting programs or cgroups will not be found",
        f"{where}: the SPANK plugin's bpffs=/sys/fs/bpf differs from the config's /run/bpf (bpffs): its jobs' "
        "counting programs or cgroups will not be found",
        f"{tmp_path}/x/sshd: the PAM module's cgroup=slurm differs from the config's own (cgroup.mode): its "
        "jobs' counting programs or cgroups will not be found"]


def test_plugstack_is_found_as_slurmd_finds_it(tmp_path: Path) -> None:
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=x\n")
    assert agreement.plugstack_path({"SLURM_CONF": str(conf)}) == tmp_path / "plugstack.conf"
    conf.write_text("ClusterName=x\nPlugStackConfig = /opt/plug.conf # ours\n")
    assert agreement.plugstack_path({"SLURM_CONF": str(conf)}) == Path("/opt/plug.conf")


def test_netacct_reconcile_warns_at_start(tmp_path: Path) -> None:
    cfgp = tmp_path / "netacct.toml"
    cfgp.write_text(f'netns_prefix = "acct-"\nnetns_dir = "{tmp_path}/netns"\ndb = "{tmp_path}/n.db"\n'
                    f'log_file = "{tmp_path}/log"\nspool_dir = "{tmp_path}/spool"\n')
    plugstack, _ = _files(tmp_path, f"netns_dir={tmp_path}/netns prefix=acct-", "")
    (tmp_path / "slurm.conf").write_text(f"PlugStackConfig={plugstack}\n")
    r = subprocess.run([str(VENV_BIN / "netacct-reconcile"), "--active", "", "--dry-run", "--node", "n1"],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, NETACCT_CONFIG=str(cfgp), SLURM_CONF=str(tmp_path / "slurm.conf")))
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr  # the plugin agrees; the machine's own /etc/pam.d/sshd has no pam_netacct
    (plugstack.parent / "plugstack.conf.d" / "netacct.conf").write_text("required netacct.so prefix=other-\n")
    r = subprocess.run([str(VENV_BIN / "netacct-reconcile"), "--active", "", "--dry-run", "--node", "n1"],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, NETACCT_CONFIG=str(cfgp), SLURM_CONF=str(tmp_path / "slurm.conf")))
    assert r.returncode == 0
    assert r.stderr.splitlines() == [
        f"netacct-reconcile: warning: {plugstack.parent}/plugstack.conf.d/netacct.conf: the SPANK plugin's "
        f"netns_dir=/run/netns differs from the config's {tmp_path}/netns (netns_dir): its jobs' namespaces "
        "will not be found",
        f"netacct-reconcile: warning: {plugstack.parent}/plugstack.conf.d/netacct.conf: the SPANK plugin's "
        "prefix=other- differs from the config's acct- (netns_prefix): its jobs' namespaces will not be found"]
    assert "differs from the config's acct-" in (tmp_path / "log").read_text()

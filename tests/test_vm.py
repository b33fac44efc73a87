"""Whole Debian systems in a VM (tests/vmharness.py): what this machine cannot give the other tests.

- Debian 12 (SLURM 22.05) booted with systemd as PID 1 and pure cgroup v2: SLURM's own
  ``cgroup/v2`` plugin with ``proctrack/cgroup``, ``task/cgroup`` and ``PrologFlags=Contain``.
- Debian 13 (SLURM 24.11): the SPANK plugin and the PAM module built against its headers.

On each, the project is installed as a site installs it, and one job of an unprivileged user is
accounted end to end (tests/vm/guest.py): its batch script uploads to the WAN server, an srun
step downloads from it, an ssh session adopted into the running job (pam_slurm_adopt, then
pam_netacct) uploads again. The job's WAN bytes and packets must equal what the WAN server's
nftables counters saw, in both directions, and so must the ssh session's share on its own.

Then, in the same boot, the cgroup engine in mode "slurm" on SLURM's own job cgroup, with no PAM
module of ours: a second job's batch script (its first instruction uploads), two srun steps and
an adopted ssh session, each part exact against the WAN server; the prolog's pinned programs
attached to SLURM's ``job_<id>`` and to no other cgroup; nothing of the job left in the kernel
after the epilog.

Slow (an image build takes minutes when the machine's cache has none; each run boots a VM under
software emulation: 6–7 min on an idle machine before the cgroup engine's phase was added, up
to 25 min with it on a loaded one, bench/RESULTS.md; hence the 40 min limit of a run): marked ``vm``, skipped with ``-m "not vm"``. CI runs them.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import pytest

from conftest import ROOT, need_root
from vmharness import RELEASES, Recipe, VMResult, ensure_image, run_scenario

pytestmark = pytest.mark.vm

USER = "netacct-test"


def _run_slurm_scenario(release: str) -> VMResult:
    need_root()
    image = ensure_image(Recipe.for_release(release, ROOT), log=print)
    keep = os.environ.get("NETACCT_VM_KEEP")  # a directory: keep the VM's logs there for a look
    res = run_scenario(image, "slurm", timeout=2400,
                       keep=None if keep is None else ROOT / keep / release)
    print(f"VM {release}: image {image.dir.name} (built in {image.build['seconds']} s), "
          f"run {res.seconds} s, marks {res.marks}, guest timings {json.dumps(res.result.get('timings'))}")
    return res


def _explain(res: VMResult) -> str:
    return "\n".join([str(res.result.get("error", "")), res.files.get("guest.log", "")[-3000:],
                      res.log_tail("logs/slurmd.log"), res.log_tail("logs/slurmctld.log"),
                      res.log_tail("logs/netacct.log", 30), res.log_tail("logs/journal-ssh.txt", 30)])


def _pair(v: Any) -> tuple[int, int]:
    return int(v[0]), int(v[1])


def _check_job(res: VMResult, slurm_release: str) -> None:
    r = res.result
    assert r["ok"], _explain(res)
    facts = r["facts"]
    # A whole system: systemd as PID 1, the pure cgroup v2 hierarchy only, the expected SLURM.
    assert facts["pid1"] == "systemd"
    assert facts["cgroup_fs"] == "cgroup2fs" and all(" cgroup2 " in m for m in facts["cgroup_mounts"])
    assert facts["slurm_version"].startswith(f"slurm-wlm {slurm_release}.") or \
        facts["slurm_version"].startswith(f"slurm {slurm_release}."), facts["slurm_version"]
    assert facts["config_ProctrackType"] == "proctrack/cgroup" and facts["config_TaskPlugin"] == "task/cgroup"
    assert facts["config_CgroupPlugin"] == "cgroup/v2"
    assert "Contain" in facts["config_PrologFlags"] and "Alloc" in facts["config_PrologFlags"]
    assert facts["daemon_active"] == "active"

    job = r["job"]
    jid = job["id"]
    out = job["output"]
    assert job["state"] == "COMPLETED", out + _explain(res)
    assert re.search(r"^addr 100\.64\.1\.\d+/32$", out, re.M), out  # routed mode: n1's job prefix
    # The batch script and the srun step ran in the job's namespace, in SLURM's own v2 job cgroup.
    assert f"batch-netns {job['netns']}" in out and f"step-netns {job['netns']}" in out, out
    assert re.search(rf"^batch-cgroup 0::/\S*/job_{jid}/step_batch(/\S*)?$", out, re.M), out
    assert re.search(rf"^step-cgroup 0::/\S*/job_{jid}/step_0(/\S*)?$", out, re.M), out
    p = r["payloads"]
    assert f"batch-up {p['batch_up']}" in out and f"srun-down {p['srun_down']}" in out and "released" in out

    # The ssh session: adopted into the job's extern step, entered the job's namespace.
    ssh = r["ssh"]
    assert ssh["returncode"] == 0, ssh["stderr"] + _explain(res)
    assert re.search(rf"^ssh-cgroup 0::/\S*/job_{jid}/step_extern(/\S*)?$", ssh["stdout"], re.M), ssh["stdout"]
    assert f"ssh-netns {job['netns']}" in ssh["stdout"] and f"ssh-up {p['ssh_up']}" in ssh["stdout"]
    # ... and its traffic is the job's: the job's live WAN counters moved by exactly what the WAN
    # server saw during the session, both directions, bytes and packets.
    [before], [after] = ssh["report_before"], ssh["report_after"]
    assert before["state"] == after["state"] == "running" and after["live"]
    srv_rx = [a - b for a, b in zip(_pair(ssh["server_after"]["rx"]), _pair(ssh["server_before"]["rx"]))]
    srv_tx = [a - b for a, b in zip(_pair(ssh["server_after"]["tx"]), _pair(ssh["server_before"]["tx"]))]
    wb, wa = before["traffic"]["wan"], after["traffic"]["wan"]
    assert [wa["out_packets"] - wb["out_packets"], wa["out_bytes"] - wb["out_bytes"]] == srv_rx
    assert [wa["in_packets"] - wb["in_packets"], wa["in_bytes"] - wb["in_bytes"]] == srv_tx
    assert srv_rx[1] > p["ssh_up"]

    # The whole job, from the epilog's record: exactly what the WAN server saw.
    [rec] = r["report"]
    assert rec["job_id"] == str(jid) and rec["user"] == USER and rec["nodes"] == ["n1"], rec
    assert rec["state"] == "completed", rec
    wan, t = r["wan_server"], rec["traffic"]["wan"]
    assert (t["out_packets"], t["out_bytes"]) == _pair(wan["rx"])
    assert (t["in_packets"], t["in_bytes"]) == _pair(wan["tx"])
    assert t["out_bytes"] > p["batch_up"] + p["ssh_up"] and t["in_bytes"] > p["srun_down"]


def _wan(snap: dict[str, Any]) -> tuple[int, int, int, int]:
    """(out packets, out bytes, in packets, in bytes) of the job's live WAN counters."""
    [rec] = snap["report"]
    assert rec["state"] == "running" and rec["live"], rec
    t = rec["traffic"]["wan"]
    return t["out_packets"], t["out_bytes"], t["in_packets"], t["in_bytes"]


def _server(snap: dict[str, Any]) -> tuple[int, int, int, int]:
    """The same four numbers as the WAN server saw them (what it received is the job's out)."""
    return (*_pair(snap["server"]["rx"]), *_pair(snap["server"]["tx"]))


def _minus(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x - y for x, y in zip(a, b))


def _check_cgroup_engine(res: VMResult) -> None:
    """Phase 2 of the same VM: engine = "cgroup", [cgroup] mode = "slurm", on SLURM's own
    cgroup/v2 job cgroup, with no PAM module of ours in sshd's stack."""
    c = res.result["cgroup"]
    jid, out, p = c["id"], c["output"], c["payloads"]
    assert c["state"] == "COMPLETED", out + _explain(res)
    # No namespace: the batch script, both steps and the ssh session ran in the node's own; each
    # in SLURM's job cgroup, in the step SLURM put it in.
    assert f"batch-netns {c['node_netns']}" in out, out
    assert re.search(rf"^batch-cgroup 0::/\S*/job_{jid}/step_batch(/\S*)?$", out, re.M), out
    assert re.search(rf"^step-cgroup 0::/\S*/job_{jid}/step_0(/\S*)?$", out, re.M), out
    assert re.search(rf"^step2-cgroup 0::/\S*/job_{jid}/step_1(/\S*)?$", out, re.M), out
    assert f"batch-up {p['batch_up']}" in out and f"srun-down {p['srun_down']}" in out, out
    assert f"srun-udp {p['udp_count']}" in out and "released" in out, out
    pam = res.result["facts"]["cgroup_phase_sshd_pam"]
    assert any("pam_slurm_adopt.so" in line for line in pam) and not any("pam_netacct" in line for line in pam), pam
    ssh = c["ssh"]
    assert ssh["returncode"] == 0, ssh["stderr"] + _explain(res)
    assert re.search(rf"^ssh-cgroup 0::/\S*/job_{jid}/step_extern(/\S*)?$", ssh["stdout"], re.M), ssh["stdout"]
    assert f"ssh-netns {c['node_netns']}" in ssh["stdout"] and f"ssh-up {p['ssh_up']}" in ssh["stdout"], ssh

    # Where the programs are: the prolog's pins, attached to SLURM's own job_<id> and nowhere
    # else (not to a step, not to a cgroup of ours: mode "slurm" makes none).
    run = c["running"]
    pins = run["pins"]
    assert pins["files"] == sorted([f"netacct-{jid}", f"netacct-{jid}-in", f"netacct-{jid}-out"]), pins
    [job_dir] = run["job_dirs"]
    assert re.fullmatch(rf"/sys/fs/cgroup/\S*slurmstepd\.scope/job_{jid}", job_dir), job_dir
    for d in ("out", "in"):
        holders = sorted(cg for cg, att in run["attached"].items() for ids in att.values() if pins[d]["id"] in ids)
        assert holders == [job_dir], (d, run["attached"])
        assert pins[d]["id"] in run["attached"][job_dir][d], run["attached"]
        assert pins["counters"]["id"] in pins[d]["map_ids"], pins
    assert not run["own_root_exists"]

    # Exact, piece by piece: the batch script's upload (its first instruction) alone, the two
    # srun steps, the adopted ssh session; bytes and packets both ways against the WAN server.
    zero = (0, 0, 0, 0)
    b, s, h = c["after_batch"], c["after_steps"], c["after_ssh"]
    batch = _wan(b)
    assert batch == _server(b) and batch[1] > p["batch_up"], (batch, _server(b))
    steps = _minus(_wan(s), _wan(b))
    assert steps == _minus(_server(s), _server(b)), (steps, _minus(_server(s), _server(b)))
    assert steps[3] > p["srun_down"] and steps[1] > p["udp_count"] * p["udp_size"], steps
    sess = _minus(_wan(h), _wan(s))
    assert sess == _minus(_server(h), _server(s)) and sess[1] > p["ssh_up"], (sess, _minus(_server(h), _server(s)))
    assert batch != zero and steps != zero

    # The whole job, from the epilog's record: exactly what the WAN server saw.
    [rec] = c["report"]
    assert rec["job_id"] == str(jid) and rec["user"] == USER and rec["state"] == "completed", rec
    t, wan = rec["traffic"]["wan"], c["wan_server"]
    assert (t["out_packets"], t["out_bytes"]) == _pair(wan["rx"]) and (t["in_packets"], t["in_bytes"]) == _pair(wan["tx"])

    # After the epilog nothing of ours is left: no pin, no program or map, no attachment.
    gone = c["after_epilog"]
    assert gone["pins"]["files"] == [] and gone["progs_alive"] == [] and gone["maps_alive"] == [], gone
    ours = {pins["out"]["id"], pins["in"]["id"]}
    assert not [cg for cg, att in gone["attached"].items() for ids in att.values() if ours & set(ids)], gone
    assert not gone["own_root_exists"]


def test_slurm_cgroup_v2_under_systemd_debian12() -> None:
    """Scenario 1: SLURM 22.05's cgroup/v2 under systemd: the namespace engine end to end, then
    (same boot) the cgroup engine on SLURM's own job cgroup."""
    res = _run_slurm_scenario("bookworm")
    _check_job(res, RELEASES["bookworm"])
    _check_cgroup_engine(res)


def test_slurm_24_11_debian13() -> None:
    """Scenario 2: SLURM 24.11 (Debian 13): the plugin and the PAM module build and work, both
    engines as on Debian 12."""
    res = _run_slurm_scenario("trixie")
    _check_job(res, RELEASES["trixie"])
    _check_cgroup_engine(res)

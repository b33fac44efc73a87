"""The reaper (netacct-reconcile): finds what the project left for jobs no longer on the node
(a crashed prolog or epilog, a node that rebooted, a daemon killed mid-work), stores the
counters that still exist, marks those jobs "reconciled", and removes the rest.

It only ever touches objects whose names carry the project's prefixes and a job id, and only
for jobs that SLURM says are not on this node; if SLURM cannot be asked, it touches nothing.
First (unless --dry-run) it stores the records that epilogs spooled while the database could
not be written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

from .. import naming
from ..config import Config
from ..errors import SetupError, StoreError
from ..kernel import links
from ..log import get as get_log
from ..states import State
from ..store import db as store
from ..store import spool
from . import lifecycle, nat
from .locks import job_lock

# Job states in which a job may still have (or be about to get) its namespace on a node.
ACTIVE_STATES = "CONFIGURING,RUNNING,COMPLETING,SUSPENDED,STOPPED,SIGNALING,STAGE_OUT,RESIZING"


@dataclass
class ReconcileResult:
    """What was found, and what was done about it."""

    found: dict[int, list[str]] = field(default_factory=dict)  # job id -> what was left
    reconciled: dict[int, str] = field(default_factory=dict)  # job id -> state recorded
    kept: list[int] = field(default_factory=list)  # still active according to SLURM
    failed: dict[int, str] = field(default_factory=dict)


def slurm_active_jobs(node: str, squeue: str | None = None, timeout: float = 30) -> set[int] | None:
    """Job ids SLURM has on this node in an active state; None (and why, logged) if SLURM
    cannot be asked."""
    log = get_log()
    exe = squeue or shutil.which("squeue") or shutil.which("squeue", path="/usr/bin:/usr/local/bin")
    if exe is None:
        log.error("reconcile: squeue is not installed: SLURM cannot be asked which jobs run on %s", node)
        return None
    try:
        proc = subprocess.run([exe, "-h", "-w", node, "-t", ACTIVE_STATES, "-o", "%A"],
                              capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        log.error("reconcile: squeue failed: %s", exc)
        return None
    if proc.returncode != 0:
        log.error("reconcile: squeue exited %d: %s", proc.returncode, " ".join(proc.stderr.split())[:300])
        return None
    jobs: set[int] = set()
    for word in proc.stdout.split():
        try:
            jobs.add(naming.parse_job_id(word))
        except ValueError:
            log.error("reconcile: squeue answered %r, which is not a job id: its answer is not used", word[:40])
            return None  # an answer we do not understand is no answer
    return jobs


def leftovers(cfg: Config, node: str) -> dict[int, list[str]]:
    """Every job with something of the project on this node: namespaces, links, pins, cgroups,
    DB rows, leases."""
    found: dict[int, list[str]] = {}
    prefix = naming.expand_prefix(cfg.netns_prefix)
    try:
        names = os.listdir(cfg.netns_dir)
    except FileNotFoundError:
        names = []
    for name in names:
        job = naming.job_id_from_netns(prefix, name)
        if job is not None:
            found.setdefault(job, []).append(f"namespace {name}")
    for link in links.list_links():
        job = naming.job_id_from_ifname(cfg.ifname_prefix, link)
        if job is not None:
            found.setdefault(job, []).append(f"link {link}")
    pins = cfg.bpffs / naming.BPF_PIN_DIR
    try:
        pinned = os.listdir(pins)
    except OSError:  # no BPF counting here (yet)
        pinned = []
    for name in sorted(pinned):  # counters (both engines), programs (the cgroup engine)
        job = naming.job_id_from_pin(prefix, name)
        if job is not None:
            what = "counters" if naming.job_id_from_netns(prefix, name) is not None else "program"
            found.setdefault(job, []).append(f"{what} {pins / name}")
    if cfg.engine == "cgroup":  # the cgroup engine's own cgroups (mode "own")
        from ..counting import cgroup as cgroup_counting

        try:
            base = cgroup_counting.root(cfg)
            own = os.listdir(base)
        except (SetupError, OSError):
            own = []
        for name in own:
            job = naming.job_id_from_netns(prefix, name)
            if job is not None and (base / name).is_dir():
                found.setdefault(job, []).append(f"cgroup {base / name}")
    path = cfg.db_for(node)
    if path.exists():
        db = store.connect(path)
        try:
            for row in store.running_jobs(db, node):
                found.setdefault(int(row["job_id"]), []).append(f"running row (run {row['restart']})")
            for job in store.leased_jobs(db, node):
                found.setdefault(job, []).append("address lease")
        finally:
            db.close()
    return found


def reconcile(cfg: Config, node: str, active: set[int] | None, dry_run: bool = False) -> ReconcileResult:
    """Tear down every leftover of jobs not in `active`; with active None, only report."""
    log = get_log()
    if not dry_run:
        replay(cfg, node)
    result = ReconcileResult(found=leftovers(cfg, node))
    if active is None:
        log.warning("reconcile: SLURM cannot be asked which jobs run on %s: nothing touched (%d jobs "
                    "with leftovers)", node, len(result.found))
        return result
    for job, what in sorted(result.found.items()):
        if job in active:
            result.kept.append(job)
            continue
        if dry_run:
            continue
        info = _job_info(cfg, node, job)
        try:
            with job_lock(info.job_id):
                done = lifecycle.teardown(cfg, info, done_state=State.RECONCILED)
            state = str(done.state)
            if state == State.LOST:
                state = f"{State.RECONCILED} (counters lost)"
            if done.spooled is not None:
                state += f" (database error; record spooled to {done.spooled})"
            result.reconciled[job] = state
            log.warning("job %d: reconciled (%s): %s", job, "; ".join(what), state)
        except (SetupError, StoreError, OSError) as exc:
            result.failed[job] = str(exc)
            log.error("job %d: reconcile failed: %s", job, exc)
    return result


def replay(cfg: Config, node: str) -> int:
    """Store the node's spooled records in its database (creating it if it is missing); the
    number stored. A database that cannot be written is logged: the records stay spooled."""
    log = get_log()
    path = cfg.db_for(node)
    if not path.exists() and not spool.spool_pending(cfg.spool_for(node), node):
        return 0
    try:
        db = store.connect(path)
        try:
            n = spool.replay_spool(db, cfg.spool_for(node), node)
        finally:
            db.close()
    except StoreError as exc:
        log.error("reconcile: the spooled records stay in %s: %s", cfg.spool_for(node), exc)
        return 0
    if n:
        log.warning("reconcile: %d spooled records stored in %s", n, path)
    return n


def _job_info(cfg: Config, node: str, job: int) -> store.JobInfo:
    """The newest run of the job on this node, as the store knows it."""
    path = cfg.db_for(node)
    if path.exists():
        db = store.connect(path)
        try:
            newest = store.newest_run(db, node, job)
        finally:
            db.close()
        if newest is not None:
            return newest
    return store.JobInfo(job_id=job, node=node)


def remove_node(cfg: Config, node: str) -> list[str]:
    """Undo what the prologs set up on this node once no job of the project is left on it:
    the node's NAT rules (both firewall backends), forwarding where a prolog turned it
    on, and the cgroup engine's own cgroup. SetupError, touching nothing, while any job still has something here. What was undone."""
    left = leftovers(cfg, node)
    if left:
        first = min(left)
        raise SetupError(f"{len(left)} jobs still have objects on {node} (job {first}: "
                         f"{'; '.join(left[first])}): nothing removed")
    done = nat.remove_node(cfg)
    if cfg.engine == "cgroup":  # the cgroup engine's own subtree (mode "own"), empty by now
        from ..counting import cgroup as cgroup_counting
        from ..kernel import cgroup

        try:
            base = cgroup_counting.root(cfg)
            if cgroup.remove(base):
                done.append(f"cgroup {base}")
        except (SetupError, OSError) as exc:
            get_log().error("node %s: the cgroup engine's cgroup cannot be removed: %s", node, exc)
    get_log().warning("node %s: removed %s", node, ", ".join(done) if done else "nothing (nothing was set up)")
    return done

"""The cgroup engine's way of counting: the BPF counting core's programs as cgroup_skb egress
(what the job sends) and ingress (what it receives) programs on the job's cgroup v2 directory.

Nothing on the node's network changes. The prolog creates the job's maps and programs and pins
them, root only, in the bpf filesystem beside where the namespace engine pins its counters:
<bpffs>/slurm-netacct/<name> (the counters: read by the epilog, the sampler, the exporter and
the reaper exactly as the namespace engine's), <name>-out and <name>-in (the programs). Which
cgroup they count (config [cgroup] mode):
  * "slurm": SLURM's own job cgroup (cgroup/v2: .../job_<id>, all its steps, step_extern and
    so the ssh sessions pam_slurm_adopt adopts included). It does not exist yet when the
    prolog runs: the SPANK plugin attaches the pinned programs from the job's first
    slurmstepd (spank/netacct.c, engine=cgroup), before any task starts;
  * "own": a cgroup of the engine's own per job, <cgroup root>/<name>, made and attached by
    the prolog; the SPANK plugin moves every task (the batch script included) into it before
    it execs, the PAM module every adopted ssh session (SLURM on cgroup v1 with the unified
    hierarchy mounted too, where SLURM's job has no cgroup v2 directory of its own).
Programs are attached with BPF_F_ALLOW_MULTI: other programs on the same cgroup (SLURM's
device program, systemd's IP accounting) stay as they are and run too.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from .. import naming
from ..config import Config
from ..errors import SetupError
from ..kernel import bpf
from ..kernel import cgroup as cg
from ..node.plan import NodePlan
from . import Counted
from .bpf import BpfCounter, pin_dir
from .bpfcore import Attach, ClassTable, create_job

CGROUP = "cgroup"  # the name recorded with each job run (the `backend` column)
DIRECTIONS_ATTACHED = ("out", "in")


def mode(cfg: Config) -> str:
    """The cgroup the engine counts: "slurm" (SLURM's job cgroup) or "own"; "auto" is slurm
    where /sys/fs/cgroup is cgroup2 (SLURM can run cgroup/v2 only there), else own."""
    if cfg.cgroup_mode != "auto":
        return cfg.cgroup_mode
    return "slurm" if cg.pure_v2() else "own"


def root(cfg: Config) -> Path:
    """The engine's own subtree (mode "own"): config cgroup.root, else <unified>/slurm-netacct."""
    if cfg.cgroup_root is not None:
        return cfg.cgroup_root
    unified = cg.unified_mount()
    if unified is None:
        raise SetupError("engine \"cgroup\": this node has no cgroup v2 hierarchy "
                         "(neither /sys/fs/cgroup nor /sys/fs/cgroup/unified is cgroup2)")
    return unified / naming.CGROUP_ROOT_NAME


def job_dir(cfg: Config, job: Counted) -> Path:
    return naming.job_cgroup(root(cfg), job.netns)


def class_table(cfg: Config, classes: tuple[str, ...]) -> ClassTable:
    """The configured classes without the job address pools (the cgroup engine has none)."""
    pools = {cfg.pool_ipv4, cfg.pool_ipv6}
    pairs = tuple((k, p) for k, p in cfg.class_prefixes() if p not in pools or _listed(cfg, k, p))
    return ClassTable(classes, cfg.default_class, pairs)


def _listed(cfg: Config, klass: str, prefix: object) -> bool:
    return prefix in cfg.classes.get(klass, ())


class CgroupCounter(BpfCounter):
    """BPF counting on the job's cgroup (engine = "cgroup"); reads exactly as BpfCounter."""

    name = CGROUP
    outlives_namespace = True  # there is no namespace: the pinned counters are the job's

    def install(self, cfg: Config, job: Counted, plan: NodePlan | None = None) -> None:
        from . import bpfcore

        why = bpfcore.probe().get("cgroup_skb gso_segs")
        if why != "ok":
            raise SetupError(f"engine \"cgroup\" is not possible on this kernel ({why}): it needs 5.1")
        bpf.raise_memlock()
        pin_dir(cfg)
        own = mode(cfg) == "own"
        if not own and not cg.pure_v2():
            from ..log import get as get_log

            get_log().warning("job %d: cgroup.mode \"slurm\" on a node whose /sys/fs/cgroup is not cgroup2, "
                              "where SLURM's cgroup/v2 cannot run: the SPANK plugin will find no job cgroup "
                              "unless SLURM's steps run in cgroup v2 directories", job.names.job_id)
        where: Path | None = None
        if own:
            base = root(cfg)
            if not cg.is_cgroup2(base.parent):
                raise SetupError(f"config key 'cgroup.root': {base.parent} is not in a cgroup v2 hierarchy")
            try:
                cg.make(base)
                where = job_dir(cfg, job)
                cg.make(where)
            except OSError as exc:
                raise SetupError(f"cannot make cgroup {base}/{job.netns}: {exc.strerror or exc}") from None
        try:
            core = create_job(class_table(cfg, job.classes), Attach.CGROUP, job.names.job_id)
            try:
                self._unpin(cfg, job)  # a killed prolog's
                bpf.obj_pin(core.counters.fd, str(naming.bpf_pin(cfg.bpffs, job.netns)))
                for d in DIRECTIONS_ATTACHED:
                    bpf.obj_pin(core.progs[d], str(naming.bpf_prog_pin(cfg.bpffs, job.netns, d)))
                if where is not None:
                    cg.attach(where, core.progs)
            finally:
                core.close()  # the pins (and the cgroup) hold the objects now
        except OSError as exc:  # BpfError
            raise SetupError(f"BPF counting for job {job.names.job_id}'s cgroup: {exc}") from None

    def _progs(self, cfg: Config, job: Counted) -> dict[str, int]:
        """The job's pinned programs, opened (direction -> fd); those that are not pinned left out."""
        out: dict[str, int] = {}
        for d in DIRECTIONS_ATTACHED:
            try:
                out[d] = bpf.obj_get(str(naming.bpf_prog_pin(cfg.bpffs, job.netns, d)))
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        return out

    def stop(self, cfg: Config, job: Counted) -> None:
        """Stop counting before the final read (the namespace engine sets the link down):
        detach the programs from the engine's own cgroup. SLURM's job cgroup (mode "slurm")
        is SLURM's: it removes it, and the programs with it, when the job's last step ends."""
        try:
            where = job_dir(cfg, job)
        except SetupError:
            return
        if not where.is_dir():
            return
        progs = self._progs(cfg, job)
        try:
            cg.detach(where, progs)
        except OSError as exc:
            raise SetupError(f"cannot detach the counting programs from {where}: {exc}") from None
        finally:
            for fd in progs.values():
                os.close(fd)

    def _unpin(self, cfg: Config, job: Counted) -> None:
        paths = [naming.bpf_pin(cfg.bpffs, job.netns)]
        paths += [naming.bpf_prog_pin(cfg.bpffs, job.netns, d) for d in DIRECTIONS_ATTACHED]
        for path in paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise SetupError(f"cannot unpin {path}: {exc.strerror or exc}") from None

    def remove(self, cfg: Config, job: Counted) -> None:
        """Detach, unpin, and remove the engine's own cgroup of the job (if it has one). A cgroup
        that still holds processes stays (SetupError): the job's processes outlived its end."""
        self.stop(cfg, job)
        self._unpin(cfg, job)
        try:
            where = job_dir(cfg, job)
        except SetupError:
            return
        try:
            cg.remove(where)
        except OSError as exc:
            left = cg.procs(where)
            raise SetupError(f"cannot remove cgroup {where}: {exc.strerror or exc}"
                             f"{f' (processes {left[:5]} are still in it)' if left else ''}") from None

"""Counting with BPF on the node's end of a job's veth: every packet as the wire carries it.

Two tc programs (clsact ingress: what the job sent; egress: what it receives) classify each
packet by its remote address and count it the way a link of the job's MTU would carry it: an
offloaded super-packet of n segments as n packets, and its bytes plus the IP and TCP/UDP
headers each further segment repeats (bpfcore). The job's counter map is pinned in a bpf
filesystem, root only (naming.bpf_pin), so that it outlives the prolog that made it and the
link it counts on; the epilog reads it, stores it and unpins it. The job's user can neither
see the node's end of its link nor use bpf(2).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

from .. import naming
from ..config import Config
from ..errors import SetupError
from ..kernel import bpf, links, tc
from ..node.plan import NodePlan
from ..traffic import Counters
from . import BPF, Counted, ReadsInBulk, bpf_unsupported, firewall
from .bpfcore import Attach, ClassTable, create_job, read_pinned_many


def pin_dir(cfg: Config) -> str:
    """The directory of the jobs' pins, made (mode 0700) on a bpf filesystem mounted if need be."""
    try:
        bpf.ensure_bpffs(cfg.bpffs)
    except OSError as exc:
        raise SetupError(f"config key 'bpffs': no bpf filesystem at {cfg.bpffs} and none can be "
                         f"mounted there: {exc.strerror or exc}") from None
    path = cfg.bpffs / naming.BPF_PIN_DIR
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
    except OSError as exc:
        raise SetupError(f"cannot make {path}: {exc.strerror or exc}") from None
    return str(path)


class BpfCounter(ReadsInBulk):
    """The way of counting the namespace engine uses by default (config `counting`)."""

    name = BPF
    outlives_namespace = True

    def install(self, cfg: Config, job: Counted, plan: NodePlan) -> None:
        why = bpf_unsupported()
        if why is not None:
            raise SetupError(f"BPF counting is not possible on this kernel ({why}): "
                             "set counting = \"netfilter\"")
        bpf.raise_memlock()
        pin_dir(cfg)
        pin = naming.bpf_pin(cfg.bpffs, job.netns)
        table = ClassTable(job.classes, cfg.default_class, tuple(cfg.class_prefixes()))
        try:
            ifindex = links.link_index(job.names.host_if)
            if ifindex is None:
                raise SetupError(f"link {job.names.host_if} is gone")
            core = create_job(table, Attach.TC, job.names.job_id)
            try:
                try:
                    os.unlink(pin)  # a killed prolog's: its objects are gone with its link
                except FileNotFoundError:
                    pass
                bpf.obj_pin(core.counters.fd, str(pin))
                with tc.rtnl() as sock:
                    tc.attach(sock, ifindex, core.progs)
            finally:
                core.close()  # the tc filters hold the programs, they the maps; the pin the counters
        except OSError as exc:  # BpfError, TcError
            raise SetupError(f"BPF counting for {job.names.host_if}: {exc}") from None
        if plan.dns_stub is not None:  # the job's own namespace still redirects its DNS queries
            if firewall(cfg) == "iptables":
                from .ipt import install_dns
            else:
                from .nft import install_dns
            install_dns(job, plan)

    def read_many(self, cfg: Config, jobs: Sequence[Counted]) -> dict[str, Counters | str]:
        """Each job's pinned counters (opened read-only, looked up, closed: ~20 us a job)."""
        out: dict[str, Counters | str] = {}
        by_classes: dict[tuple[str, ...], list[Counted]] = {}
        for job in jobs:
            by_classes.setdefault(job.classes, []).append(job)
        for classes, group in by_classes.items():
            paths = {str(naming.bpf_pin(cfg.bpffs, j.netns)): j.netns for j in group}
            for path, got in read_pinned_many(list(paths), classes).items():
                out[paths[path]] = got if isinstance(got, str) else got.counts
        return out

    def remove(self, cfg: Config, job: Counted) -> None:
        """Unpin the job's counters (what still counts, the programs on its link, goes with
        the link)."""
        pin = naming.bpf_pin(cfg.bpffs, job.netns)
        try:
            os.unlink(pin)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise SetupError(f"cannot unpin {pin}: {exc.strerror or exc}") from None

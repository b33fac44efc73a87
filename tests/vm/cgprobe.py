"""Inside the test VM, the cgroup engine's phase (tests/vm/guest.py): what is attached where.

Run as root with the project's venv (it reads the kernel's BPF objects through the project's own
``slurm_netacct.kernel``), prints one JSON object:

- ``probe.py running JOB``: the job's pins under ``<bpffs>/slurm-netacct/`` (program and map ids),
  every cgroup of the v2 hierarchy with inet (cgroup_skb) programs attached to it and their ids,
  the directories named ``job_JOB`` (SLURM's own job cgroup), and whether the engine's own
  cgroup subtree (mode "own") exists;
- ``probe.py gone JOB PROG_ID... -- MAP_ID...``: the same after the epilog, plus which of the
  given program and map ids the kernel still holds, waiting up to 60 s for them to go (a
  removed cgroup frees its programs once its last reference, e.g. a socket, is gone).
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from slurm_netacct import naming
from slurm_netacct.kernel import bpf
from slurm_netacct.kernel import cgroup as cg

CGROOT = Path("/sys/fs/cgroup")
BPFFS = Path("/sys/fs/bpf")
PREFIX = "netacct-"


def attachments() -> dict[str, dict[str, list[int]]]:
    """Every cgroup with inet programs attached to it (not inherited), by direction."""
    out: dict[str, dict[str, list[int]]] = {}
    for dirpath, _dirs, _files in os.walk(CGROOT):
        try:
            found = cg.attached(Path(dirpath))
        except OSError:
            continue  # removed while walking
        if any(found.values()):
            out[dirpath] = {d: list(ids) for d, ids in found.items()}
    return out


def pins(job: int) -> dict[str, Any]:
    """The job's pins: programs (id, the maps they use) and the counters map (id)."""
    name = naming.netns_name(PREFIX, job)
    pin_dir = BPFFS / naming.BPF_PIN_DIR
    out: dict[str, Any] = {"files": sorted(p.name for p in pin_dir.iterdir() if p.name.startswith(name))
                           if pin_dir.is_dir() else []}
    for d in ("out", "in"):
        path = naming.bpf_prog_pin(BPFFS, name, d)
        if path.exists():
            fd = bpf.obj_get(str(path))
            try:
                info = bpf.prog_info(fd)
                out[d] = {"path": str(path), "id": info.id, "map_ids": list(info.map_ids), "name": info.name}
            finally:
                os.close(fd)
    path = naming.bpf_pin(BPFFS, name)
    if path.exists():
        fd = bpf.obj_get(str(path))
        try:
            out["counters"] = {"path": str(path), "id": bpf.map_info(fd).id}
        finally:
            os.close(fd)
    return out


def common(job: int) -> dict[str, Any]:
    return {
        "pins": pins(job),
        "attached": attachments(),
        "job_dirs": sorted(str(p) for p in CGROOT.rglob(f"job_{job}") if p.is_dir()),
        "own_root_exists": (CGROOT / naming.CGROUP_ROOT_NAME).exists(),
    }


def _alive(get: Any, obj_id: int) -> bool:
    try:
        os.close(get(obj_id))
        return True
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise


def gone(job: int, prog_ids: list[int], map_ids: list[int]) -> dict[str, Any]:
    t0 = time.monotonic()
    while True:
        progs = [i for i in prog_ids if _alive(bpf.prog_fd_by_id, i)]
        maps = [i for i in map_ids if _alive(bpf.map_fd_by_id, i)]
        if (not progs and not maps) or time.monotonic() - t0 > 60:
            break
        time.sleep(0.5)
    return {**common(job), "progs_alive": progs, "maps_alive": maps,
            "waited_s": round(time.monotonic() - t0, 1)}


def main(argv: list[str]) -> int:
    what, job = argv[0], naming.parse_job_id(argv[1])
    if what == "running":
        print(json.dumps(common(job)))
    elif what == "gone":
        rest = argv[2:]
        cut = rest.index("--") if "--" in rest else len(rest)
        print(json.dumps(gone(job, [int(x) for x in rest[:cut]], [int(x) for x in rest[cut + 1:]])))
    else:
        print(f"usage: {sys.argv[0]} running JOB | gone JOB PROG_ID... -- MAP_ID...", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

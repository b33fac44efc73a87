"""What a job's user tries against the cgroup engine; one line per attempt.

    python3 cgtamper.py JOB_CGROUP PIN_DIR NAME

Run as the job's (unprivileged) user inside the job's cgroup: leave the cgroup (for its
parent, the hierarchy's root, a new one), remove or rename it, open or get the pinned counters
and programs (to write or detach them), get them by id, detach by attach type, load a program
of its own, attach it, and the same from a user namespace of its own. Prints
"<attempt>: refused" or "<attempt>: ALLOWED". Standard library and tamper.py only.
"""

from __future__ import annotations

import ctypes
import os
import struct
import subprocess
import sys

from tamper import attempt, bpf  # beside this file (the tests copy both into the job's reach)

PROG_LOAD, OBJ_GET, PROG_ATTACH, PROG_DETACH = 5, 7, 8, 9
PROG_GET_FD_BY_ID, MAP_GET_FD_BY_ID, PROG_QUERY = 13, 14, 16
CGROUP_SKB, INET_INGRESS, INET_EGRESS, ALLOW_MULTI = 8, 0, 1, 2


def try_os(fn) -> bool:  # type: ignore[no-untyped-def]
    try:
        fn()
        return True
    except OSError:
        return False


def move(cgroup: str) -> None:
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(f"{os.getpid()}\n")


def main(cg: str, pins: str, name: str) -> None:
    parent = os.path.dirname(cg)
    top = parent
    while os.path.exists(os.path.join(os.path.dirname(top), "cgroup.procs")):
        top = os.path.dirname(top)
    attempt("move to the parent cgroup", try_os(lambda: move(parent)))
    attempt("move to the hierarchy's root", try_os(lambda: move(top)))
    attempt("make a cgroup beside it", try_os(lambda: os.mkdir(os.path.join(parent, "escape"))))
    attempt("make a cgroup in it", try_os(lambda: os.mkdir(os.path.join(cg, "sub"))))
    attempt("remove the job's cgroup", try_os(lambda: os.rmdir(cg)))
    attempt("rename the job's cgroup", try_os(lambda: os.rename(cg, cg + "x")))
    for pin in (name, f"{name}-out", f"{name}-in"):
        path = os.path.join(pins, pin)
        attempt(f"open {pin} for writing", try_os(lambda: os.close(os.open(path, os.O_RDWR))))
        p = ctypes.create_string_buffer(path.encode())
        attempt(f"bpf OBJ_GET {pin}", bpf(OBJ_GET, struct.pack("=QII", ctypes.addressof(p), 0, 0)) >= 0)
    attempt("bpf MAP_GET_FD_BY_ID", any(bpf(MAP_GET_FD_BY_ID, struct.pack("=I", i)) >= 0 for i in range(1, 300)))
    attempt("bpf PROG_GET_FD_BY_ID", any(bpf(PROG_GET_FD_BY_ID, struct.pack("=I", i)) >= 0 for i in range(1, 300)))
    try:  # the job's cgroup may be root's alone (mode 0700): then the user cannot even name it to bpf
        cgfd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        cgfd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)  # not a cgroup: every call below fails
    for typ in (INET_INGRESS, INET_EGRESS):
        attempt(f"bpf PROG_DETACH type {typ}", bpf(PROG_DETACH, struct.pack("=III", cgfd, 0, typ)) >= 0)
    ids = (ctypes.c_uint32 * 8)()
    attempt("bpf PROG_QUERY", bpf(PROG_QUERY, struct.pack("=IIIIQI", cgfd, INET_EGRESS, 0, 0,
                                                          ctypes.addressof(ids), 8)) >= 0)
    insns = struct.pack("<BBhi", 0xB7, 0, 0, 0) + struct.pack("<BBhi", 0x95, 0, 0, 0)  # r0 = 0 (drop); exit
    code = ctypes.create_string_buffer(insns)
    lic = ctypes.create_string_buffer(b"GPL")
    prog = bpf(PROG_LOAD, struct.pack("=IIQQ", CGROUP_SKB, 2, ctypes.addressof(code), ctypes.addressof(lic)))
    attempt("bpf PROG_LOAD cgroup_skb", prog >= 0)
    attempt("bpf PROG_ATTACH", prog >= 0 and bpf(PROG_ATTACH, struct.pack("=IIII", cgfd, prog, INET_EGRESS,
                                                                            ALLOW_MULTI)) >= 0)
    os.close(cgfd)
    # A user namespace of its own (root there, no capability over the node's cgroups).
    r = subprocess.run(["unshare", "-U", "-r", "sh", "-c", f'echo $$ > "{parent}/cgroup.procs"'],
                       capture_output=True)
    attempt("move to the parent cgroup from a user namespace", r.returncode == 0)
    with open("/proc/self/cgroup") as f:
        mine = [line.split("::", 1)[1].strip() for line in f if line.startswith("0::")][0]
    attempt("left the job's cgroup", not cg.endswith(mine))


if __name__ == "__main__":
    main(*sys.argv[1:4])

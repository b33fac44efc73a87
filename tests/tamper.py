"""What a job's user tries against the BPF counting of its job; one line per attempt.

    python3 tamper.py PIN_PATH

Run as the job's (unprivileged) user inside the job: open the pinned counter map (to write
it), get it or the programs by id, load a program, and add a tc hook to the job's end of the link (root could). Prints "<attempt>: refused" or "<attempt>: ALLOWED". Standard library only.
"""

from __future__ import annotations

import ctypes
import os
import struct
import subprocess
import sys

SYS_BPF = 321  # x86_64
OBJ_GET, PROG_GET_FD_BY_ID, MAP_GET_FD_BY_ID, PROG_LOAD = 7, 13, 14, 5
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr, 128)
    return int(_libc.syscall(SYS_BPF, cmd, buf, 128))


def attempt(what: str, ok: bool) -> None:
    print(f"{what}: {'ALLOWED' if ok else 'refused'}", flush=True)


def main(pin: str) -> None:
    try:
        os.close(os.open(pin, os.O_RDWR))
        attempt("open the pin", True)
    except OSError:
        attempt("open the pin", False)
    path = ctypes.create_string_buffer(pin.encode())
    attempt("bpf OBJ_GET the pin", bpf(OBJ_GET, struct.pack("=QII", ctypes.addressof(path), 0, 0)) >= 0)
    attempt("bpf MAP_GET_FD_BY_ID", any(bpf(MAP_GET_FD_BY_ID, struct.pack("=I", i)) >= 0 for i in range(1, 200)))
    attempt("bpf PROG_GET_FD_BY_ID", any(bpf(PROG_GET_FD_BY_ID, struct.pack("=I", i)) >= 0 for i in range(1, 200)))
    insns = struct.pack("<BBhi", 0xB7, 0, 0, 0) + struct.pack("<BBhi", 0x95, 0, 0, 0)  # r0 = 0; exit
    code = ctypes.create_string_buffer(insns)
    lic = ctypes.create_string_buffer(b"GPL")
    attempt("bpf PROG_LOAD", bpf(PROG_LOAD, struct.pack("=IIQQ", 3, 2, ctypes.addressof(code),
                                                        ctypes.addressof(lic))) >= 0)
    r = subprocess.run(["tc", "qdisc", "add", "dev", "eth0", "clsact"], capture_output=True)
    attempt("tc qdisc add dev eth0 clsact", r.returncode == 0)


if __name__ == "__main__":
    main(sys.argv[1])

"""Two tasks of one job on different nodes exchange an exact payload (rank 0 receives).

    srun -N2 -n2 python3 pairs.py RENDEZVOUS_FILE NBYTES [DEVICE]
Rank 0 writes its job address (that of DEVICE, default eth0: the job's end of its link; the
node's uplink with the cgroup engine) to the rendezvous file (a shared directory) and listens;
rank 1 connects to it and sends NBYTES. Standard library only.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


def main() -> None:
    path, n = sys.argv[1], int(sys.argv[2])
    dev = sys.argv[3] if len(sys.argv) > 3 else "eth0"
    rank = int(os.environ["SLURM_PROCID"])
    if rank == 0:
        out = subprocess.run(["ip", "-o", "-4", "addr", "show", "dev", dev], capture_output=True, text=True).stdout
        addr = out.split()[3].split("/")[0]
        srv = socket.socket()
        srv.bind((addr, 0))
        srv.listen(1)
        with open(path + ".tmp", "w") as f:
            f.write(f"{addr} {srv.getsockname()[1]}\n")
        os.rename(path + ".tmp", path)
        conn, peer = srv.accept()
        total = 0
        while True:
            data = conn.recv(65536)
            if not data:
                break
            total += len(data)
        conn.sendall(b"ok")
        conn.close()
        print(f"received {total} from {peer[0]}", flush=True)
        if total != n:
            sys.exit(1)
    else:
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                sys.exit("rank 0 never published its address")
            time.sleep(0.05)
        addr, port = open(path).read().split()
        with socket.create_connection((addr, int(port)), timeout=30) as s:
            block = b"p" * 65536
            left = n
            while left > 0:
                left -= s.send(block[: min(left, 65536)])
            s.shutdown(socket.SHUT_WR)
            assert s.recv(2) == b"ok"


if __name__ == "__main__":
    main()

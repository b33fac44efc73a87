"""A tiny DNS server for the tests: answers A queries from a fixed table, over UDP and TCP.

    python dnsstub.py LISTEN_ADDR NAME=ADDR [NAME=ADDR ...]
It stands in for a node's loopback stub resolver (systemd-resolved's 127.0.0.53).
"""

from __future__ import annotations

import socket
import struct
import sys
import threading


def answer(query: bytes, table: dict[str, str]) -> bytes:
    qid, _flags, qdcount = struct.unpack("!HHH", query[:6])
    pos, labels = 12, []
    while query[pos]:
        n = query[pos]
        labels.append(query[pos + 1: pos + 1 + n].decode("ascii", "replace").lower())
        pos += 1 + n
    qtype, _qclass = struct.unpack("!HH", query[pos + 1: pos + 5])
    question = query[12: pos + 5]
    name = ".".join(labels)
    addr = table.get(name)
    if addr is None:
        return struct.pack("!HHHHHH", qid, 0x8183, 1, 0, 0, 0) + question  # NXDOMAIN
    if qtype != 1:
        return struct.pack("!HHHHHH", qid, 0x8180, 1, 0, 0, 0) + question  # no AAAA etc.
    rr = struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton(addr)
    return struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + question + rr


def main(argv: list[str]) -> None:
    listen = argv[0]
    table = dict(item.split("=", 1) for item in argv[1:])
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((listen, 53))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((listen, 53))
    tcp.listen(16)

    def serve_tcp() -> None:
        while True:
            conn, _ = tcp.accept()
            with conn:
                (n,) = struct.unpack("!H", conn.recv(2))
                q = b""
                while len(q) < n:
                    q += conn.recv(n - len(q))
                a = answer(q, table)
                conn.sendall(struct.pack("!H", len(a)) + a)

    threading.Thread(target=serve_tcp, daemon=True).start()
    print("ready", flush=True)
    while True:
        q, peer = udp.recvfrom(4096)
        udp.sendto(answer(q, table), peer)


if __name__ == "__main__":
    main(sys.argv[1:])

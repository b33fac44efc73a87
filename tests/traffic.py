"""Traffic endpoints for the tests: an exact-payload TCP/UDP server and matching clients.

Run inside a namespace, e.g. `nsenter --net=/run/netns/X python traffic.py serve 5001`.
Only the standard library: it runs in the sandbox servers and inside job namespaces.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

CHUNK = 65536


def _recv_exact_line(conn: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        b = conn.recv(1)
        if not b:
            break
        buf += b
    return buf.strip()


def _tcp_session(conn: socket.socket) -> None:
    with conn:
        cmd, _, arg = _recv_exact_line(conn).decode().partition(" ")
        if cmd == "UP":  # the client sends until EOF; we reply with the byte count
            total = 0
            while True:
                data = conn.recv(CHUNK)
                if not data:
                    break
                total += len(data)
            conn.sendall(f"{total}\n".encode())
        elif cmd == "DOWN":  # we send exactly n bytes, then wait for the client's EOF
            left = int(arg)
            block = b"d" * CHUNK
            while left > 0:
                n = conn.send(block[: min(left, CHUNK)])
                left -= n
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(CHUNK):
                pass


def serve(port: int) -> None:
    tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("::", port))
    tcp.listen(256)
    udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    udp.bind(("::", port))

    def udp_loop() -> None:
        while True:
            data, addr = udp.recvfrom(65535)
            text = data[:64].decode(errors="replace")
            if text.startswith("DOWN "):  # DOWN count size: send count datagrams of size bytes
                _, count, size = text.split()[:3]
                for i in range(int(count)):
                    udp.sendto(b"u" * int(size), addr)
                    if i % 32 == 31:
                        time.sleep(0.002)  # pace: a veth backlog overflow would lose datagrams

    threading.Thread(target=udp_loop, daemon=True).start()
    print("ready", flush=True)
    while True:
        conn, _ = tcp.accept()
        threading.Thread(target=_tcp_session, args=(conn,), daemon=True).start()


def _connect(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect((host, port))
    return s


def tcp_up(host: str, port: int, n: int) -> int:
    with _connect(host, port) as s:
        s.sendall(b"UP\n")
        block = b"x" * CHUNK
        left = n
        while left > 0:
            left -= s.send(block[: min(left, CHUNK)])
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while True:
            data = s.recv(CHUNK)
            if not data:
                break
            reply += data
    got = int(reply.strip())
    if got != n:
        raise SystemExit(f"server received {got} bytes, expected {n}")
    return got


def tcp_down(host: str, port: int, n: int) -> int:
    with _connect(host, port) as s:
        s.sendall(f"DOWN {n}\n".encode())
        total = 0
        while True:
            data = s.recv(CHUNK)
            if not data:
                break
            total += len(data)
        s.shutdown(socket.SHUT_WR)
    if total != n:
        raise SystemExit(f"received {total} bytes, expected {n}")
    return total


def udp_up(host: str, port: int, count: int, size: int) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        for i in range(count):
            s.sendto(b"v" * size, (host, port))
            if i % 32 == 31:
                time.sleep(0.002)
    return count


def udp_down(host: str, port: int, count: int, size: int) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.sendto(f"DOWN {count} {size}".encode(), (host, port))
        got = 0
        while got < count:
            s.recv(65535)
            got += 1
    return got


def main(argv: list[str]) -> None:
    cmd = argv[0]
    if cmd == "serve":
        serve(int(argv[1]))
    elif cmd in ("tcp-up", "tcp-down"):
        fn = tcp_up if cmd == "tcp-up" else tcp_down
        print(fn(argv[1], int(argv[2]), int(argv[3])))
    elif cmd in ("udp-up", "udp-down"):
        fn2 = udp_up if cmd == "udp-up" else udp_down
        print(fn2(argv[1], int(argv[2]), int(argv[3]), int(argv[4])))
    elif cmd == "daemon-up":  # double-fork, parent exits at once, the grandchild keeps sending
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(0.3)  # the parent is long gone by now
                tcp_up(argv[1], int(argv[2]), int(argv[3]))
                open(argv[4], "w").write("done\n")
            os._exit(0)
        os._exit(0)
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv[1:])

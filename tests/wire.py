"""What a link would carry as a wire, for traffic that never crosses one (job to node, job to job).

A packet capture of a veth end with virtio-net headers (PACKET_VNET_HDR): each offloaded
super-packet comes with its segment size, and is counted here the way TSO/GSO cut it --
ceil(payload / gso_size) packets, each with the packet's own IP and TCP/UDP headers -- by
arithmetic on what was captured, independently of the kernel's segment count that the BPF
programs read. Bytes are IP-layer bytes; ICMPv6 neighbour discovery and MLD are left out, as
the project leaves them out.
"""

from __future__ import annotations

import math
import socket
import struct
import threading
from pathlib import Path

from slurm_netacct.kernel import netns

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS, PACKET_VNET_HDR = 6, 15
PACKET_OUTGOING = 4
GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_UDP_L4 = 0, 1, 3, 4, 5
VNET_HDR = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
ICMPV6_LINK_TYPES = {130, 131, 132, 133, 134, 135, 136, 137, 143}
IPV6_EXT_HEADERS = {0, 43, 60}


def _l3_l4(ip: bytes) -> tuple[int, int, int]:
    """(IP version, IP header length with IPv6 extension headers, L4 protocol)."""
    version = ip[0] >> 4
    if version == 4:
        return 4, (ip[0] & 0x0F) * 4, ip[9]
    nh, off = ip[6], 40
    while nh in IPV6_EXT_HEADERS and off + 2 <= len(ip):
        nh, off = ip[off], off + (ip[off + 1] + 1) * 8
    return 6, off, nh


def wire_size(vnet: bytes, frame: bytes) -> tuple[int, int] | None:
    """(packets, bytes) a captured frame is on a wire; None if it is not counted traffic."""
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    if ethertype not in (0x0800, 0x86DD):
        return None
    ip = frame[14:]
    _version, l3, proto = _l3_l4(ip)
    if proto == 58 and len(ip) > l3 and ip[l3] in ICMPV6_LINK_TYPES:
        return None
    _flags, gso_type, _hdr_len, gso_size, _cs, _co = VNET_HDR.unpack_from(vnet)
    if gso_type & 0x7F == GSO_NONE or not gso_size:
        return 1, len(ip)
    l4 = (ip[l3 + 12] >> 4) * 4 if proto == 6 else 8
    headers = l3 + l4
    payload = len(ip) - headers
    segments = max(1, math.ceil(payload / gso_size))
    return segments, payload + segments * headers


class Capture:
    """Counts what crosses one veth end, in and out, as wire packets (see the module docstring).

    `sent` is what the link's owner on the other side sent through it (packets arriving at
    this end), `received` what it got (packets leaving this end). Use as a context manager;
    exiting checks the kernel dropped nothing of the capture (an incomplete oracle is none)."""

    def __init__(self, netns_path: Path, ifname: str) -> None:
        """Capture the link `ifname` of the namespace at netns_path; with a name ending in '*',
        every link whose name starts so (job links made later included)."""
        with netns.entered(netns_path):  # the socket stays in the namespace it was made in
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE: root may
        self.prefix = ifname[:-1] if ifname.endswith("*") else None
        if self.prefix is None:
            self.sock.bind((ifname, ETH_P_ALL))
        self.sock.settimeout(0.2)
        self.sent = [0, 0]  # packets, bytes
        self.received = [0, 0]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Capture":
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(1 << 17)
            except TimeoutError:
                if self._stop.is_set():  # stopped, and nothing left in the queue
                    return
                continue
            if self.prefix is not None and not addr[0].startswith(self.prefix):
                continue
            size = wire_size(data[:VNET_HDR.size], data[VNET_HDR.size:])
            if size is None:
                continue
            side = self.received if addr[2] == PACKET_OUTGOING else self.sent
            side[0] += size[0]
            side[1] += size[1]

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        _packets, drops = struct.unpack("=II", self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        self.sock.close()
        assert drops == 0, f"the capture lost {drops} packets: it is no oracle"

    def totals(self) -> dict[str, tuple[int, int]]:
        """{"out": (packets, bytes) the job sent, "in": ... it received} (capturing a job's link
        on the node's end)."""
        return {"out": (self.sent[0], self.sent[1]), "in": (self.received[0], self.received[1])}

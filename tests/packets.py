"""Hand-built test frames (Ethernet + IPv4/IPv6 + TCP/UDP/ICMP), for BPF_PROG_TEST_RUN.

Checksums are left zero: the counting programs never look at them.
"""

from __future__ import annotations

import ipaddress
import struct

ETH_SRC, ETH_DST = b"\x02\0\0\0\0\x01", b"\x02\0\0\0\0\x02"


def eth(ethertype: int, payload: bytes) -> bytes:
    return ETH_DST + ETH_SRC + struct.pack("!H", ethertype) + payload


def tcp(payload_len: int, options: int = 12) -> bytes:
    """A TCP header with `options` bytes of options (multiple of 4), then zero payload."""
    doff = (20 + options) // 4
    return struct.pack("!HHIIBBHHH", 40000, 5201, 1, 1, doff << 4, 0x10, 65535, 0, 0) + b"\x01" * options + bytes(payload_len)


def udp(payload_len: int) -> bytes:
    return struct.pack("!HHHH", 40000, 5201, 8 + payload_len, 0) + bytes(payload_len)


def icmpv6(kind: int, body: int = 20) -> bytes:
    return struct.pack("!BBH", kind, 0, 0) + bytes(body)


def ipv4(src: str, dst: str, proto: int, l4: bytes, options: int = 0) -> bytes:
    ihl = (20 + options) // 4
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + options + len(l4), 1, 0, 64, proto, 0,
                      ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return hdr + b"\x01" * options + l4


def ipv6(src: str, dst: str, nexthdr: int, l4: bytes, ext: list[tuple[int, int]] | None = None) -> bytes:
    """ext: extension headers in order as (type, length in bytes, a multiple of 8)."""
    chain = b""
    types = [t for t, _ in ext or []] + [nexthdr]
    for i, (_, length) in enumerate(ext or []):
        chain += struct.pack("!BB", types[i + 1], length // 8 - 1) + bytes(length - 2)
    first = types[0]
    payload = chain + l4
    return struct.pack("!IHBB16s16s", 0x60000000, len(payload), first, 64,
                       ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed) + payload


def frame4(src: str, dst: str, proto: int, l4: bytes, options: int = 0) -> bytes:
    return eth(0x0800, ipv4(src, dst, proto, l4, options))


def frame6(src: str, dst: str, nexthdr: int, l4: bytes, ext: list[tuple[int, int]] | None = None) -> bytes:
    return eth(0x86DD, ipv6(src, dst, nexthdr, l4, ext))


def arp() -> bytes:
    return eth(0x0806, bytes(28))

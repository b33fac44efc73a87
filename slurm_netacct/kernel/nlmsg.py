"""Hand-encoded netlink messages, for requests where pyroute2 is too slow (reading counters)
or cannot encode what is needed (an IPv4 devconf entry of a link)."""

from __future__ import annotations

import struct

NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_F_NESTED = 0x8000
HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port
ATTR = struct.Struct("=HH")  # nlattr: length, type


def attr(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes (its length field does not count the padding)."""
    length = ATTR.size + len(payload)
    return ATTR.pack(length, kind) + payload + b"\0" * ((4 - length % 4) % 4)


def message(kind: int, flags: int, body: bytes, seq: int = 1) -> bytes:
    """One netlink message: header and body."""
    return HEADER.pack(HEADER.size + len(body), kind, flags, seq, 0) + body

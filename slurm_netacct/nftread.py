"""Reading nftables named counters straight from netlink, for many job namespaces at once.

`nft -j list counters` costs a process and a ruleset fetch per namespace (milliseconds);
here one process joins each namespace just long enough to open a netlink socket there, asks
for the counter objects of one table, and parses the answer (tens of microseconds).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from pathlib import Path

from .errors import SetupError
from .netns import CLONE_NEWNET, _libc, go_home, home_fd, is_netns

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWOBJ, NFT_MSG_GETOBJ = 18, 19
NFPROTO_INET = 1
NFT_OBJECT_COUNTER = 1
NFTA_OBJ_TABLE, NFTA_OBJ_NAME, NFTA_OBJ_TYPE, NFTA_OBJ_DATA = 1, 2, 3, 4
NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS = 1, 2
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_F_NESTED = 0x8000


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * ((4 - length % 4) % 4)


def _request(table: str, seq: int) -> bytes:
    body = struct.pack("=BBH", NFPROTO_INET, 0, 0)  # nfgenmsg: family, version, res_id
    body += _attr(NFTA_OBJ_TABLE, table.encode() + b"\0")
    body += _attr(NFTA_OBJ_TYPE, struct.pack("!I", NFT_OBJECT_COUNTER))
    msg_type = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETOBJ
    return struct.pack("=IHHII", 16 + len(body), msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


_NLA = struct.Struct("=HH")
_NLMSG = struct.Struct("=IHHII")
_U64 = struct.Struct("!Q")


def _attrs(data: bytes, start: int = 0, end: int | None = None) -> dict[int, tuple[int, int]]:
    """Netlink attributes in data[start:end] as {type: (offset, end offset)} (no copies)."""
    out: dict[int, tuple[int, int]] = {}
    unpack = _NLA.unpack_from
    pos = start
    stop = len(data) if end is None else end
    while pos + 4 <= stop:
        length, kind = unpack(data, pos)
        if length < 4:
            break
        out[kind & 0x7FFF] = (pos + 4, pos + length)
        pos += (length + 3) & ~3
    return out


def _open_in(path: Path) -> socket.socket:
    """A netlink socket that belongs to the namespace at path; the caller stays where it is.

    (Not netns.entered: that stats the path first; here a missing namespace is simply the
    OSError of the open, which read_table turns into FileNotFoundError.)"""
    home = home_fd()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(errno.EINVAL, f"setns {path}")
        try:
            return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        finally:
            go_home(home)
    finally:
        os.close(fd)


def read_table(path: Path, table: str) -> dict[str, tuple[int, int]]:
    """{counter name: (packets, bytes)} of table `inet <table>` in the namespace at path."""
    try:
        sock = _open_in(path)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "no such network namespace", str(path)) from None
    except OSError as exc:
        if not is_netns(path):  # a leftover plain file, not a namespace
            raise FileNotFoundError(errno.ENOENT, "not a network namespace", str(path)) from None
        raise SetupError(f"cannot join {path}: {exc}") from None
    try:
        sock.send(_request(table, 1))  # the kernel binds the socket on first send
        found: dict[str, tuple[int, int]] = {}
        while True:
            data = sock.recv(65536)
            pos = 0
            while pos + 16 <= len(data):
                length, mtype, _flags, _seq, _pid = _NLMSG.unpack_from(data, pos)
                if mtype == NLMSG_DONE:
                    return found
                if mtype == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, pos + 16)
                    if code == 0:
                        return found
                    raise OSError(-code, f"nftables counters of {table} in {path}: {os.strerror(-code)}")
                if mtype == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWOBJ:
                    attrs = _attrs(data, pos + 20, pos + length)  # after nlmsghdr + nfgenmsg
                    a, b = attrs[NFTA_OBJ_NAME]
                    name = data[a:b].rstrip(b"\0").decode()
                    counter = _attrs(data, *attrs[NFTA_OBJ_DATA])
                    (nbytes,) = _U64.unpack_from(data, counter[NFTA_COUNTER_BYTES][0])
                    (npackets,) = _U64.unpack_from(data, counter[NFTA_COUNTER_PACKETS][0])
                    found[name] = (npackets, nbytes)
                pos += (length + 3) & ~3
    finally:
        sock.close()


NFT_MSG_GETTABLE = 1
NFTA_TABLE_NAME = 1


def table_exists(table: str, path: Path | None = None) -> bool:
    """True if table `inet <table>` exists here (or in the namespace at path)."""
    sock = _open_in(path) if path is not None else socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.bind((0, 0))
        body = struct.pack("=BBH", NFPROTO_INET, 0, 0) + _attr(NFTA_TABLE_NAME, table.encode() + b"\0")
        msg_type = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE
        sock.send(struct.pack("=IHHII", 16 + len(body), msg_type, NLM_F_REQUEST, 1, 0) + body)
        data = sock.recv(65536)
        (_length, mtype) = struct.unpack_from("=IH", data, 0)
        if mtype == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", data, 16)
            if code == -errno.ENOENT:
                return False
            if code != 0:
                raise OSError(-code, os.strerror(-code))
        return True
    finally:
        sock.close()

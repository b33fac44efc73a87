"""Attach the counting programs to a link with classic tc (clsact qdisc + cls_bpf, direct-action),
by raw rtnetlink: add, list, verify and delete exactly the project's filters.

Classic clsact/cls_bpf (4.5; direct-action 4.4; TCA_BPF_NAME 4.1, TCA_BPF_ID/TAG 4.13) rather
than tcx/bpf_link (6.6): it works on every kernel the project supports, and a site's own tc
filters on the same hook keep working (ours returns TC_ACT_UNSPEC: "no verdict, go on").

The project's filters are recognised by kind "bpf", priority PRIO, handle HANDLE and name;
nothing else on the link is ever touched. On the node's end of a job's veth, tc ingress is
what the job sent ("out") and tc egress what it receives ("in").
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .. import naming
from .netns import entered
from .nlmsg import (ATTR, HEADER, NLA_F_NESTED, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE,
                    NLMSG_ERROR, attr, message)

RTM_NEWQDISC, RTM_DELQDISC, RTM_GETQDISC = 36, 37, 38
RTM_NEWTFILTER, RTM_DELTFILTER, RTM_GETTFILTER = 44, 45, 46
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_BPF_FD, TCA_BPF_NAME, TCA_BPF_FLAGS, TCA_BPF_FLAGS_GEN, TCA_BPF_TAG, TCA_BPF_ID = 6, 7, 8, 9, 10, 11
TCA_BPF_FLAG_ACT_DIRECT = 1
TCA_CLS_FLAGS_SKIP_HW = 1
TC_H_CLSACT = 0xFFFFFFF1
TC_H_CLSACT_HANDLE = 0xFFFF0000
PARENT = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}
ETH_P_ALL = 0x0003

PRIO, HANDLE = naming.TC_PRIO, naming.TC_HANDLE  # the project's filters (naming: one source)
# hook on the node's end of the job's veth -> the job's direction
HOOK_DIRECTION = {"ingress": "out", "egress": "in"}
FILTER_NAME = {hook: naming.TC_FILTER_NAMES[d] for hook, d in HOOK_DIRECTION.items()}

_TCMSG = struct.Struct("=BxxxiIII")  # family, ifindex, handle, parent, info


class TcError(OSError):
    """A tc netlink request failed: one line with what and the errno."""

    def __init__(self, err: int, what: str) -> None:
        super().__init__(err, f"tc {what}: {os.strerror(err)}")

    def __str__(self) -> str:
        return str(self.strerror)


@dataclass(frozen=True)
class Filter:
    """One tc filter as the kernel lists it."""

    hook: str
    prio: int
    protocol: int
    handle: int
    kind: str
    name: str = ""
    prog_id: int = 0
    tag: bytes = b""
    direct_action: bool = False

    @property
    def ours(self) -> bool:
        return self.kind == "bpf" and self.prio == PRIO and self.handle == HANDLE


@contextmanager
def rtnl(netns: Path | None = None) -> Iterator[socket.socket]:
    """An rtnetlink socket in the current namespace, or made inside the one at `netns`."""
    if netns is None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
    else:
        with entered(netns):
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
    try:
        sock.bind((0, 0))
        yield sock
    finally:
        sock.close()


def _tcmsg(ifindex: int, handle: int, parent: int, info: int = 0) -> bytes:
    return _TCMSG.pack(socket.AF_UNSPEC, ifindex, handle, parent, info)


def _info(prio: int) -> int:
    return (prio << 16) | socket.htons(ETH_P_ALL)


def clsact_request(ifindex: int, seq: int) -> bytes:
    body = _tcmsg(ifindex, TC_H_CLSACT_HANDLE, TC_H_CLSACT) + attr(TCA_KIND, b"clsact\0")
    return message(RTM_NEWQDISC, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body, seq)


def filter_request(ifindex: int, hook: str, prog_fd: int, name: str, seq: int,
                   replace: bool = False, prio: int = PRIO, handle: int = HANDLE) -> bytes:
    opts = (attr(TCA_BPF_FD, struct.pack("=I", prog_fd)) + attr(TCA_BPF_NAME, name.encode() + b"\0")
            + attr(TCA_BPF_FLAGS, struct.pack("=I", TCA_BPF_FLAG_ACT_DIRECT))
            + attr(TCA_BPF_FLAGS_GEN, struct.pack("=I", TCA_CLS_FLAGS_SKIP_HW)))
    body = (_tcmsg(ifindex, handle, PARENT[hook], _info(prio)) + attr(TCA_KIND, b"bpf\0")
            + attr(TCA_OPTIONS | NLA_F_NESTED, opts))
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | (NLM_F_REPLACE if replace else NLM_F_EXCL)
    return message(RTM_NEWTFILTER, flags, body, seq)


def delete_filter_request(ifindex: int, hook: str, seq: int, prio: int = PRIO, handle: int = HANDLE) -> bytes:
    body = _tcmsg(ifindex, handle, PARENT[hook], _info(prio)) + attr(TCA_KIND, b"bpf\0")
    return message(RTM_DELTFILTER, NLM_F_REQUEST | NLM_F_ACK, body, seq)


def _acks(sock: socket.socket, seqs: set[int]) -> dict[int, int]:
    """Read acknowledgements until every seq has one: {seq: errno (0 = done)}."""
    got: dict[int, int] = {}
    while seqs - got.keys():
        data = sock.recv(65536)
        pos = 0
        while pos + HEADER.size <= len(data):
            length, kind, _flags, seq, _pid = HEADER.unpack_from(data, pos)
            if kind == NLMSG_ERROR:
                got[seq] = -struct.unpack_from("=i", data, pos + HEADER.size)[0]
            pos += (length + 3) & ~3
            if length < HEADER.size:
                break
    return got


_seq = 0


def _next_seq() -> int:
    global _seq
    _seq = (_seq + 1) & 0x7FFFFFFF
    return _seq


def attach(sock: socket.socket, ifindex: int, progs: dict[str, int], replace: bool = False) -> bool:
    """Add a clsact qdisc (if the link has none) and the project's two filters, in one send:
    progs {"out": fd, "in": fd}. True if the clsact qdisc was made here."""
    s_q, s_i, s_e = _next_seq(), _next_seq(), _next_seq()
    batch = (clsact_request(ifindex, s_q)
             + filter_request(ifindex, "ingress", progs["out"], FILTER_NAME["ingress"], s_i, replace)
             + filter_request(ifindex, "egress", progs["in"], FILTER_NAME["egress"], s_e, replace))
    sock.send(batch)
    acks = _acks(sock, {s_q, s_i, s_e})
    if acks[s_q] not in (0, errno.EEXIST):
        raise TcError(acks[s_q], f"clsact on link {ifindex}")
    for hook, s in (("ingress", s_i), ("egress", s_e)):
        if acks[s]:
            if hook == "egress" and not acks[s_i]:  # roll back the half that was made
                detach(sock, ifindex, hooks=("ingress",))
            raise TcError(acks[s], f"bpf filter on link {ifindex} {hook}")
    return acks[s_q] == 0


def detach(sock: socket.socket, ifindex: int, hooks: tuple[str, ...] = ("ingress", "egress")) -> int:
    """Delete the project's filters (only those) from the link; how many were there."""
    seqs = {hook: _next_seq() for hook in hooks}
    sock.send(b"".join(delete_filter_request(ifindex, h, s) for h, s in seqs.items()))
    acks = _acks(sock, set(seqs.values()))
    gone = 0
    for hook, s in seqs.items():
        if acks[s] == 0:
            gone += 1
        elif acks[s] not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
            # (no clsact: EINVAL; no such filter: ENOENT)
            raise TcError(acks[s], f"delete bpf filter on link {ifindex} {hook}")
    return gone


def delete_clsact(sock: socket.socket, ifindex: int) -> bool:
    """Remove the link's clsact qdisc (and every filter under it): only for links the project
    owns outright, where nothing else can have filters. False if there was none."""
    s = _next_seq()
    body = _tcmsg(ifindex, TC_H_CLSACT_HANDLE, TC_H_CLSACT)
    sock.send(message(RTM_DELQDISC, NLM_F_REQUEST | NLM_F_ACK, body, s))
    err = _acks(sock, {s})[s]
    if err in (errno.ENOENT, errno.EINVAL):
        return False
    if err:
        raise TcError(err, f"delete clsact on link {ifindex}")
    return True


def _parse_attrs(data: bytes, pos: int, stop: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while pos + ATTR.size <= stop:
        alen, kind = ATTR.unpack_from(data, pos)
        if alen < ATTR.size:
            break
        out[kind & 0x3FFF] = data[pos + ATTR.size:pos + alen]
        pos += (alen + 3) & ~3
    return out


def list_filters(sock: socket.socket, ifindex: int, hook: str) -> list[Filter]:
    """Every filter on one clsact hook of the link (an empty list if there is no clsact)."""
    s = _next_seq()
    sock.send(message(RTM_GETTFILTER, NLM_F_REQUEST | NLM_F_DUMP, _tcmsg(ifindex, 0, PARENT[hook]), s))
    out: list[Filter] = []
    while True:
        data = sock.recv(65536)
        pos = 0
        while pos + HEADER.size <= len(data):
            length, kind, _flags, seq, _pid = HEADER.unpack_from(data, pos)
            if kind == NLMSG_DONE:
                return out
            if kind == NLMSG_ERROR:
                err = -struct.unpack_from("=i", data, pos + HEADER.size)[0]
                if err in (errno.EINVAL, errno.ENOENT):
                    return out
                raise TcError(err, f"list filters on link {ifindex} {hook}")
            if kind == RTM_NEWTFILTER:
                _f, _idx, handle, _parent, info = _TCMSG.unpack_from(data, pos + HEADER.size)
                attrs = _parse_attrs(data, pos + HEADER.size + _TCMSG.size, pos + length)
                fkind = attrs.get(TCA_KIND, b"").rstrip(b"\0").decode()
                name, prog_id, tag, da = "", 0, b"", False
                if fkind == "bpf" and TCA_OPTIONS in attrs:
                    o = _parse_attrs(attrs[TCA_OPTIONS], 0, len(attrs[TCA_OPTIONS]))
                    name = o.get(TCA_BPF_NAME, b"").rstrip(b"\0").decode()
                    prog_id = struct.unpack("=I", o[TCA_BPF_ID])[0] if TCA_BPF_ID in o else 0
                    tag = o.get(TCA_BPF_TAG, b"")
                    da = bool(TCA_BPF_FLAGS in o and struct.unpack("=I", o[TCA_BPF_FLAGS])[0] & 1)
                if handle:  # (a dump also lists each priority's head, with handle 0)
                    out.append(Filter(hook, info >> 16, socket.ntohs(info & 0xFFFF), handle, fkind,
                                      name, prog_id, tag, da))
            pos += (length + 3) & ~3
            if length < HEADER.size:
                break


def our_programs(sock: socket.socket, ifindex: int) -> dict[str, int]:
    """{"out": prog id, "in": prog id} of the project's filters on the link (missing: absent)."""
    found: dict[str, int] = {}
    for hook in ("ingress", "egress"):
        for f in list_filters(sock, ifindex, hook):
            if f.ours and f.direct_action:
                found[HOOK_DIRECTION[hook]] = f.prog_id
    return found

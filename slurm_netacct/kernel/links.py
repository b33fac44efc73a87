"""A job's link: the veth pair, its addresses, routes and per-link settings (netlink)."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SetupError
from .netns import entered, is_netns
from .nlmsg import HEADER, NLA_F_NESTED, NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, attr, message

IFA_F_NODAD = 0x02
# rtnetlink, for the per-link settings pyroute2 cannot encode (an IPv4 devconf entry)
RTM_SETLINK = 19
IFLA_AF_SPEC, IFLA_INET_CONF, IFLA_INET6_ADDR_GEN_MODE = 26, 1, 8
IPV4_DEVCONF_ROUTE_LOCALNET = 26  # net.ipv4.conf.X.route_localnet
IN6_ADDR_GEN_MODE_NONE = 1  # no automatic IPv6 link-local address (`ip link set X addrgenmode none`)
GATEWAY_V6 = "fe80::1"  # the node-side address on every job link (link-local, same on all)


@dataclass(frozen=True)
class JobAddresses:
    """Addresses of one job link: the job's own and the node-side gateway."""

    ipv4: ipaddress.IPv4Address
    gateway4: ipaddress.IPv4Address
    ipv6: ipaddress.IPv6Address | None = None


def _ipr(netns_path: Path | None = None) -> Any:
    """An rtnetlink socket (no event subscriptions) in this namespace or the one at path."""
    from pyroute2 import IPRoute

    if netns_path is None:
        return IPRoute(groups=0)
    with entered(netns_path):  # the socket is made inside, and stays bound to it
        return IPRoute(groups=0)


def link_index(name: str) -> int | None:
    """Index of a link in the current namespace, or None."""
    with _ipr() as ipr:
        found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def default_uplink() -> str | None:
    """Name of the interface that carries the IPv4 default route, if any."""
    with _ipr() as ipr:
        for route in ipr.get_default_routes(family=2):
            oif = route.get("oif") or route.get_attr("RTA_OIF")
            if oif:
                links = ipr.get_links(oif)
                if links:
                    return str(links[0].get_attr("IFLA_IFNAME"))
    return None


def link_settings_request(index: int, route_localnet: bool, ipv6: bool = True) -> bytes:
    """RTM_SETLINK for a job link: no automatic IPv6 link-local address (with ipv6), and
    route_localnet on (with route_localnet)."""
    spec = b""
    if route_localnet:
        conf = attr(IPV4_DEVCONF_ROUTE_LOCALNET, struct.pack("=I", 1))
        spec += attr(socket.AF_INET | NLA_F_NESTED, attr(IFLA_INET_CONF | NLA_F_NESTED, conf))
    if ipv6:
        spec += attr(socket.AF_INET6 | NLA_F_NESTED,
                      attr(IFLA_INET6_ADDR_GEN_MODE, struct.pack("=B", IN6_ADDR_GEN_MODE_NONE)))
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, 0, 0) + attr(IFLA_AF_SPEC | NLA_F_NESTED, spec)
    return message(RTM_SETLINK, NLM_F_REQUEST | NLM_F_ACK, body)


def _ask(sock: socket.socket, request: bytes) -> int:
    """Send one rtnetlink request; the errno of its acknowledgement (0: done)."""
    sock.send(request)
    answer = sock.recv(65536)
    _len, kind, _flags, _seq, _pid = HEADER.unpack_from(answer)
    if kind != NLMSG_ERROR:
        raise SetupError(f"unexpected rtnetlink answer type {kind}")
    return -struct.unpack_from("=i", answer, HEADER.size)[0]


def link_settings(sock: socket.socket, index: int, route_localnet: bool) -> None:
    """Set a job link's own settings (see link_settings_request) before it is up.

    Without them each new job end does IPv6 duplicate address detection and sends router
    solicitations, work that runs on timers for ~12 s after every prolog; neither end needs a
    link-local address (the node's end has fe80::1, NDP works from the job's own address).
    route_localnet lets DNS queries redirected to the node's loopback resolver cross the
    link. By netlink, not /proc/sys: with 1000 job namespaces on the machine a sysctl file
    costs ~0.5-1.5 ms to open, this 0.02 ms. A kernel booted without IPv6 refuses the AF_INET6
    part (EAFNOSUPPORT): there is no link-local address to prevent there."""
    code = _ask(sock, link_settings_request(index, route_localnet))
    if code == errno.EAFNOSUPPORT:
        code = _ask(sock, link_settings_request(index, route_localnet, ipv6=False)) if route_localnet else 0
    if code:
        raise OSError(code, os.strerror(code))


def _rtnl() -> socket.socket:
    """A plain rtnetlink socket in this namespace."""
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)


def build_link(netns_path: Path, host_if: str, job_if: str, addrs: JobAddresses,
               route_localnet: bool = False) -> None:
    """Make the veth pair host_if <-> job_if (inside the namespace), addresses and routes;
    with route_localnet, both ends route 127/8 (DNS redirected to the node's loopback resolver)."""
    gw4 = str(addrs.gateway4)
    step = "veth pair"  # what was being done, for the error message
    try:
        with _ipr() as ipr:
            ipr.link("add", ifname=host_if, kind="veth",
                     peer={"ifname": job_if, "net_ns_fd": str(netns_path)})
            idx = ipr.link_lookup(ifname=host_if)[0]
            step = "link settings"
            with _rtnl() as sock:
                link_settings(sock, idx, route_localnet)
            step = f"address {gw4}"
            ipr.addr("add", index=idx, address=gw4, prefixlen=32)
            if addrs.ipv6 is not None:
                step = f"address {GATEWAY_V6}"
                ipr.addr("add", index=idx, address=GATEWAY_V6, prefixlen=64, flags=IFA_F_NODAD)
            step = "link up"
            ipr.link("set", index=idx, state="up")
            step = f"route to {addrs.ipv4}"
            ipr.route("add", dst=f"{addrs.ipv4}/32", oif=idx)
            if addrs.ipv6 is not None:
                step = f"route to {addrs.ipv6}"
                ipr.route("add", dst=f"{addrs.ipv6}/128", oif=idx, family=10)
        step = "the job's side"
        with ExitStack() as sockets:
            with entered(netns_path):  # both sockets are made inside, and stay bound to it
                jpr = sockets.enter_context(_ipr())
                jsock = sockets.enter_context(_rtnl())
            lo = jpr.link_lookup(ifname="lo")[0]
            jpr.link("set", index=lo, state="up")
            jidx = jpr.link_lookup(ifname=job_if)[0]
            link_settings(jsock, jidx, route_localnet)
            jpr.addr("add", index=jidx, address=str(addrs.ipv4), prefixlen=32)
            if addrs.ipv6 is not None:
                jpr.addr("add", index=jidx, address=str(addrs.ipv6), prefixlen=128, flags=IFA_F_NODAD)
            jpr.link("set", index=jidx, state="up")
            jpr.route("add", dst=f"{gw4}/32", oif=jidx, scope=253)  # RT_SCOPE_LINK
            jpr.route("add", dst="0.0.0.0/0", gateway=gw4, oif=jidx)
            if addrs.ipv6 is not None:
                jpr.route("add", dst="::/0", gateway=GATEWAY_V6, oif=jidx, family=10)
    except SetupError:
        raise
    except Exception as exc:  # pyroute2 raises NetlinkError and plain OSErrors
        raise SetupError(f"link setup for {host_if} ({step}): {exc}") from None


def delete_link(name: str, index: int | None = None) -> bool:
    """Delete a link (and so its veth peer and routes) from the current namespace.

    With `index`, only the link that had that index (indices are not reused soon): a link of
    the same name made since, by a later run of the job, is left alone."""
    from pyroute2.netlink.exceptions import NetlinkError

    with _ipr() as ipr:
        found = [index] if index is not None else ipr.link_lookup(ifname=name)
        if not found:
            return False
        try:
            ipr.link("del", index=found[0])
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return False
            raise SetupError(f"cannot delete link {name}: {exc}") from None
    return True


def link_down(name: str) -> bool:
    """Set a link down (no packet passes a veth whose end is down); False if there is none.

    Much cheaper than deleting it (~0.2 ms against ~15 ms measured here). A veth whose other
    end's namespace was just removed goes away by itself, maybe between the look-up and the
    request: that is no link either."""
    from pyroute2.netlink.exceptions import NetlinkError

    with _ipr() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return False
        try:
            ipr.link("set", index=found[0], state="down")
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return False
            raise SetupError(f"cannot set link {name} down: {exc}") from None
    return True


def stop_link(netns_path: Path, job_if: str, host_if: str) -> bool:
    """Stop all traffic of a job's veth pair: set its job end down (the host end then has no
    carrier: nothing passes either way); the host end when the job's namespace is gone.
    False if there was no link.

    The job end lives in a namespace with two links and a handful of routes: setting it
    down costs the same with 1000 jobs on the node, where downing the host end (whose routes
    share the node's table with every job's) went from 1.0 to 3.4 ms (measured here)."""
    if is_netns(netns_path):
        try:
            with _ipr(netns_path) as jpr:
                found = jpr.link_lookup(ifname=job_if)
                if found:
                    jpr.link("set", index=found[0], state="down")
                    return True
        except Exception as exc:  # the namespace went away meanwhile (OSError, NetlinkError): the host end
            from ..log import get as get_log

            get_log().info("link %s: its job end cannot be set down (%s); setting the node end down",
                           host_if, exc)
    return link_down(host_if)


def list_links() -> list[str]:
    """Names of all links in the current namespace."""
    with _ipr() as ipr:
        return [str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()]

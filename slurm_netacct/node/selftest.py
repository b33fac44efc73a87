"""netacct-doctor --self-test: a throwaway job on this node whose counters must come out exact.

What it does, in order (README, "netacct-doctor"):
1. makes a namespace of its own, `netacct-doctor-<pid>`, joined to this node's namespace by a
   veth pair (`<ifname_prefix>x<pid>` here, `eth0` there) with 192.0.2.1/30 on the node's end
   and 192.0.2.2/30 on the other (TEST-NET-1, RFC 5737: never routed; refused if any address
   or route of this node already touches 192.0.2.0/30), and a UDP echo server in it;
2. runs slurm.conf's Prolog (the entry that is slurm-netacct's, or a wrapper that execs it)
   for job SELFTEST_JOB_ID as slurmd would: as root, no PATH, the job's SLURM_* variables,
   and the doctor's NETACCT_CONFIG and NETACCT_SOCKET (so netacct-daemon does the work if it
   runs with that config; a wrapper may set its own);
3. inside the job (`netacct-exec`: its namespace, or its cgroup with the cgroup engine) sends
   20 UDP datagrams of known sizes to 192.0.2.2 and waits for each echo: the packets cross
   the job's link and the doctor's veth pair and nothing else, so none leaves the node;
4. runs the Epilog, reads the job's record from the node database, deletes it (it is never
   shipped to the ledger either), removes the veth pair and the namespace;
5. the record must hold exactly what was sent and received, in the class the config gives
   192.0.2.2 (IP bytes: payload + 28 per datagram), and nothing in any other class.
"""

from __future__ import annotations

import ipaddress
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

from .. import naming
from ..errors import NetacctError
from ..kernel import netns
from .doctor import Context, Result, Verdict, hook_paths, hook_target

SERVER_NET = ipaddress.IPv4Network("192.0.2.0/30")
NODE_ADDR, SERVER_ADDR = "192.0.2.1", "192.0.2.2"
SIZES = [64, 200, 512, 1000, 1400] * 4  # UDP payloads: each fits any link's 1500-byte MTU
IP_UDP_HEADERS = 28

SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
print("ready", s.getsockname()[1], flush=True)
s.settimeout(30)
for _ in range(int(sys.argv[2])):
    try:
        data, peer = s.recvfrom(65536)
    except socket.timeout:
        break
    s.sendto(data, peer)
"""

CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], int(sys.argv[2])))
s.settimeout(2)
sent = got = 0
for size in map(int, sys.argv[3].split(",")):
    s.send(b"x" * size)
    sent += size
    try:
        got += len(s.recv(65536))
    except socket.timeout:
        print("timeout", flush=True)
print("sent", sent, "got", got, flush=True)
"""


def expected_class(ctx: Context, addr: str) -> str:
    """The class the config's first-match order gives `addr`."""
    assert ctx.cfg is not None
    ip = ipaddress.ip_address(addr)
    for klass, prefix in ctx.cfg.class_prefixes():
        if prefix.version == ip.version and ip in prefix:
            return klass
    return ctx.cfg.default_class


def _net_in_use() -> str | None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for a in ipr.get_addr(family=2):
            addr = ipaddress.IPv4Address(a.get_attr("IFA_ADDRESS"))
            if addr in SERVER_NET:
                return f"address {addr} is on this node"
        for r in ipr.get_routes(family=2, table=254):
            if r["dst_len"] == 0:
                continue
            dst = ipaddress.IPv4Network(f"{r.get_attr('RTA_DST')}/{r['dst_len']}")
            if dst.overlaps(SERVER_NET):
                return f"route {dst} exists on this node"
    return None


def _hooks(ctx: Context) -> tuple[Path, Path] | str:
    found = []
    for which in ("prolog", "epilog"):
        value = ctx.slurm.get(which.capitalize()) or ""
        targets = [p for p in hook_paths(value) if hook_target(p, which)]
        if not targets:
            return f"slurm.conf's {which.capitalize()} is not slurm-netacct's (see the {which} line)"
        found.append(targets[0])
    return found[0], found[1]


def _hook_env(ctx: Context) -> dict[str, str]:
    env = {"SLURM_JOB_ID": str(naming.SELFTEST_JOB_ID), "SLURM_JOB_USER": "root", "SLURM_JOB_UID": "0",
           "SLURMD_NODENAME": ctx.node, "SLURM_JOB_ACCOUNT": "netacct-doctor",
           "NETACCT_CONFIG": str(ctx.cfg_path), "NETACCT_SOCKET": str(ctx.setup.socket)}
    if os.environ.get("NETACCT_PYTHON"):
        env["NETACCT_PYTHON"] = os.environ["NETACCT_PYTHON"]
    return env


def _run_hook(path: Path, ctx: Context) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(path)], env=_hook_env(ctx), capture_output=True, text=True, timeout=120, cwd="/")


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no message"


def _record(ctx: Context) -> tuple[str | None, dict[str, tuple[int, int, int, int]]]:
    """The self-test job's state and traffic (class -> in_bytes, out_bytes, in_pkts, out_pkts),
    read from the node database and then deleted from it."""
    assert ctx.cfg is not None
    db = ctx.cfg.db_for(ctx.node)
    key = (naming.SELFTEST_JOB_ID, ctx.node)
    try:  # mode=rw: never create a database that the hooks did not make
        conn = sqlite3.connect(f"file:{quote(str(db))}?mode=rw", uri=True, timeout=30)
    except sqlite3.Error:
        return None, {}
    try:
        row = conn.execute("SELECT state FROM jobs WHERE job_id = ? AND node = ? ORDER BY restart DESC LIMIT 1",
                           key).fetchone()
        traffic = {k: (ib, ob, ip, op) for k, ib, ob, ip, op in conn.execute(
            "SELECT class, in_bytes, out_bytes, in_packets, out_packets FROM traffic WHERE job_id = ? AND node = ?",
            key)}
        with conn:
            conn.execute("DELETE FROM traffic WHERE job_id = ? AND node = ?", key)
            conn.execute("DELETE FROM jobs WHERE job_id = ? AND node = ?", key)
    except sqlite3.Error:
        return None, {}
    finally:
        conn.close()
    return (row[0] if row else None), traffic


def self_test(ctx: Context) -> Result:
    name = "self-test"
    if ctx.role != "compute":
        return Result(name, Verdict.SKIP, f"a {ctx.role} host runs no jobs")
    if ctx.cfg is None:
        return Result(name, Verdict.FAIL, "cannot run: the config does not parse", "see the config line")
    cfg = ctx.cfg
    if cfg.engine == "cgroup":
        from .doctor import _cgroup_mode

        if _cgroup_mode(cfg) == "slurm":
            return Result(name, Verdict.SKIP, "engine \"cgroup\" in mode \"slurm\": a job's cgroup is made by "
                          "SLURM itself; submit a test job instead (README, step 8)")
    hooks = _hooks(ctx)
    if isinstance(hooks, str):
        return Result(name, Verdict.FAIL, f"cannot run: {hooks}", "see the prolog and epilog lines")
    prolog, epilog = hooks
    job = naming.JobNames.of(cfg, naming.SELFTEST_JOB_ID)
    if cfg.engine != "cgroup" and os.path.lexists(job.netns_path):
        return Result(name, Verdict.FAIL, f"{job.netns_path} exists: an earlier self-test did not finish",
                      f"SLURM_JOB_ID={naming.SELFTEST_JOB_ID} SLURMD_NODENAME={ctx.node} {epilog}")
    busy = _net_in_use()
    if busy:
        return Result(name, Verdict.FAIL, f"cannot run: {busy} (the self-test's server uses {SERVER_NET})",
                      "submit a test job instead (README, step 8)")
    pid = os.getpid()
    srv_ns = Path(cfg.netns_dir) / f"netacct-doctor-{pid}"
    host_if = f"{cfg.ifname_prefix}x{pid % 100000}"
    server = None
    prolog_ran = epilog_ran = False
    try:
        _make_server_link(srv_ns, host_if)
        server = subprocess.Popen([sys.executable, "-c", SERVER, SERVER_ADDR, str(len(SIZES))],
                                  stdout=subprocess.PIPE, text=True, preexec_fn=lambda: netns.setns(srv_ns))
        assert server.stdout is not None
        ready = server.stdout.readline().split()
        if ready[:1] != ["ready"]:
            return Result(name, Verdict.FAIL, "the self-test's server did not start", "report this as a bug")
        port = ready[1]
        prolog_ran = True
        r = _run_hook(prolog, ctx)
        if r.returncode != 0:
            return Result(name, Verdict.FAIL, f"the prolog failed (exit {r.returncode}): {_first_line(r.stderr)}",
                          "the same failure drains the node for real jobs: fix what it says")
        c = subprocess.run([sys.executable, "-m", "slurm_netacct.cli.exec", "--job", str(naming.SELFTEST_JOB_ID),
                            "--", sys.executable, "-c", CLIENT, SERVER_ADDR, port, ",".join(map(str, SIZES))],
                           env=dict(os.environ, NETACCT_CONFIG=str(ctx.cfg_path)),
                           capture_output=True, text=True, timeout=120)
        epilog_ran = True
        e = _run_hook(epilog, ctx)
        state, traffic = _record(ctx)
    finally:
        if prolog_ran and not epilog_ran:  # a failed prolog, or an exception: leave no job behind
            _run_hook(epilog, ctx)
            _record(ctx)
        if server is not None:
            server.kill()
            server.wait()
        _remove_server_link(srv_ns, host_if)
    if e.returncode != 0:
        return Result(name, Verdict.FAIL, f"the epilog failed (exit {e.returncode}): {_first_line(e.stderr)}",
                      "the same failure drains the node for real jobs: fix what it says")
    words = c.stdout.split()
    if c.returncode != 0 or "sent" not in words:
        return Result(name, Verdict.FAIL, f"the job's traffic could not be sent: {_first_line(c.stderr or c.stdout)}",
                      "see netacct-exec's message")
    sent, got = int(words[words.index("sent") + 1]), int(words[words.index("got") + 1])
    timeouts = words.count("timeout")
    if got == 0:
        return Result(name, Verdict.FAIL, f"no echo came back from {SERVER_ADDR} through the job's link: jobs' "
                      "traffic does not pass this node (a firewall's FORWARD policy? rp_filter?)",
                      "let the job pool through: iptables/nft FORWARD, sysctl net.ipv4.conf.*.rp_filter")
    klass = expected_class(ctx, SERVER_ADDR)
    n_out, n_in = len(SIZES), len(SIZES) - timeouts
    want_out = sent + IP_UDP_HEADERS * n_out
    want_in = got + IP_UDP_HEADERS * n_in
    want = {klass: (want_in, want_out, n_in, n_out)}
    have = {k: v for k, v in traffic.items() if any(v)}
    if state is None:
        return Result(name, Verdict.FAIL, f"the epilog stored no record in {cfg.db_for(ctx.node)} (spooled?)",
                      "see the epilog's log lines for the job")
    if have != want:
        def show(t: dict[str, tuple[int, int, int, int]]) -> str:
            return ", ".join(f"{k} in {v[2]} pkts/{v[0]} B out {v[3]} pkts/{v[1]} B" for k, v in sorted(t.items())) or "nothing"
        return Result(name, Verdict.FAIL, f"job {naming.SELFTEST_JOB_ID} counted {show(have)}; it exchanged "
                      f"{show(want)} with {SERVER_ADDR}", "accounting is wrong on this node: something else "
                      "on the job's link (a tc filter, another tool's rules)? Compare `tc filter show dev "
                      f"{cfg.ifname_prefix}<job id> ingress` with a fresh node")
    return Result(name, Verdict.OK, f"job {naming.SELFTEST_JOB_ID} (prolog, {n_out} datagrams to and {n_in} from "
                  f"{SERVER_ADDR}, epilog): {klass} in {n_in} pkts/{want_in} B, out {n_out} pkts/{want_out} B, "
                  "exact; its record deleted")


def _server_side() -> None:
    """In the server's namespace: lo and eth0 up, its address, a default route via the node."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        eth = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=eth, address=SERVER_ADDR, prefixlen=SERVER_NET.prefixlen)
        ipr.link("set", index=eth, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway=NODE_ADDR)


def _make_server_link(ns: Path, host_if: str) -> None:
    from pyroute2 import IPRoute

    netns.create(ns)
    try:
        fd = os.open(ns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with IPRoute() as ipr:
                ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": f"{host_if}p"})
                peer = ipr.link_lookup(ifname=f"{host_if}p")[0]
                ipr.link("set", index=peer, net_ns_fd=fd, ifname="eth0")
                idx = ipr.link_lookup(ifname=host_if)[0]
                ipr.addr("add", index=idx, address=NODE_ADDR, prefixlen=SERVER_NET.prefixlen)
                ipr.link("set", index=idx, state="up")
        finally:
            os.close(fd)
        netns.run_in_netns(ns, _server_side)
    except Exception as exc:  # noqa: BLE001 - netlink errors of every kind: undo, then one line
        _remove_server_link(ns, host_if)
        raise NetacctError(f"self-test: cannot make its server's link: {exc}") from None


def _remove_server_link(ns: Path, host_if: str) -> None:
    from pyroute2 import IPRoute

    try:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=host_if)
            if found:
                ipr.link("del", index=found[0])
    except Exception:  # noqa: BLE001, S110 - the namespace's removal below takes the pair with it
        pass
    netns.remove(ns)

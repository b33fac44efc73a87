"""netacct-doctor's checks: is this host (compute node, login node, controller) set up as the
README's "Installing on a cluster" says? Each check gives one verdict, a reason and a fix.

The checks read files and the kernel; they change nothing (the self-test, in `selftest`,
runs a throwaway job). They never raise for what they find: a broken setup is a FAIL line.
"""

from __future__ import annotations

import enum
import glob
import ipaddress
import os
import re
import shlex
import socket
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .. import config as config_mod
from .. import naming
from ..config import Config
from ..errors import NetacctError
from . import agreement

ROLES = ("compute", "login", "controller")
DEFAULT_SLURM_CONF = Path("/etc/slurm/slurm.conf")


class Verdict(enum.Enum):
    OK = "OK"
    FAIL = "FAIL"  # jobs are not (or wrongly) accounted, or hooks fail
    WARN = "WARN"  # works, but not as recommended, or something is left over
    SKIP = "SKIP"  # does not apply to this host or setup (the reason says why)


@dataclass(frozen=True)
class Result:
    """One check's verdict: `name` (a fixed word), what was found, and how to fix it."""

    name: str
    verdict: Verdict
    detail: str
    fix: str = ""

    def line(self) -> str:
        fix = f"; fix: {self.fix}" if self.fix and self.verdict in (Verdict.FAIL, Verdict.WARN) else ""
        return f"{self.verdict.value:<4}  {self.name}: {self.detail}{fix}"


@dataclass
class SlurmConf:
    """The settings of slurm.conf that matter here (keys lower-cased; `include`s followed)."""

    path: Path
    settings: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (NodeAddr, NodeHostname)
    error: str | None = None

    def get(self, key: str) -> str | None:
        return self.settings.get(key.lower())


def expand_hostlist(text: str) -> list[str]:
    """SLURM's host list: `n[1-3,05],login` -> n1 n2 n3 n05 login (one bracket a name)."""
    out: list[str] = []
    for part in re.findall(r"[^,\[]*(?:\[[^\]]*\])?[^,\[]*", text):
        if not part:
            continue
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            out.append(part)
            continue
        head, ranges, tail = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            if not hi:
                out.append(f"{head}{lo}{tail}")
                continue
            if not (lo.isdigit() and hi.isdigit()):
                continue
            for i in range(int(lo), int(hi) + 1):
                out.append(f"{head}{str(i).zfill(len(lo))}{tail}")
    return out


def read_slurm_conf(path: Path) -> SlurmConf:
    """slurm.conf's Key=Value settings (the last one wins) and its NodeName lines."""
    conf = SlurmConf(path)
    seen: set[Path] = set()

    def read(p: Path) -> None:
        if p in seen:
            return
        seen.add(p)
        try:
            text = p.read_text(errors="replace")
        except OSError as exc:
            if conf.error is None:
                conf.error = f"{p}: {exc.strerror or exc}"
            return
        for raw in text.splitlines():
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            words = line.split()
            if words[0].lower() == "include" and len(words) > 1:
                inc = Path(words[1]) if words[1].startswith("/") else path.parent / words[1]
                read(inc)
                continue
            pairs = [w.split("=", 1) for w in words if "=" in w]
            if not pairs:
                continue
            if pairs[0][0].lower() == "nodename" and pairs[0][1].upper() != "DEFAULT":
                fields = {k.lower(): v for k, v in pairs}
                names = expand_hostlist(fields["nodename"])
                addrs = expand_hostlist(fields.get("nodeaddr", "")) or names
                hosts = expand_hostlist(fields.get("nodehostname", "")) or names
                for i, name in enumerate(names):
                    conf.nodes[name] = (addrs[i] if i < len(addrs) else name, hosts[i] if i < len(hosts) else name)
                continue
            if pairs[0][0].lower() in ("partitionname", "nodeset", "frontendname", "downnodes"):
                continue
            for k, v in pairs:
                conf.settings[k.lower()] = v

    read(path)
    return conf


@dataclass
class Setup:
    """What the doctor is told, or finds, about this host."""

    config_path: Path | None  # None: $NETACCT_CONFIG, else /etc/slurm/netacct.toml
    slurm_conf: Path
    plugstack: Path | None  # None: slurm.conf's PlugStackConfig, else beside slurm.conf
    pam: Path
    socket: Path
    node: str | None  # this host's SLURM node name; None: found as the commands find it
    role: str | None  # None: found (compute if this host is a NodeName of slurm.conf)
    cluster_nodes: dict[str, str] | None = None  # name -> address, instead of slurm.conf's


@dataclass
class Context:
    """What the checks share once found."""

    setup: Setup
    slurm: SlurmConf
    cfg: Config | None = None
    cfg_path: Path = config_mod.DEFAULT_PATH
    cfg_error: str | None = None
    node: str = ""
    role: str = "compute"
    uses_pam_adopt: bool = False

    @property
    def netns(self) -> bool:
        return self.cfg is not None and self.cfg.engine != "cgroup"


def context(setup: Setup) -> Context:
    slurm = read_slurm_conf(setup.slurm_conf)
    explicit = setup.config_path is not None or bool(os.environ.get(config_mod.ENV_VAR))
    cfg_path = Path(setup.config_path or os.environ.get(config_mod.ENV_VAR) or config_mod.DEFAULT_PATH)
    ctx = Context(setup, slurm, cfg_path=cfg_path)
    try:
        ctx.cfg = config_mod.load(cfg_path if explicit or cfg_path.exists() else None)
    except NetacctError as exc:
        ctx.cfg_error = str(exc)
    if setup.node:
        ctx.node = setup.node
    elif os.environ.get("SLURMD_NODENAME"):
        ctx.node = os.environ["SLURMD_NODENAME"]
    else:
        ctx.node = _node_from_slurm_conf(slurm) or naming.short_hostname()
    ctx.role = setup.role or _role(ctx)
    ctx.uses_pam_adopt = _pam_uses(setup.pam, "pam_slurm_adopt.so")
    return ctx


def _node_from_slurm_conf(slurm: SlurmConf) -> str | None:
    host = naming.short_hostname()
    if host in slurm.nodes:
        return host
    try:
        from .identity import is_local, local_addresses

        mine = local_addresses()
    except Exception:  # noqa: BLE001 - no netlink here: fall back on the host name
        return None
    found = [n for n, (addr, hostname) in slurm.nodes.items()
             if is_local(addr, mine) or hostname.split(".")[0] == host]
    return found[0] if len(found) == 1 else None


def _role(ctx: Context) -> str:
    if ctx.node in ctx.slurm.nodes:
        return "compute"
    host = naming.short_hostname()
    ctl = [v for k, v in ctx.slurm.settings.items() if k in ("slurmctldhost", "controlmachine")]
    if any(v.split("(")[0] == host for v in ctl):
        return "controller"
    return "login"


def _pam_uses(pam: Path, module: str) -> bool:
    try:
        return any(Path(w).name == module for line in pam.read_text(errors="replace").splitlines()
                   for w in line.split("#", 1)[0].split())
    except OSError:
        return False


# --------------------------------------------------------------------------- the checks

Check = Callable[[Context], Iterator[Result]]


def check_config(ctx: Context) -> Iterator[Result]:
    if ctx.cfg is None:
        yield Result("config", Verdict.FAIL, ctx.cfg_error or "does not parse",
                     f"correct {ctx.cfg_path} (README, \"Configuration reference\")")
        return
    c = ctx.cfg
    where = str(ctx.cfg_path) if ctx.cfg_path.exists() else f"{ctx.cfg_path} (absent: all defaults)"
    yield Result("config", Verdict.OK, f"{where} parses (engine {c.engine}, mode {c.mode}, counting {c.counting})")


def _plugstack_path(ctx: Context) -> Path:
    if ctx.setup.plugstack is not None:
        return ctx.setup.plugstack
    return agreement.plugstack_path({"SLURM_CONF": str(ctx.setup.slurm_conf)})


def check_plugstack(ctx: Context) -> Iterator[Result]:
    name = "plugstack"
    if ctx.role != "compute":
        yield Result(name, Verdict.SKIP, f"a {ctx.role} host runs no job steps")
        return
    if ctx.cfg is None:
        yield Result(name, Verdict.SKIP, "the config does not parse")
        return
    path = _plugstack_path(ctx)
    lines = agreement.plugin_lines(path)
    line = f"required /usr/lib/x86_64-linux-gnu/slurm-wlm/{agreement.PLUGIN} {agreement.wanted_arguments(ctx.cfg)}"
    if not lines:
        yield Result(name, Verdict.FAIL, f"{path} does not load {agreement.PLUGIN}: jobs' tasks run outside "
                     "their namespace, unaccounted", f"add the line `{line}` to {path}")
        return
    problems = agreement.differences(ctx.cfg, "SPANK plugin", lines)
    if len(lines) > 1:
        problems.append(f"{path}: {len(lines)} lines load {agreement.PLUGIN}; one must")
    if problems:
        yield Result(name, Verdict.FAIL, problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
                     f"make the line `{line}`, or netacct.toml as the line says")
        return
    yield Result(name, Verdict.OK, f"{lines[0][0]} loads {agreement.PLUGIN} with the config's arguments")


def check_pam(ctx: Context) -> Iterator[Result]:
    name = "pam"
    if ctx.role != "compute":
        yield Result(name, Verdict.SKIP, f"a {ctx.role} host adopts no ssh sessions into jobs")
        return
    if ctx.cfg is None:
        yield Result(name, Verdict.SKIP, "the config does not parse")
        return
    pam = ctx.setup.pam
    lines = agreement.pam_lines(pam)
    own_cgroup = ctx.cfg.engine == "cgroup" and _cgroup_mode(ctx.cfg) == "slurm"
    if not lines:
        if ctx.uses_pam_adopt and not own_cgroup:
            yield Result(name, Verdict.WARN, f"{pam} has pam_slurm_adopt but no {agreement.PAM_MODULE}: ssh "
                         "sessions adopted into jobs are not counted",
                         f"add `session required {agreement.PAM_MODULE} {agreement.wanted_arguments(ctx.cfg)}` "
                         "after pam_slurm_adopt (pam/README.md)")
        else:
            yield Result(name, Verdict.SKIP, f"no {agreement.PAM_MODULE} line in {pam} (not needed without "
                         "pam_slurm_adopt)")
        return
    problems = agreement.differences(ctx.cfg, "PAM module", lines)
    if problems:
        yield Result(name, Verdict.FAIL, problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
                     f"give {agreement.PAM_MODULE} `{agreement.wanted_arguments(ctx.cfg)}`")
        return
    yield Result(name, Verdict.OK, f"{lines[0][0]} uses {agreement.PAM_MODULE} with the config's arguments")


def _cgroup_mode(cfg: Config) -> str:
    try:
        from ..counting import cgroup as cgc

        return cgc.mode(cfg)
    except NetacctError:
        return cfg.cgroup_mode


def hook_target(path: Path, which: str, depth: int = 0) -> Path | None:
    """The slurm-netacct hook that `path` runs (itself, or what a wrapper script `exec`s), or
    None if it is not one of ours. Ours: the checkout's `prolog`/`epilog`, `netacct-prolog`/
    `netacct-epilog`, anything that runs `slurm_netacct.cli.hooks <which>`; a wrapper script
    is ours if one of its commands (by absolute path) is."""
    try:
        data = path.read_bytes()[:65536]
    except OSError:
        return None
    text = data.decode(errors="replace")
    if f"slurm_netacct.cli.hooks {which}" in text or f"{which}_main" in text:
        return path
    if depth < 3 and text.startswith("#!"):  # a wrapper script: a line that runs one of ours
        for line in text.splitlines():
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue
            if words[:1] == ["exec"]:
                words = words[1:]
            if words and words[0].startswith("/") and words[0] != str(path):
                found = hook_target(Path(words[0]), which, depth + 1)
                if found is not None:
                    return found
    return None


def installed_hook(which: str) -> Path:
    """This installation's hook: next to the venv the doctor runs from, in the Debian package
    (/usr/lib/slurm-netacct/venv) as in a checkout (<checkout>/.venv)."""
    return Path(sys.prefix).parent / which


def hook_paths(value: str) -> list[Path]:
    """The executables of a Prolog= or Epilog= value: comma-separated, each may be a glob
    (SLURM 23.02 and later run every match)."""
    out: list[Path] = []
    for item in (v.strip() for v in value.split(",")):
        if not item:
            continue
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        out += [Path(m) for m in matches]
    return out


def check_slurm_conf(ctx: Context) -> Iterator[Result]:
    conf = ctx.slurm
    if conf.error is not None:
        yield Result("slurm.conf", Verdict.FAIL, f"cannot read {conf.error}",
                     "give its path with --slurm-conf (or $SLURM_CONF)")
        return
    for which in ("prolog", "epilog"):
        key = which.capitalize()
        value = conf.get(key)
        fix = f"set `{key}={installed_hook(which)}` in slurm.conf (README, step 5)"
        if not value:
            yield Result(which, Verdict.FAIL, f"{conf.path} has no {key}=: no job is accounted", fix)
            continue
        paths = hook_paths(value)
        ours = [p for p in paths if hook_target(p, which)]
        if not ours:
            other = "epilog" if which == "prolog" else "prolog"
            swapped = [p for p in paths if hook_target(p, other)]
            why = (f"is slurm-netacct's {other}" if swapped else "is not slurm-netacct's "
                   f"{which} (nor a script that execs it)")
            yield Result(which, Verdict.FAIL, f"{key}={value} {why}", fix)
            continue
        if not os.access(ours[0], os.X_OK):
            yield Result(which, Verdict.FAIL, f"{key}={ours[0]} is not executable", f"chmod 755 {ours[0]}")
            continue
        yield Result(which, Verdict.OK, f"{key}={value} runs slurm-netacct's {which}")
    yield from _prolog_flags(ctx)


def _prolog_flags(ctx: Context) -> Iterator[Result]:
    """PrologFlags: Alloc (or Contain, which implies it) always: the namespace or cgroup
    programs must exist on every node before the batch script; Contain where sshd adopts
    sessions into jobs (pam_slurm_adopt); with the cgroup engine RunInJob leaves a window."""
    value = ctx.slurm.get("PrologFlags") or ""
    flags = {f.strip().lower() for f in value.split(",") if f.strip()}
    shown = value or "(none)"
    need = "Alloc,Contain" if ctx.uses_pam_adopt else "Alloc"
    if not flags & {"alloc", "contain"}:
        yield Result("prologflags", Verdict.FAIL, f"PrologFlags={shown} lacks Alloc: the prolog runs only at "
                     "a node's first step, after the batch script started (unaccounted)",
                     f"set `PrologFlags={need}` in slurm.conf")
        return
    if ctx.uses_pam_adopt and "contain" not in flags:
        yield Result("prologflags", Verdict.FAIL, f"PrologFlags={shown} lacks Contain, which pam_slurm_adopt "
                     f"({ctx.setup.pam}) needs to adopt ssh sessions into jobs", f"set `PrologFlags={need}`")
        return
    if ctx.cfg is not None and ctx.cfg.engine == "cgroup" and "runinjob" in flags:
        yield Result("prologflags", Verdict.WARN, f"PrologFlags={shown}: with RunInJob the extern step starts "
                     "before the prolog; an ssh session adopted in the first milliseconds is not counted",
                     f"drop RunInJob (`PrologFlags={need}`) if that matters")
        return
    yield Result("prologflags", Verdict.OK, f"PrologFlags={shown}")


def check_service(ctx: Context) -> Iterator[Result]:
    from .daemon import ask_status, config_digest

    name = "service"
    if ctx.role != "compute":
        yield Result(name, Verdict.SKIP, f"a {ctx.role} host runs no prolog or epilog")
        return
    sock = ctx.setup.socket
    fix = "systemctl enable --now netacct-daemon (contrib/netacct-daemon.service; README, step 6)"
    try:
        path, digest = ask_status(sock)
    except FileNotFoundError:
        yield Result(name, Verdict.FAIL, f"netacct-daemon is not running (no {sock}): every hook starts "
                     "Python itself, over ten times slower", fix)
        return
    except (OSError, ValueError) as exc:
        yield Result(name, Verdict.FAIL, f"netacct-daemon does not answer on {sock} ({exc})", f"restart it: {fix}")
        return
    if path != ctx.cfg_path and not (path.exists() and ctx.cfg_path.exists() and path.samefile(ctx.cfg_path)):
        yield Result(name, Verdict.FAIL, f"netacct-daemon runs with config {path}, the hooks with {ctx.cfg_path}: "
                     "it hands every hook back", "give both the same file (netacct-daemon --config, "
                     "$NETACCT_CONFIG of the hooks)")
        return
    if digest != config_digest(ctx.cfg_path):
        yield Result(name, Verdict.FAIL, f"netacct-daemon read {path} before it last changed: it runs "
                     "with the old settings", "systemctl restart netacct-daemon")
        return
    yield Result(name, Verdict.OK, f"netacct-daemon answers on {sock} and runs {path} as it is now")


def _cluster_nodes(ctx: Context) -> dict[str, str]:
    if ctx.setup.cluster_nodes is not None:
        return dict(ctx.setup.cluster_nodes)
    out = {}
    for name, (addr, _host) in ctx.slurm.nodes.items():
        try:
            ipaddress.IPv4Address(addr)
        except ValueError:
            try:
                addr = socket.getaddrinfo(addr, None, socket.AF_INET)[0][4][0]
            except OSError:
                pass
        out[name] = addr
    return out


def check_routes(ctx: Context) -> Iterator[Result]:
    from . import identity, routes

    name = "routes"
    if ctx.cfg is None:
        yield Result(name, Verdict.SKIP, "the config does not parse")
        return
    if ctx.cfg.engine == "cgroup" or ctx.cfg.mode != "routed":
        yield Result(name, Verdict.SKIP, "routed mode only" if ctx.netns else "the cgroup engine needs no routes")
        return
    nodes = _cluster_nodes(ctx)
    if not nodes:
        yield Result(name, Verdict.FAIL, f"{ctx.slurm.path} lists no nodes", "give them with --cluster-node NAME=ADDR")
        return
    fix = "netacct-routes install (README, step 3)"
    try:
        mine = identity.local_addresses()
        planned = routes.plan(ctx.cfg, nodes, ctx.node if ctx.role == "compute" else None, mine)
        have = dict(routes.installed())
    except NetacctError as exc:
        yield Result(name, Verdict.FAIL, str(exc), "correct [routed.nodes] or the nodes' addresses")
        return
    problems = []
    for r in planned:
        via = have.get(str(r.prefix))
        if via is None:
            problems.append(f"no route to {r.node}'s job prefix {r.prefix} via {r.via}")
        elif via != str(r.via):
            problems.append(f"the route to {r.node}'s job prefix {r.prefix} goes via {via}, not {r.via}")
    own = [str(ctx.cfg.node_pools(n)[0]) for n in nodes if n == ctx.node or identity.is_local(nodes[n], mine)]
    for prefix, via in have.items():
        if prefix in own or identity.is_local(via, mine):
            problems.append(f"a route to this host's own job prefix {prefix} via {via} (it loops)")
    stale = sorted(set(have) - {str(r.prefix) for r in planned} - set(own))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        yield Result(name, Verdict.FAIL, problems[0] + more, fix)
    elif stale:
        yield Result(name, Verdict.WARN, f"routes of netacct-routes to {', '.join(stale)} belong to no node", fix)
    else:
        yield Result(name, Verdict.OK, f"a route to each of the {len(planned)} other nodes' job prefixes, "
                     "none to this host's")


def check_forwarding(ctx: Context) -> Iterator[Result]:
    name = "forwarding"
    if ctx.role != "compute" or not ctx.netns:
        yield Result(name, Verdict.SKIP, "only compute nodes of the netns engine forward jobs' traffic")
        return
    assert ctx.cfg is not None
    off = []
    for version, key in ((4, "net/ipv4/ip_forward"), (6, "net/ipv6/conf/all/forwarding")):
        if version == 6 and ctx.cfg.pool_ipv6 is None:
            continue
        try:
            value = (Path("/proc/sys") / key).read_text().strip()
        except OSError as exc:
            value = f"unreadable ({exc.strerror})"
        if value != "1":
            off.append(f"{key.replace('/', '.')} = {value}")
    if off:
        yield Result(name, Verdict.FAIL, f"{', '.join(off)}: jobs' packets are not forwarded (every prolog turns "
                     "it on: something turned it off since)",
                     "sysctl -w " + " ".join(o.split(" = ")[0] + "=1" for o in off)
                     + ", and find what turns it off (a sysctl.d file, a firewall service)")
        return
    yield Result(name, Verdict.OK, "IPv4" + (" and IPv6" if ctx.cfg.pool_ipv6 else "") + " forwarding on")


def check_uplink(ctx: Context) -> Iterator[Result]:
    from .plan import resolve_uplink

    name = "uplink"
    if ctx.role != "compute" or not ctx.netns:
        yield Result(name, Verdict.SKIP, "only compute nodes of the netns engine masquerade jobs' traffic")
        return
    assert ctx.cfg is not None
    try:
        up = resolve_uplink(ctx.cfg)
    except NetacctError as exc:
        yield Result(name, Verdict.FAIL, f"{exc}: every prolog fails (exit 7)",
                     "set `uplink` in netacct.toml to the interface towards the LAN")
        return
    yield Result(name, Verdict.OK, f"{up} exists" + ("" if ctx.cfg.uplink else " (the default route's)"))


def _root_only(path: Path, kind: str, file_mode: bool) -> str | None:
    """What is wrong with path's owner or mode, or None."""
    st = path.stat()
    bad = st.st_mode & (0o077 if file_mode else 0o022)
    if st.st_uid != 0:
        return f"{kind} {path} belongs to uid {st.st_uid}, not root"
    if bad:
        return f"{kind} {path} has mode {stat.S_IMODE(st.st_mode):04o}: others may " + (
            "read or write it" if file_mode else "replace what is in it")
    return None


def check_store(ctx: Context) -> Iterator[Result]:
    name = "store"
    if ctx.role != "compute":
        yield Result(name, Verdict.SKIP, f"a {ctx.role} host keeps no node database")
        return
    if ctx.cfg is None:
        yield Result(name, Verdict.SKIP, "the config does not parse")
        return
    db = ctx.cfg.db_for(ctx.node)
    spool = ctx.cfg.spool_for(ctx.node)
    problems = []
    seen = []
    for path, kind, is_file in ((db.parent, "database directory", False), (db, "database", True),
                                (spool, "spool directory", False)):
        if not path.exists():
            continue
        seen.append(str(path))
        wrong = _root_only(path, kind, is_file)
        if wrong:
            problems.append(wrong)
    if problems:
        yield Result(name, Verdict.FAIL, problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
                     f"chown root:root and chmod 0700 (directories) / 0600 (the database): {', '.join(seen)}")
        return
    if not seen:
        yield Result(name, Verdict.OK, f"{db.parent} and {spool} do not exist yet (the first prolog makes them, root's)")
        return
    yield Result(name, Verdict.OK, f"{', '.join(seen)}: root's, writable by root only")


CHECKS: list[tuple[tuple[str, ...], Check]] = [
    (("config",), check_config), (("plugstack",), check_plugstack), (("pam",), check_pam),
    (("prolog", "epilog", "prologflags"), check_slurm_conf), (("service",), check_service),
    (("routes",), check_routes), (("forwarding",), check_forwarding), (("uplink",), check_uplink),
    (("store",), check_store),
]
CHECK_NAMES = [n for names, _ in CHECKS for n in names] + ["self-test"]


def run(ctx: Context, only: set[str] | None = None) -> Iterator[Result]:
    """Every check's results, in order (`only`: those checks)."""
    for names, check in CHECKS:
        if only is not None and not only & set(names):
            continue
        try:
            for result in check(ctx):
                if only is None or result.name in only or result.name not in names:
                    yield result
        except Exception as exc:  # noqa: BLE001 - a check that crashes is a FAIL line, not a traceback
            yield Result(names[0], Verdict.FAIL, f"the check itself failed: {type(exc).__name__}: {exc}",
                         "report this as a bug of netacct-doctor")

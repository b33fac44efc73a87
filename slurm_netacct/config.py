"""Reading and validating the TOML configuration (/etc/slurm/netacct.toml)."""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import naming
from .errors import ConfigError

DEFAULT_PATH = Path("/etc/slurm/netacct.toml")
ENV_VAR = "NETACCT_CONFIG"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_CLASSES: dict[str, list[str]] = {
    "lan": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"],
}
_CLASS_RE = re.compile(r"[a-z][a-z0-9_]{0,15}")
FIREWALLS = ("auto", "nftables", "iptables")
COUNTINGS = ("auto", "bpf", "netfilter")
ENGINES = ("netns", "cgroup")
CGROUP_MODES = ("auto", "slurm", "own")
_CGROUP_KEYS = {"mode", "root"}
MAX_CLASSES = 32  # counters a job has: classes (with the default one) in both directions
MODES = ("nat", "routed")
DNS_MODES = ("auto", "off")
_ROUTED_KEYS = {"prefixlen4", "prefixlen6", "nodes"}

_TOP_KEYS = {
    "uplink", "netns_prefix", "ifname_prefix", "db", "default_class", "firewall", "mode",
    "log_file", "netns_dir", "pool", "classes", "routed", "dns", "report", "teardown_failure",
    "spool_dir", "rps_cpus", "counting", "bpffs", "ledger", "engine", "cgroup",
}
TEARDOWN_FAILURE = ("drain", "log")
_RPS_RE = re.compile(r"[0-9a-f]{1,8}(,[0-9a-f]{8}){0,31}")  # the kernel's bitmap format
_REPORT_KEYS = {"private", "admins"}
_POOL_KEYS = {"ipv4", "ipv6", "class"}
_LEDGER_KEYS = {"url", "password_file", "report_url", "report_password_file", "cluster", "batch",
                "interval", "timeout", "tls", "tls_ca", "tls_cert", "tls_key", "sacct_field"}
# The fields of a job's slurmdbd record that sacctmgr can set and sacct shows; SystemComment by
# default (AdminComment holds Princeton jobstats' summary; Comment is the user's sbatch --comment).
SACCT_FIELDS = ("SystemComment", "AdminComment", "Comment")
LEDGER_TLS = ("off", "required", "verify_ca", "verify_identity")
_URL_RE = re.compile(r"mysql://(?P<user>[A-Za-z0-9_.-]{1,80})@(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]{1,253})"
                     r"(?::(?P<port>[0-9]{1,5}))?/(?P<database>[A-Za-z0-9_]{1,64})(?:\?socket=(?P<socket>/[^?#]+))?")
_CLUSTER_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class LedgerURL:
    """Where a ledger is and as whom to log in: mysql://USER@HOST[:PORT]/DATABASE[?socket=PATH]."""

    user: str
    host: str
    port: int
    database: str
    socket: str | None = None

    def __str__(self) -> str:
        tail = f"?socket={self.socket}" if self.socket else ""
        return f"mysql://{self.user}@{self.host}:{self.port}/{self.database}{tail}"


def parse_ledger_url(text: str, key: str) -> LedgerURL:
    """A ledger URL, or ConfigError naming the key (a password in it is refused)."""
    m = _URL_RE.fullmatch(text)
    if m is None:
        if re.match(r"mysql://[^@/]*:[^@/]*@", text):
            raise _err(key, "the URL must not hold a password: put it in the password file")
        raise _err(key, f"{text!r} is not mysql://USER@HOST[:PORT]/DATABASE[?socket=PATH]")
    port = int(m["port"] or 3306)
    if not 1 <= port <= 65535:
        raise _err(key, f"port {port} is out of range")
    return LedgerURL(m["user"], m["host"].strip("[]"), port, m["database"], m["socket"])


@dataclass(frozen=True)
class LedgerConfig:
    """[ledger]: the cluster's central MariaDB, where netacct-ship sends the node's records."""

    url: LedgerURL
    password_file: Path
    cluster: str
    report_url: LedgerURL | None = None  # the read-only account reports use (default: url)
    report_password_file: Path | None = None
    batch: int = 500  # job rows a transaction ships
    interval: int = 60  # seconds between shipping rounds of netacct-daemon's thread
    timeout: int = 30  # seconds to connect, and for each read or write on the connection
    tls: str = "off"  # off, required, verify_ca, verify_identity
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    sacct_field: str = "SystemComment"  # where netacct-sacct writes a job's summary


@dataclass(frozen=True)
class Config:
    """The validated configuration; every field has the documented default."""

    uplink: str | None = None
    netns_prefix: str = "netacct-"
    ifname_prefix: str = "na"
    netns_dir: Path = Path("/run/netns")
    db: Path = Path("/var/lib/slurm-netacct/netacct.db")
    # Where the epilog writes a job's final record when the database cannot be written; it is
    # stored in the database by the next hook, netacct-sample or netacct-reconcile that can.
    spool_dir: Path = Path("/var/spool/slurm-netacct")
    default_class: str = "wan"
    firewall: str = "auto"
    # How a job's traffic is counted: "bpf" (programs on the node's end of the job's link:
    # segments as the wire carries them), "netfilter" (the firewall backend's counters in the
    # job's namespace: offloaded super-packets as one packet), "auto" (bpf where the kernel can).
    counting: str = "auto"
    bpffs: Path = Path("/sys/fs/bpf")  # where BPF counters are pinned (mounted if need be)
    mode: str = "nat"
    # The accounting engine: "netns" (a network namespace and veth per job: the seed's method)
    # or "cgroup" (BPF programs on the job's cgroup2 directory: no network changes at all).
    engine: str = "netns"
    # engine = "cgroup": which cgroup is counted: "slurm" (SLURM's own job_<id>, cgroup/v2),
    # "own" (a cgroup per job under cgroup_root, which the SPANK plugin and the PAM module put
    # the job's processes into: SLURM on cgroup v1), "auto" (slurm if /sys/fs/cgroup is cgroup2).
    cgroup_mode: str = "auto"
    cgroup_root: Path | None = None  # "own": the engine's subtree (default <unified>/slurm-netacct)
    log_file: Path | None = None
    dns: str = "auto"  # redirect DNS to the node's loopback stub resolver, if it has one
    # After the counters are stored, a failed removal: "drain" (epilog fails, SLURM drains the
    # node) or "log" (logged; the reaper removes the rest later; the node keeps working).
    teardown_failure: str = "drain"
    # Receive packet steering for job links: "" (the kernel's default: a packet is processed
    # on the CPU that sent or received it), or a CPU mask in hex ("1", "ff,ffffffff"): best the
    # CPUs SLURM keeps for the system (CpuSpecList). Set, it becomes net.core.rps_default_mask
    # of the node and of every job namespace.
    rps_cpus: str = ""
    report_private: bool = True  # non-admin users see only their own jobs (like PrivateData)
    report_admins: tuple[str, ...] = ()  # user names, or %group, who see every job
    pool_ipv4: ipaddress.IPv4Network = ipaddress.IPv4Network("100.64.0.0/16")
    pool_ipv6: ipaddress.IPv6Network | None = None
    pool_class: str = "lan"  # parse(): "lan" if defined, else the first class listed
    # Ordered: first match wins. Each class -> its prefixes (the pool is added to pool_class).
    classes: dict[str, tuple[IPNetwork, ...]] = field(default_factory=dict)
    # Routed mode: each node's share of the pools, and optional explicit node indices.
    prefixlen4: int = 24
    prefixlen6: int = 64
    node_indices: dict[str, int] = field(default_factory=dict)
    ledger: LedgerConfig | None = None  # [ledger]: shipping to a central database, if set

    def node_index(self, node: str) -> int:
        """The node's slice of the pools: [routed.nodes] if listed, else its trailing digits."""
        if node in self.node_indices:
            return self.node_indices[node]
        m = re.search(r"(\d+)$", node)
        if m is None:
            raise ConfigError(f"config key 'routed.nodes': node {node!r} is not listed and its name "
                              "has no trailing number to derive its job prefix from")
        return int(m.group(1))

    def node_pools(self, node: str) -> tuple[ipaddress.IPv4Network, ipaddress.IPv6Network | None]:
        """The job address pools of one node: the whole pools (nat), or its slice (routed)."""
        if self.mode != "routed":
            return self.pool_ipv4, self.pool_ipv6
        idx = self.node_index(node)
        n4 = 1 << (self.prefixlen4 - self.pool_ipv4.prefixlen)
        if idx >= n4:
            raise ConfigError(f"config key 'routed.prefixlen4': node {node!r} has index {idx}, but "
                              f"{self.pool_ipv4} holds only {n4} /{self.prefixlen4} node prefixes")
        base4 = int(self.pool_ipv4.network_address) + (idx << (32 - self.prefixlen4))
        v4 = ipaddress.IPv4Network((base4, self.prefixlen4))
        v6 = None
        if self.pool_ipv6 is not None:
            n6 = 1 << (self.prefixlen6 - self.pool_ipv6.prefixlen)
            if idx >= n6:
                raise ConfigError(f"config key 'routed.prefixlen6': node {node!r} has index {idx}, "
                                  f"but {self.pool_ipv6} holds only {n6} node prefixes")
            base6 = int(self.pool_ipv6.network_address) + (idx << (128 - self.prefixlen6))
            v6 = ipaddress.IPv6Network((base6, self.prefixlen6))
        return v4, v6

    def routed_prefixes(self) -> list[IPNetwork]:
        """Destinations reached without NAT in routed mode: every non-default class, the pools."""
        out: list[IPNetwork] = []
        for klass, prefix in self.class_prefixes():
            if klass != self.default_class and prefix not in out:
                out.append(prefix)
        return out

    @property
    def class_names(self) -> list[str]:
        """Every class a counter exists for, in match order, the default class last."""
        names = list(self.classes)
        if self.default_class not in names:
            names.append(self.default_class)
        return names

    def db_for(self, node: str) -> Path:
        """The database path, with %n replaced by the node name (as in slurm.conf)."""
        return Path(str(self.db).replace("%n", node))

    def spool_for(self, node: str) -> Path:
        """The spool directory, with %n replaced by the node name."""
        return Path(str(self.spool_dir).replace("%n", node))

    def class_prefixes(self) -> list[tuple[str, IPNetwork]]:
        """(class, prefix) pairs in match order; the pools first, as they are most specific."""
        pairs: list[tuple[str, IPNetwork]] = [(self.pool_class, self.pool_ipv4)]
        if self.pool_ipv6 is not None:
            pairs.append((self.pool_class, self.pool_ipv6))
        for name, prefixes in self.classes.items():
            pairs.extend((name, p) for p in prefixes)
        return pairs


def _one_line(text: str) -> str:
    return text if text.isprintable() else repr(text)[1:-1]


def _err(key: str, msg: str) -> ConfigError:
    return ConfigError(f"config key '{_one_line(key)}': {_one_line(msg)}")


def _str(data: dict[str, Any], key: str, full: str) -> str | None:
    if key not in data:
        return None
    value = data[key]
    if not isinstance(value, str) or value == "":
        raise _err(full, "must be a non-empty string")
    return value


def _network(value: Any, key: str) -> IPNetwork:
    if not isinstance(value, str):
        raise _err(key, f"{value!r} is not a prefix string")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise _err(key, f"{value!r} is not a valid IP prefix ({exc})") from None


_CHOICES = {"firewall": FIREWALLS, "mode": MODES, "teardown_failure": TEARDOWN_FAILURE, "dns": DNS_MODES,
            "counting": COUNTINGS, "engine": ENGINES}
_CLASS_NAME_RULE = "class names are 1-16 of [a-z0-9_], starting with a letter"


def parse(data: dict[str, Any]) -> Config:
    """Validate a decoded TOML document and return the Config; raise ConfigError naming the key."""
    if not isinstance(data, dict):
        raise ConfigError("config: the document must be a table")
    for key in data:
        if key not in _TOP_KEYS:
            raise _err(key, "unknown key")
    kw: dict[str, Any] = {**_names(data), **_choices(data), **_report(_table(data, "report", _REPORT_KEYS)),
                          **_routed(_table(data, "routed", _ROUTED_KEYS)),
                          **_cgroup(_table(data, "cgroup", _CGROUP_KEYS))}
    kw["classes"] = classes = _classes(data.get("classes", DEFAULT_CLASSES))
    default_class = _str(data, "default_class", "default_class")
    if default_class is not None:
        if not _CLASS_RE.fullmatch(default_class):
            raise _err("default_class", _CLASS_NAME_RULE)
        kw["default_class"] = default_class
    kw.update(_pool(_table(data, "pool", _POOL_KEYS), classes, kw.get("default_class", "wan")))
    if "ledger" in data:
        kw["ledger"] = _ledger(_table(data, "ledger", _LEDGER_KEYS))
    cfg = Config(**kw)
    _check(cfg)
    return cfg


def _table(data: dict[str, Any], name: str, keys: set[str]) -> dict[str, Any]:
    """A sub-table ({} if absent), its keys checked."""
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise _err(name, "must be a table")
    for key in table:
        if key not in keys:
            raise _err(f"{name}.{key}", "unknown key")
    return table


def _names(data: dict[str, Any]) -> dict[str, Any]:
    """The uplink, the name prefixes, the paths and rps_cpus."""
    kw: dict[str, Any] = {}
    uplink = _str(data, "uplink", "uplink")
    if uplink is not None:
        if len(uplink) >= naming.IFNAMSIZ or "/" in uplink or uplink.strip() != uplink:
            raise _err("uplink", f"{uplink!r} is not a valid interface name")
        kw["uplink"] = uplink
    prefix = _str(data, "netns_prefix", "netns_prefix")
    if prefix is not None:
        if not naming.valid_netns_prefix(prefix):
            raise _err("netns_prefix", f"{prefix!r} may only hold letters, digits, '.', '_', '-' "
                       f"(and %h), at most {naming.MAX_PREFIX_LEN} characters")
        kw["netns_prefix"] = prefix
    ifprefix = _str(data, "ifname_prefix", "ifname_prefix")
    if ifprefix is not None:
        if not naming.valid_ifname_prefix(ifprefix):
            raise _err("ifname_prefix", f"{ifprefix!r} must be 1-4 lowercase letters/digits, starting with a letter")
        kw["ifname_prefix"] = ifprefix
    for key in ("db", "log_file", "netns_dir", "spool_dir", "bpffs"):
        value = _str(data, key, key)
        if value is not None:
            if not value.startswith("/"):
                raise _err(key, f"{value!r} must be an absolute path")
            kw[key] = Path(value)
    rps = data.get("rps_cpus")
    if rps is not None:
        if not isinstance(rps, str):
            raise _err("rps_cpus", "must be a string")
        if rps and (not _RPS_RE.fullmatch(rps) or not int(rps.replace(",", ""), 16)):
            raise _err("rps_cpus", f"{rps!r} is not a non-zero CPU mask in hex (e.g. \"1\" for CPU 0), or \"\"")
        kw["rps_cpus"] = rps
    return kw


def _choices(data: dict[str, Any]) -> dict[str, Any]:
    """The keys that take one of a few words."""
    kw: dict[str, Any] = {}
    for key, allowed in _CHOICES.items():
        value = _str(data, key, key)
        if value is not None:
            if value not in allowed:
                raise _err(key, f"{value!r} is not one of {', '.join(allowed)}")
            kw[key] = value
    return kw


def _report(rep: dict[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if "private" in rep:
        if not isinstance(rep["private"], bool):
            raise _err("report.private", "must be true or false")
        kw["report_private"] = rep["private"]
    if "admins" in rep:
        admins = rep["admins"]
        if not isinstance(admins, list) or not all(isinstance(a, str) and a for a in admins):
            raise _err("report.admins", "must be a list of user names or %groups")
        kw["report_admins"] = tuple(admins)
    return kw


def _ledger(led: dict[str, Any]) -> LedgerConfig:
    for key in ("url", "password_file", "cluster"):
        if key not in led:
            raise _err(f"ledger.{key}", "is required in [ledger]")
    kw: dict[str, Any] = {"url": parse_ledger_url(_str(led, "url", "ledger.url") or "", "ledger.url")}
    cluster = _str(led, "cluster", "ledger.cluster") or ""
    if not _CLUSTER_RE.fullmatch(cluster):
        raise _err("ledger.cluster", f"{cluster!r} is not a SLURM ClusterName (letters, digits, '_', '.', '-')")
    kw["cluster"] = cluster
    if "report_url" in led:
        kw["report_url"] = parse_ledger_url(_str(led, "report_url", "ledger.report_url") or "", "ledger.report_url")
    for key in ("password_file", "report_password_file", "tls_ca", "tls_cert", "tls_key"):
        value = _str(led, key, f"ledger.{key}")
        if value is not None:
            if not value.startswith("/"):
                raise _err(f"ledger.{key}", f"{value!r} must be an absolute path")
            kw[key] = Path(value)
    for key, lo, hi in (("batch", 1, 100_000), ("interval", 1, 86_400), ("timeout", 1, 3_600)):
        if key in led:
            v = led[key]
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise _err(f"ledger.{key}", f"must be an integer from {lo} to {hi}")
            kw[key] = v
    tls = _str(led, "tls", "ledger.tls")
    if tls is not None:
        if tls not in LEDGER_TLS:
            raise _err("ledger.tls", f"{tls!r} is not one of {', '.join(LEDGER_TLS)}")
        kw["tls"] = tls
    field_ = _str(led, "sacct_field", "ledger.sacct_field")
    if field_ is not None:
        if field_ not in SACCT_FIELDS:
            raise _err("ledger.sacct_field", f"{field_!r} is not one of {', '.join(SACCT_FIELDS)}")
        kw["sacct_field"] = field_
    if kw.get("tls", "off") in ("verify_ca", "verify_identity") and "tls_ca" not in kw:
        raise _err("ledger.tls_ca", f"tls = {kw['tls']!r} needs the CA certificate (tls_ca)")
    if ("tls_cert" in kw) != ("tls_key" in kw):
        raise _err("ledger.tls_key", "tls_cert and tls_key go together")
    return LedgerConfig(**kw)


def _cgroup(table: dict[str, Any]) -> dict[str, Any]:
    """[cgroup]: which cgroup the cgroup engine counts, and where its own ones live."""
    kw: dict[str, Any] = {}
    mode = _str(table, "mode", "cgroup.mode")
    if mode is not None:
        if mode not in CGROUP_MODES:
            raise _err("cgroup.mode", f"{mode!r} is not one of {', '.join(CGROUP_MODES)}")
        kw["cgroup_mode"] = mode
    root = _str(table, "root", "cgroup.root")
    if root is not None:
        if not root.startswith("/") or "/../" in f"{root}/" or "/./" in f"{root}/":
            raise _err("cgroup.root", f"{root!r} must be an absolute path without . or .. components")
        kw["cgroup_root"] = Path(root)
    return kw


def _routed(routed: dict[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    for key, lo, hi in (("prefixlen4", 8, 30), ("prefixlen6", 16, 120)):
        if key in routed:
            v = routed[key]
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise _err(f"routed.{key}", f"must be an integer from {lo} to {hi}")
            kw[key] = v
    nodes = routed.get("nodes", {})
    if not isinstance(nodes, dict):
        raise _err("routed.nodes", "must be a table of node name = index")
    for name, idx in nodes.items():
        if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
            raise _err(f"routed.nodes.{name}", "must be a non-negative integer")
    if len(set(nodes.values())) != len(nodes):
        raise _err("routed.nodes", "two nodes have the same index")
    kw["node_indices"] = dict(nodes)
    return kw


def _classes(raw: Any) -> dict[str, tuple[IPNetwork, ...]]:
    if not isinstance(raw, dict):
        raise _err("classes", "must be a table of class = [prefixes]")
    classes: dict[str, tuple[IPNetwork, ...]] = {}
    for name, prefixes in raw.items():
        key = f"classes.{name}"
        if not _CLASS_RE.fullmatch(name):
            raise _err(key, _CLASS_NAME_RULE)
        if not isinstance(prefixes, list):
            raise _err(key, "must be a list of prefixes")
        classes[name] = tuple(_network(p, key) for p in prefixes)
    return classes


def _pool(pool: dict[str, Any], classes: dict[str, Any], default_class: str) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    for key, version in (("ipv4", 4), ("ipv6", 6)):
        if key in pool:
            net = _network(pool[key], f"pool.{key}")
            if net.version != version:
                raise _err(f"pool.{key}", f"{net} is not an IPv{version} prefix")
            kw[f"pool_{key}"] = net
    if "class" in pool:
        kw["pool_class"] = _str(pool, "class", "pool.class")
    elif "lan" not in classes:
        kw["pool_class"] = next(iter(classes), default_class)
    return kw


def _check(cfg: Config) -> None:
    """Cross-key checks: pool sizes, pool overlap with other classes, the pool's class."""
    if cfg.pool_class not in cfg.class_names:
        raise _err("pool.class", f"{cfg.pool_class!r} is neither a class nor the default class")
    if len(cfg.class_names) > MAX_CLASSES:
        raise _err("classes", f"{len(cfg.class_names)} classes (the default one included): at most {MAX_CLASSES}")
    if cfg.engine == "cgroup" and cfg.counting == "netfilter":
        raise _err("counting", "the cgroup engine counts with BPF only: \"netfilter\" needs engine = \"netns\"")
    if cfg.pool_ipv4.prefixlen > 30:
        raise _err("pool.ipv4", f"{cfg.pool_ipv4} is too small: it needs a gateway and at least one job")
    if cfg.mode == "routed":
        if cfg.prefixlen4 < cfg.pool_ipv4.prefixlen:
            raise _err("routed.prefixlen4", f"/{cfg.prefixlen4} is larger than pool.ipv4 {cfg.pool_ipv4}")
        if cfg.pool_ipv6 is not None and cfg.prefixlen6 < cfg.pool_ipv6.prefixlen:
            raise _err("routed.prefixlen6", f"/{cfg.prefixlen6} is larger than pool.ipv6 {cfg.pool_ipv6}")
    if cfg.pool_ipv6 is not None:
        if cfg.pool_ipv6.prefixlen > 120:
            raise _err("pool.ipv6", f"{cfg.pool_ipv6} is too small (at most /120)")
        if cfg.pool_ipv6.is_link_local or cfg.pool_ipv6.is_multicast:
            raise _err("pool.ipv6", f"{cfg.pool_ipv6} must be a routable prefix")
    if cfg.pool_ipv4.is_loopback or cfg.pool_ipv4.is_multicast or cfg.pool_ipv4.is_link_local:
        raise _err("pool.ipv4", f"{cfg.pool_ipv4} must be a routable prefix")
    pools: list[tuple[str, IPNetwork]] = [("pool.ipv4", cfg.pool_ipv4)]
    if cfg.pool_ipv6 is not None:
        pools.append(("pool.ipv6", cfg.pool_ipv6))
    for key, pool in pools:
        for name, prefixes in cfg.classes.items():
            if name == cfg.pool_class:
                continue
            for p in prefixes:
                if p.version == pool.version and p.overlaps(pool):
                    raise _err(key, f"{pool} overlaps {p} of class '{name}'; job addresses must be class '{cfg.pool_class}'")


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load the configuration from path, $NETACCT_CONFIG, or /etc/slurm/netacct.toml.

    A missing default file means all defaults; a missing explicitly named file is an error.
    """
    explicit = path is not None or bool(os.environ.get(ENV_VAR))
    p = Path(path if path is not None else os.environ.get(ENV_VAR) or DEFAULT_PATH)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {p} does not exist") from None
        return parse({})
    except OSError as exc:
        raise ConfigError(f"config file {p}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {p}: not valid TOML ({exc})") from None
    try:
        return parse(data)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None

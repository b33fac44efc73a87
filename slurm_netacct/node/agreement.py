"""Do the SPANK plugin and the PAM module look for job namespaces (or, with the cgroup engine,
programs and cgroups) where the prolog makes them?

The same `netns_dir` and prefix (and `engine`, `bpffs`, `[cgroup]`) are configured three times:
in netacct.toml (the prolog's), in plugstack.conf (the plugin's `netns_dir=`, `prefix=`,
`engine=`, `bpffs=`, `cgroup=`, `cgroup_root=`) and in sshd's PAM stack (the module's). If they
differ, every task fails to find what its job's prolog made. This reads the other two and says
where they disagree; the service and netacct-reconcile log it at start.
"""

from __future__ import annotations

import glob
import os
import shlex
from pathlib import Path

from ..config import Config
from ..errors import SetupError

DEFAULT_PLUGSTACK = Path("/etc/slurm/plugstack.conf")
DEFAULT_PAM = Path("/etc/pam.d/sshd")
PLUGIN, PAM_MODULE = "netacct.so", "pam_netacct.so"
C_DEFAULTS = {"netns_dir": "/run/netns", "prefix": "netacct-", "engine": "netns",  # spank/netacct-path.h's
              "bpffs": "/sys/fs/bpf", "cgroup": "auto"}
CONFIG_KEYS = {"netns_dir": "netns_dir", "prefix": "netns_prefix", "engine": "engine", "bpffs": "bpffs",
               "cgroup": "cgroup.mode", "cgroup_root": "cgroup.root"}
DIRS = ("netns_dir", "bpffs", "cgroup_root")


def plugstack_path(env: dict[str, str] | None = None) -> Path:
    """plugstack.conf as slurmd finds it: slurm.conf's PlugStackConfig, else beside slurm.conf."""
    env = dict(os.environ) if env is None else env
    conf = Path(env.get("SLURM_CONF") or "/etc/slurm/slurm.conf")
    try:
        for line in conf.read_text(errors="replace").splitlines():
            key, sep, value = line.split("#", 1)[0].strip().partition("=")
            if sep and key.strip().lower() == "plugstackconfig":
                return Path(value.strip())
    except OSError:
        pass
    return conf.parent / "plugstack.conf"


def _lines(path: Path, seen: set[Path]) -> list[tuple[Path, list[str]]]:
    """plugstack.conf's lines as words, `include` followed (globs, once each)."""
    if path in seen:
        return []
    seen.add(path)
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    out: list[tuple[Path, list[str]]] = []
    for line in text.splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        if words[:1] == ["include"] and len(words) > 1:
            for inc in sorted(glob.glob(words[1])):
                out += _lines(Path(inc), seen)
        elif words:
            out.append((path, words))
    return out


def _args(words: list[str]) -> dict[str, str]:
    return dict(w.split("=", 1) for w in words if "=" in w)


def plugin_lines(plugstack: Path) -> list[tuple[Path, dict[str, str]]]:
    """(file, arguments) of every line that loads the netacct SPANK plugin."""
    return [(p, _args(w[2:])) for p, w in _lines(plugstack, set())
            if len(w) >= 2 and w[0] in ("required", "optional") and Path(w[1]).name == PLUGIN]


def pam_lines(pam: Path) -> list[tuple[Path, dict[str, str]]]:
    """(file, arguments) of every line of a PAM stack that uses pam_netacct.so."""
    out = []
    for p, w in _lines(pam, set()):
        for i, word in enumerate(w):
            if Path(word).name == PAM_MODULE:
                out.append((p, _args(w[i + 1:])))
    return out


def _wanted(cfg: Config) -> dict[str, str]:
    """The arguments the plugin and the module must have for this configuration (C spelling)."""
    if cfg.engine != "cgroup":
        return {"engine": cfg.engine, "netns_dir": str(cfg.netns_dir), "prefix": cfg.netns_prefix}
    want = {"engine": cfg.engine, "prefix": cfg.netns_prefix, "bpffs": str(cfg.bpffs), "cgroup": cfg.cgroup_mode}
    from ..counting import cgroup as cgroup_counting

    try:
        want["cgroup_root"] = str(cgroup_counting.root(cfg))
    except SetupError:  # no cgroup v2 here: the prolog says so
        pass
    return want


def _c_default(key: str) -> str | None:
    """What the C side uses for an argument not given (cgroup_root: derived as the config's is)."""
    if key == "cgroup_root":
        from ..counting import cgroup as cgroup_counting
        from ..config import parse

        try:
            return str(cgroup_counting.root(parse({"engine": "cgroup"})))
        except SetupError:
            return None
    return C_DEFAULTS[key]


def differences(cfg: Config, what: str, lines: list[tuple[Path, dict[str, str]]]) -> list[str]:
    """One line for each argument of `lines` (what: "SPANK plugin", "PAM module") that differs
    from the configuration's."""
    want = {k: (v.rstrip("/") or "/") if k in DIRS else v for k, v in _wanted(cfg).items()}
    lost = "namespaces" if cfg.engine != "cgroup" else "counting programs or cgroups"
    out = []
    for path, args in lines:
        for key, value in want.items():
            theirs = args.get(key, _c_default(key))
            if theirs is not None and key in DIRS:
                theirs = theirs.rstrip("/") or "/"
            if theirs != value:
                out.append(f"{path}: the {what}'s {key}={theirs} differs from the config's {value} "
                           f"({CONFIG_KEYS[key]}): its jobs' {lost} will not be found")
    return out


def wanted_arguments(cfg: Config) -> str:
    """The plugstack.conf / PAM arguments this configuration needs, as they are written."""
    return " ".join(f"{k}={v}" for k, v in _wanted(cfg).items())


def disagreements(cfg: Config, plugstack: Path | None = None, pam: Path | None = None) -> list[str]:
    """One line for each place whose arguments differ from the configuration's."""
    return (differences(cfg, "SPANK plugin", plugin_lines(plugstack or plugstack_path()))
            + differences(cfg, "PAM module", pam_lines(pam or DEFAULT_PAM)))

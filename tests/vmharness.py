"""VM test harness: whole Debian systems (systemd PID 1, pure cgroup v2) booted in qemu, one scenario each.

Why: the machine the other tests run on has hybrid cgroups, no systemd as PID 1 and one SLURM
release. A VM gives SLURM's ``cgroup/v2`` under systemd, other Debian (and so SLURM) releases,
and a pristine system to install a package on.

How, in three parts:

- **Images** (``ensure_image``): ``debootstrap`` of a Debian release from the mirror this
  machine's apt uses, then, in a chroot, ``apt-get install`` of a node's packages (the
  ``apt_pkgs`` list of ``scripts/bootstrap``, read from that file, plus what a booting VM needs)
  and a wheelhouse of the project's Python dependencies built from PyPI (``pip wheel``), since
  the VM has no network. The image is cached per machine under ``CACHE_ROOT/<release>-<hash of
  the recipe>/`` (an ext4 disk image, its kernel and initrd, ``recipe.json``, ``build.json``
  with the build's time and size), built in a temporary directory renamed into place, under a
  lock, and rebuilt only when the recipe changes. The code under test is never in the image.
- **A run** (``run_scenario``): a copy-on-write overlay of the cached disk (qcow2 backed by it,
  in a temporary directory), an input disk that is a tar archive (the project's files as the
  work tree holds them, under ``src/``, ``scenario.json``, and ``debs/`` for packages to
  install), and an empty results disk. qemu boots it with software emulation (TCG; KVM stalls on
  this machine) and no network device, ``-kernel``/``-initrd`` from the image.
- **In the VM**: the image's oneshot unit ``netacct-vm-run.service`` (after multi-user.target)
  unpacks the input disk, runs the program it names as its ``entry`` (``src/tests/vm/guest.py``,
  the scenarios), writes the results directory (``result.json`` and logs) as a tar archive onto
  the results disk and powers off; it prints ``NETACCT-VM:`` markers on the serial console. The
  host reads the results disk back with tar after qemu exits, kills qemu by its PID on timeout,
  and removes its temporary files in every case.

For a package scenario (a pristine install of the project's .deb): ``Recipe.for_release(release,
node=False, download_only=[the .deb's dependencies])`` makes an image without the node's
packages whose apt cache holds those dependencies, and ``run_scenario(..., debs=[path],
entry=...)`` puts the .deb on the input disk; such an image has no python3, so its entry is a
shell script.

Nothing is created in the host's network namespace (``-nic none``), no loop device is used
(tar archives on raw disks instead of mounted file systems), and the chroot's mounts live in a
mount namespace of their own (with its own PID namespace), so they vanish with it.

Standard library only; must run as root.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

__all__ = [
    "CACHE_ROOT",
    "RELEASES",
    "VMError",
    "Recipe",
    "Image",
    "VMResult",
    "ensure_image",
    "run_scenario",
    "node_packages",
    "python_requirements",
    "host_mirrors",
]

ROOT = Path(__file__).resolve().parents[1]
# Per machine, outside any clone: CI and every work tree share it. NETACCT_VM_CACHE moves it.
CACHE_ROOT = Path(os.environ.get("NETACCT_VM_CACHE", "/var/cache/slurm-netacct-vm"))
# A cache entry not used for this long is removed when another image is built.
PRUNE_DAYS = 14
# Bump when the build procedure changes in a way the recipe's other fields do not show.
RECIPE_VERSION = 1
SYS_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Debian release -> the SLURM release it carries (what a scenario on it tests).
RELEASES = {"bookworm": "22.05", "trixie": "24.11"}

# What a booting, testable VM needs beyond a node's packages (scripts/bootstrap's apt_pkgs).
# dbus: SLURM's cgroup/v2 asks systemd over D-Bus for slurmstepd's scope.
VM_PACKAGES = (
    "systemd-sysv", "udev", "kmod", "linux-image-amd64", "initramfs-tools", "dbus",
    "ca-certificates", "libpam-modules", "tar", "procps", "less",
)
# Where the image keeps the wheels of the project's Python dependencies (pip --find-links).
WHEELHOUSE = "/opt/netacct-vm/wheels"

# The image's scenario runner and its unit: the only scenario logic baked into the image.
RUNNER = r"""#!/bin/sh
# netacct-vm-run: baked into the VM image by slurm-netacct's tests/vmharness.py.
# Input: /dev/vdb, a tar archive: src/ (the project's files), scenario.json, debs/, and
#   entry: the program to run, relative to the archive (e.g. src/tests/vm/guest.py), run as
#   ENTRY IN OUT within guest-timeout seconds.
# Output: /dev/vdc, a tar archive of $out (result.json and logs), read by the host after poweroff.
# On the root file system: the initramfs mounts /run noexec, and the entry is executed.
in=/var/lib/netacct-vm/in
out=/var/lib/netacct-vm/out
mkdir -p "$in" "$out"
echo "NETACCT-VM: runner started"
if tar -xf /dev/vdb -C "$in" && [ -s "$in/entry" ]; then
    limit=$(cat "$in/guest-timeout" 2>/dev/null || echo 600)
    timeout -k 10 "$limit" "$in/$(cat "$in/entry")" "$in" "$out" >"$out/guest.log" 2>&1
    echo $? >"$out/exit-status"
else
    echo "netacct-vm-run: cannot read the input disk /dev/vdb, or it names no entry" >"$out/guest.log"
    echo 125 >"$out/exit-status"
fi
echo "NETACCT-VM: scenario exited $(cat "$out/exit-status")"
journalctl -b --no-pager -o short-monotonic >"$out/journal.txt" 2>&1
if tar -cf /dev/vdc -C "$out" . && sync; then
    echo "NETACCT-VM: results written"
else
    echo "NETACCT-VM: cannot write the results disk /dev/vdc"
fi
systemctl poweroff --no-block
"""

RUNNER_UNIT = """# Baked into the VM image by slurm-netacct's tests/vmharness.py: one scenario, then poweroff.
[Unit]
Description=slurm-netacct VM test scenario
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/netacct-vm-run
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
"""

# Units that only cost boot time in an emulated, network-less test VM.
MASKED_UNITS = (
    "apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "e2scrub_reap.service",
    "man-db.timer", "fstrim.timer", "getty@tty1.service", "systemd-timesyncd.service",
)

# Enabled by their packages, started by the scenario once it has configured them: at boot
# they would only fail or, slurmd 24.11 (configless), wait for a controller before the runner.
DISABLED_UNITS = ("slurmd.service", "slurmctld.service")

# The VM is compute node n1 (a name ending in its index, as routed mode wants) at 10.77.1.2.
HOSTNAME = "n1"


class VMError(RuntimeError):
    """An image could not be built, or a VM could not be run or gave no result."""


def _run(argv: Sequence[str | Path], log: Callable[[str], None] | None = None, **kw: object) -> str:
    """Run a command; raise VMError with the tail of its output when it fails."""
    argv = [str(a) for a in argv]
    if log:
        log("$ " + shlex.join(argv)[:300])
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)  # type: ignore[call-overload]
    if r.returncode != 0:
        raise VMError(f"{shlex.join(argv)[:300]} exited {r.returncode}:\n{r.stdout[-4000:]}")
    return str(r.stdout)


# ---------------------------------------------------------------------- the recipe


def node_packages(root: Path = ROOT) -> tuple[str, ...]:
    """The Debian packages of a node: the ``apt_pkgs=( ... )`` list of ``scripts/bootstrap``."""
    text = (root / "scripts" / "bootstrap").read_text()
    m = re.search(r"^apt_pkgs=\((.*?)\)", text, re.M | re.S)
    if not m:
        raise VMError("scripts/bootstrap has no apt_pkgs=( ... ) list")
    words = [w for line in m.group(1).splitlines() for w in line.split("#", 1)[0].split()]
    return tuple(words)


def python_requirements(root: Path = ROOT) -> tuple[str, ...]:
    """What ``scripts/bootstrap`` pip-installs (the project with its test extra) needs, plus the
    build tools pip needs offline: the wheelhouse's contents."""
    project = tomllib.loads((root / "pyproject.toml").read_text())
    reqs = list(project["project"]["dependencies"])
    reqs += project["project"].get("optional-dependencies", {}).get("test", [])
    reqs += project["build-system"]["requires"]
    return tuple([*reqs, "pip", "wheel"])


def _deb822(text: str) -> list[dict[str, str]]:
    stanzas = []
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith("#") or ":" not in line or line[0].isspace():
                continue
            k, v = line.split(":", 1)
            fields[k.strip().lower()] = v.strip()
        if fields:
            stanzas.append(fields)
    return stanzas


def host_mirrors() -> tuple[str, str]:
    """(Debian mirror, security mirror) as this machine's apt sources name them."""
    sources: list[tuple[str, str]] = []  # (uri, suite)
    d = Path("/etc/apt")
    for f in sorted((d / "sources.list.d").glob("*.sources")):
        for s in _deb822(f.read_text()):
            if s.get("enabled", "yes") == "no" or "deb" not in s.get("types", "").split():
                continue
            sources += [(uri, suite) for uri in s.get("uris", "").split() for suite in s.get("suites", "").split()]
    for f in [d / "sources.list", *sorted((d / "sources.list.d").glob("*.list"))]:
        if f.is_file():
            for line in f.read_text().splitlines():
                m = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
                if m:
                    sources.append((m.group(1), m.group(2)))
    codenames = ("bookworm", "trixie", "bullseye", "forky", "sid")
    main = [u for u, s in sources if s in codenames]
    security = [u for u, s in sources if s.endswith("-security")]
    if not main:
        raise VMError("no Debian mirror in /etc/apt/sources.list{,.d}: the VM images are built from it")
    sec = security[0] if security else main[0].rstrip("/").rsplit("/", 1)[0] + "/debian-security"
    return main[0].rstrip("/"), sec.rstrip("/")


@dataclass(frozen=True)
class Recipe:
    """Everything an image is made of; its hash names the cache entry.

    ``download_only`` packages are fetched into the image's apt cache but not installed, so that
    a pristine image can install a .deb with those dependencies offline (``apt-get install
    ./x.deb``); ``node=False`` leaves the node's packages out (a pristine system).
    """

    release: str
    mirror: str
    security_mirror: str
    packages: tuple[str, ...]
    python_requirements: tuple[str, ...]
    download_only: tuple[str, ...] = ()
    version: int = RECIPE_VERSION
    runner: str = RUNNER
    runner_unit: str = RUNNER_UNIT
    masked_units: tuple[str, ...] = MASKED_UNITS
    disabled_units: tuple[str, ...] = DISABLED_UNITS
    hostname: str = HOSTNAME

    @classmethod
    def for_release(cls, release: str, root: Path = ROOT, *, node: bool = True,
                    download_only: Iterable[str] = ()) -> Recipe:
        """The recipe of a node on ``release`` (bookworm, trixie), from this work tree's files."""
        if release not in RELEASES:
            raise VMError(f"unknown release {release!r} (known: {', '.join(RELEASES)})")
        mirror, security = host_mirrors()
        pkgs = sorted(set(VM_PACKAGES) | (set(node_packages(root)) if node else set()))
        return cls(release, mirror, security, tuple(pkgs),
                   python_requirements(root) if node else (), tuple(sorted(download_only)))

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    @property
    def key(self) -> str:
        """The cache entry's name: ``<release>-<hash>``."""
        return f"{self.release}-{self.digest}"


@dataclass
class Image:
    """A built, cached image: the disk (raw ext4, never written to), kernel, initrd, build facts."""

    dir: Path
    disk: Path
    kernel: Path
    initrd: Path
    build: dict[str, object]


# ---------------------------------------------------------------------- building images


def _image_at(d: Path) -> Image | None:
    try:
        build = json.loads((d / "build.json").read_text())
    except (OSError, ValueError):
        return None
    return Image(d, d / "disk.img", d / "vmlinuz", d / "initrd.img", build)


def ensure_image(recipe: Recipe, log: Callable[[str], None] = lambda s: None) -> Image:
    """The cached image of ``recipe``, built first if the cache has none (minutes)."""
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    final = CACHE_ROOT / recipe.key
    img = _image_at(final)
    if img is None:
        # One build per key; others wait, then reuse it. The lock file stays (removing it would
        # let a later process lock a new file while an earlier one still holds the old).
        with open(CACHE_ROOT / f".lock-{recipe.key}", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            img = _image_at(final)
            if img is None:
                for stale in CACHE_ROOT.glob(f".build-{recipe.key}-*"):  # an interrupted build's
                    shutil.rmtree(stale, ignore_errors=True)
                _build(recipe, final, log)
                img = _image_at(final)
                _prune(log)
    if img is None:
        raise VMError(f"{final} has no usable image after a build")
    (final / "last-used").touch()
    return img


def _prune(log: Callable[[str], None]) -> None:
    """Remove cache entries (old recipes) that no run has used for PRUNE_DAYS days."""
    limit = time.time() - PRUNE_DAYS * 86400
    for d in CACHE_ROOT.iterdir():
        stamp = d / "last-used"
        if d.name.startswith(".") or not d.is_dir() or not stamp.exists() or stamp.stat().st_mtime > limit:
            continue
        log(f"removing {d}: unused for {PRUNE_DAYS} days")
        subprocess.run(["rm", "-rf", "--one-file-system", str(d)], check=False)


PROVISION = r"""set -eu
export DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 PATH={path}
apt-get update -q
apt-get install -y -q --no-install-recommends {packages}
{download_only}
if [ -n "{requirements}" ]; then
    python3 -m venv /tmp/wheel-venv
    PIP_CERT=/tmp/host-ca.crt /tmp/wheel-venv/bin/pip install -q --upgrade pip
    PIP_CERT=/tmp/host-ca.crt /tmp/wheel-venv/bin/pip wheel -q -w {wheelhouse} {requirements}
    rm -rf /tmp/wheel-venv
fi
{clean}
"""


def _build(recipe: Recipe, final: Path, log: Callable[[str], None]) -> None:
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{recipe.key}-", dir=CACHE_ROOT))
    try:
        root = tmp / "root"
        log(f"building VM image {recipe.key} in {tmp}")
        _run(["debootstrap", "--variant=minbase", "--include=systemd-sysv,udev,kmod", recipe.release, root,
              recipe.mirror], log, env={"PATH": SYS_PATH, "LANG": "C.UTF-8"})
        t_debootstrap = time.monotonic() - t0
        (root / "etc/apt/sources.list").write_text(
            f"deb {recipe.mirror} {recipe.release} main\n"
            f"deb {recipe.mirror} {recipe.release}-updates main\n"
            f"deb {recipe.security_mirror} {recipe.release}-security main\n")
        # Installing packages must start no service: Debian's policy-rc.d hook (exit 101).
        policy = root / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
        # The machine's CA bundle: its way to PyPI may need a CA that Debian's bundle lacks.
        shutil.copy("/etc/ssl/certs/ca-certificates.crt", root / "tmp/host-ca.crt")
        dl = ""
        if recipe.download_only:
            dl = "apt-get install -y -q --no-install-recommends --download-only " + shlex.join(recipe.download_only)
        clean = "apt-get clean\nrm -rf /var/lib/apt/lists/*" if not recipe.download_only else ""
        script = PROVISION.format(path=SYS_PATH, packages=shlex.join(recipe.packages), download_only=dl,
                                  requirements=" ".join(shlex.quote(r) for r in recipe.python_requirements),
                                  wheelhouse=WHEELHOUSE, clean=clean)
        (root / "tmp/provision.sh").write_text(script)
        # The chroot's /proc, /sys and /dev exist only in a mount namespace of their own; its
        # own PID namespace ends any process a maintainer script leaves running.
        r = shlex.quote(str(root))
        _run(["unshare", "--mount", "--pid", "--fork", "--propagation", "private", "sh", "-ec",
              f"mount -t proc proc {r}/proc && mount -t sysfs sysfs {r}/sys && mount --bind /dev {r}/dev && "
              f"exec chroot {r} /bin/sh /tmp/provision.sh"],
             log, env={"PATH": SYS_PATH, "LANG": "C.UTF-8", "HOME": "/root"})
        t_provision = time.monotonic() - t0
        for f in ("tmp/provision.sh", "tmp/host-ca.crt", "usr/sbin/policy-rc.d"):
            (root / f).unlink()
        _configure(recipe, root)
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        initrds = sorted((root / "boot").glob("initrd.img-*"))
        if not kernels or not initrds:
            raise VMError(f"no kernel or initrd in {root}/boot")
        shutil.copy(kernels[-1], tmp / "vmlinuz")
        shutil.copy(initrds[-1], tmp / "initrd.img")
        used = int(_run(["du", "-sxb", root]).split()[0])
        size_mib = max(4096, 2 * used // 2**20)
        _run(["mkfs.ext4", "-q", "-F", "-L", "netacct-vm", "-d", root, tmp / "disk.img", f"{size_mib}M"], log)
        (tmp / "disk.img").chmod(0o444)
        shutil.rmtree(root)
        info = {
            "key": recipe.key,
            "release": recipe.release,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.monotonic() - t0, 1),
            "seconds_debootstrap": round(t_debootstrap, 1),
            "seconds_packages": round(t_provision - t_debootstrap, 1),
            "root_bytes": used,
            "disk_bytes_allocated": (tmp / "disk.img").stat().st_blocks * 512,
            "kernel": kernels[-1].name,
        }
        (tmp / "recipe.json").write_text(json.dumps(asdict(recipe), indent=1) + "\n")
        (tmp / "build.json").write_text(json.dumps(info, indent=1) + "\n")
        os.rename(tmp, final)  # atomic: the entry is complete or absent
        log(f"built {final} in {info['seconds']} s")
    finally:
        if tmp.exists():
            # --one-file-system: never follow into a mount (there is none outside the build's
            # own mount namespace, but a removal must not be the thing that finds out).
            subprocess.run(["rm", "-rf", "--one-file-system", str(tmp)], check=False)


def _configure(recipe: Recipe, root: Path) -> None:
    """Files every VM of the image needs: identity, the scenario runner, quiet boot."""
    (root / "etc/hostname").write_text(f"{recipe.hostname}\n")
    (root / "etc/hosts").write_text(f"127.0.0.1 localhost\n10.77.1.2 {recipe.hostname}\n")
    (root / "etc/fstab").write_text("/dev/vda / ext4 defaults 0 1\n")
    # No network in the VM: no nameserver (the prolog's dns = "auto" then has nothing to redirect).
    (root / "etc/resolv.conf").write_text("# no network in the slurm-netacct test VM\n")
    runner = root / "usr/local/sbin/netacct-vm-run"
    runner.write_text(recipe.runner)
    runner.chmod(0o755)
    units = root / "etc/systemd/system"
    (units / "netacct-vm-run.service").write_text(recipe.runner_unit)
    wants = units / "multi-user.target.wants"
    wants.mkdir(exist_ok=True)
    (wants / "netacct-vm-run.service").symlink_to("/etc/systemd/system/netacct-vm-run.service")
    for unit in recipe.disabled_units:
        for link in units.glob(f"*.wants/{unit}"):
            link.unlink()
    for unit in recipe.masked_units:
        p = units / unit
        if not p.exists() and not p.is_symlink():
            p.symlink_to("/dev/null")


# ---------------------------------------------------------------------- running a scenario


@dataclass
class VMResult:
    """What one run brought back: ``result`` (result.json), every file of the results disk
    (``files``, text), the serial console, and host-side times (seconds since qemu started)."""

    result: dict[str, object]
    files: dict[str, str]
    serial: str
    exit_status: int | None
    seconds: float
    marks: dict[str, float] = field(default_factory=dict)

    def log_tail(self, name: str, lines: int = 60) -> str:
        text = self.files.get(name, f"<no {name}>")
        return f"===== {name} =====\n" + "".join(text.splitlines(keepends=True)[-lines:])


def _work_tree_files(root: Path) -> list[str]:
    """The work tree's files as git sees them (tracked and untracked, not ignored), as they are
    on disk now: what a developer is testing, uncommitted changes included."""
    r = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       capture_output=True)
    if r.returncode != 0:
        raise VMError(f"git ls-files in {root}: {r.stderr.decode(errors='replace').strip()}")
    return sorted({f for f in r.stdout.decode().split("\0") if f and (root / f).exists()})


def _raw_disk_of_tar(path: Path) -> None:
    """Pad a tar archive to whole MiB (a raw disk of whole sectors; tar ignores the zeros)."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate((size // 2**20 + 1) * 2**20)


MARKS = {"runner started": "runner", "scenario exited": "scenario_done", "results written": "results"}


def run_scenario(
    image: Image,
    scenario: str,
    params: dict[str, object] | None = None,
    *,
    src: Path = ROOT,
    debs: Sequence[Path] = (),
    timeout: float = 900,
    memory_mib: int = 2048,
    cpus: int = 2,
    keep: Path | None = None,
    entry: str = "src/tests/vm/guest.py",
) -> VMResult:
    """Boot ``image`` with the work tree ``src`` and run guest scenario ``scenario``.

    ``params`` go to the guest in scenario.json; ``debs`` are put under ``debs/`` of the input
    disk (for installing a package into a pristine image). ``entry`` is the program the VM runs
    (``ENTRY IN OUT``), relative to the input disk: tests/vm/guest.py needs python3, which a
    pristine image (``Recipe.for_release(node=False)``) does not have; give such a scenario an
    entry in shell. On timeout qemu is killed by its PID
    and VMError raised with the serial console's tail. ``keep``: copy the results there too.
    """
    tmp = Path(tempfile.mkdtemp(prefix="netacct-vm-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        overlay = tmp / "root.qcow2"
        _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", image.disk, overlay])
        inp = tmp / "input.tar"
        with tarfile.open(inp, "w", format=tarfile.GNU_FORMAT) as tar:
            for f in _work_tree_files(src):
                tar.add(src / f, arcname=f"src/{f}", recursive=False)
            for deb in debs:
                tar.add(deb, arcname=f"debs/{deb.name}", recursive=False)
            for name, text in (("scenario.json", json.dumps({"scenario": scenario, "params": params or {}})),
                               ("entry", entry), ("guest-timeout", str(int(timeout - 60)))):
                data = tmp / name
                data.write_text(text)
                tar.add(data, arcname=name)
        _raw_disk_of_tar(inp)
        results = tmp / "results.img"
        with open(results, "wb") as f:
            f.truncate(256 * 2**20)  # sparse
        serial = tmp / "serial.log"
        argv = [
            "qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max", "-m", str(memory_mib),
            "-smp", str(cpus), "-nic", "none", "-display", "none", "-monitor", "none", "-no-reboot",
            "-serial", f"file:{serial}",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", "root=/dev/vda rw console=ttyS0 edd=off panic=-1 loglevel=4 "
                       f"netacct.scenario={scenario}",
            "-drive", f"file={overlay},if=virtio,format=qcow2",
            "-drive", f"file={inp},if=virtio,format=raw,readonly=on",
            "-drive", f"file={results},if=virtio,format=raw",
        ]
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        marks: dict[str, float] = {}
        while proc.poll() is None:
            text = serial.read_text(errors="replace") if serial.exists() else ""
            for needle, name in MARKS.items():
                if name not in marks and f"NETACCT-VM: {needle}" in text:
                    marks[name] = round(time.monotonic() - t0, 1)
            if time.monotonic() - t0 > timeout:
                proc.kill()  # by its PID (Popen), never by name
                proc.wait(timeout=30)
                raise VMError(f"the VM did not power off within {timeout:.0f} s (killed qemu, pid {proc.pid}); "
                              f"serial console's end:\n{_tail(serial, 60)}")
            time.sleep(0.5)
        seconds = round(time.monotonic() - t0, 1)
        qemu_out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
        if proc.returncode != 0:
            raise VMError(f"qemu exited {proc.returncode}: {qemu_out[-2000:]}\n{_tail(serial, 40)}")
        out = tmp / "out"
        out.mkdir()
        # GNU tar: member names are kept under out/ (no absolute paths, no '..'); an all-zero
        # disk (the VM wrote nothing) reads as an empty archive.
        _run(["tar", "--no-same-owner", "--no-same-permissions", "-xf", results, "-C", out])
        files = {str(p.relative_to(out)): p.read_text(errors="replace") for p in sorted(out.rglob("*")) if p.is_file()}
        if keep is not None:
            shutil.copytree(out, keep, dirs_exist_ok=True)
            shutil.copy(serial, keep / "serial.log")
        serial_text = serial.read_text(errors="replace")
        if "result.json" not in files:
            raise VMError(f"the VM wrote no result.json (files: {sorted(files)}); "
                          f"guest.log:\n{files.get('guest.log', '')[-3000:]}\nserial console's end:\n"
                          f"{_tail(serial, 60)}")
        status = files.get("exit-status", "").strip()
        return VMResult(json.loads(files["result.json"]), files, serial_text,
                        int(status) if status.lstrip("-").isdigit() else None, seconds, marks)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if proc is not None and proc.stdout:
            proc.stdout.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _tail(path: Path, lines: int) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError as e:
        return f"<cannot read {path}: {e}>"


if __name__ == "__main__":  # build (or find) an image by hand: python3 tests/vmharness.py trixie
    import sys

    for rel in sys.argv[1:] or list(RELEASES):
        print(asdict(ensure_image(Recipe.for_release(rel), log=lambda s: print(s, flush=True))))

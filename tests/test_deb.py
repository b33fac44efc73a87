"""scripts/build-deb on the host: the package builds from a checkout and holds what it should.

Not installed here (that would change the machine): tests/test_vm_deb.py installs, upgrades and
purges it in a pristine VM. Here: ``dpkg-deb --info`` (control fields, conffiles, runtime-only
Depends that cover every shared library the package's programs load), ``dpkg-deb --contents``
(the hooks, the plugin, the PAM module, the client, every unit, every command, the docs and
examples; no test suite, no pip, no build paths), the venv's versions are the tested ones,
bad input is refused with nothing written, and building leaves the checkout as it was.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # a build takes ~45 s (pip, compilers)

BUILD = ROOT / "scripts" / "build-deb"
MULTIARCH = subprocess.run(["gcc", "-print-multiarch"], capture_output=True, text=True).stdout.strip()
# The test suite's and the build's needs: none may be a runtime dependency.
NOT_RUNTIME = ("openssh-server", "iperf3", "slirp4netns", "gcc", "make", "libslurm-dev", "libpam0g-dev",
               "libmariadb-dev", "python3-dev", "python3-venv", "qemu-system-x86", "debootstrap", "mariadb-server")


def _git_status() -> str:
    return subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--ignored"], capture_output=True,
                          text=True, check=True).stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str, str]:
    out = tmp_path_factory.mktemp("deb")
    status = _git_status()
    r = subprocess.run([str(BUILD), "--version", "0.1.0~t1", "--out", str(out)], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    deb = out / f"slurm-netacct_0.1.0~t1_{subprocess.check_output(['dpkg', '--print-architecture'], text=True).strip()}.deb"
    assert r.stdout.strip().splitlines()[-1] == f"build-deb: {deb}"
    assert sorted(out.iterdir()) == [deb]
    tree = out / "tree"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
    return deb, tree, status, _git_status()


def _info(deb: Path, *args: str) -> str:
    return subprocess.run(["dpkg-deb", *args, str(deb)], capture_output=True, text=True, check=True).stdout


def test_control_fields_and_conffile(built: tuple[Path, Path, str, str]) -> None:
    deb = built[0]
    fields = dict(re.findall(r"^ ?([A-Za-z-]+): (.*)$", _info(deb, "--field"), re.M))
    assert fields["Package"] == "slurm-netacct" and fields["Version"] == "0.1.0~t1"
    assert fields["Architecture"] == subprocess.check_output(["dpkg", "--print-architecture"], text=True).strip()
    deps = [d.strip() for d in fields["Depends"].split(",")]
    assert re.fullmatch(r"python3 \(>= 3\.\d+\)", deps[0]) and re.fullmatch(r"python3 \(<< 3\.\d+\)", deps[1]), deps
    names = {d.split()[0] for d in deps}
    assert {"nftables", "iproute2", "iptables", "libmariadb3", "libpam0g"} <= names
    assert not names & set(NOT_RUNTIME), names & set(NOT_RUNTIME)
    assert not any(n.endswith("-dev") for n in names)
    info = _info(deb, "--info")
    for part in ("conffiles", "postinst", "prerm", "postrm", "md5sums"):
        assert re.search(rf"\s{part}\s", info), info
    tree = built[1]
    conffiles = subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(deb)], capture_output=True, check=True).stdout
    assert b"./conffiles" in conffiles
    assert (tree / "etc/slurm/netacct.toml").read_text() == (ROOT / "netacct.toml.example").read_text()


def test_contents(built: tuple[Path, Path, str, str]) -> None:
    deb, tree = built[0], built[1]
    listing = _info(deb, "--contents")
    paths = {line.split()[5].lstrip(".") for line in listing.splitlines()}
    expected = {
        "/etc/slurm/netacct.toml",
        "/usr/lib/slurm-netacct/prolog", "/usr/lib/slurm-netacct/epilog",
        "/usr/lib/slurm-netacct/client/netacct-hook", "/usr/lib/slurm-netacct/spank/netacct-nspath",
        f"/usr/lib/{MULTIARCH}/slurm-wlm/netacct.so", f"/usr/lib/{MULTIARCH}/security/pam_netacct.so",
        "/usr/share/doc/slurm-netacct/README.md", "/usr/share/doc/slurm-netacct/CHANGELOG.md",
        "/usr/share/doc/slurm-netacct/copyright",
        "/usr/share/doc/slurm-netacct/examples/netacct.toml.example",
        "/usr/share/doc/slurm-netacct/examples/slurm.conf.example",
        "/usr/share/doc/slurm-netacct/examples/plugstack.conf.example",
        "/usr/share/doc/slurm-netacct/examples/slurmd-netacct-reconcile.conf",
    }
    units = {p.name for p in (ROOT / "contrib").iterdir() if p.suffix in (".service", ".timer")}
    expected |= {f"/usr/lib/systemd/system/{u}" for u in units}
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    expected |= {f"/usr/{'bin' if s == 'netacct-report' else 'sbin'}/{s}" for s in scripts}
    assert expected <= paths, sorted(expected - paths)
    # Runtime only: no test suite, no test tools, no pip in the package's venv, no build paths.
    site = [p for p in paths if "/site-packages/" in p]
    assert any("/site-packages/slurm_netacct/" in p for p in site)
    for tool in ("pytest", "hypothesis", "ruff", "pip", "_pytest", "setuptools"):
        assert not [p for p in site if re.search(rf"/site-packages/{tool}(/|-[0-9])", p)], tool
    assert not [p for p in paths if "/tests/" in p or p.endswith("/tests")]
    for p in paths:
        if p.endswith(".py") and "/site-packages/slurm_netacct/" in p:
            pyc = Path(p).parent / "__pycache__" / f"{Path(p).stem}.cpython-{_pyver()}.pyc"
            assert str(pyc) in paths, f"no byte-code shipped for {p}"
    r = subprocess.run(["grep", "-rlE", r"/build-deb\.[A-Za-z0-9]{6}/", str(tree)], capture_output=True, text=True)
    assert r.stdout == "", r.stdout  # no path of the build's staging directory
    # The checkout's install directory only in the docs that describe it, never in what runs.
    r = subprocess.run(["grep", "-rlI", "/opt/slurm-netacct", str(tree / "usr/lib"), str(tree / "etc"),
                        str(tree / "usr/share/doc/slurm-netacct/examples")], capture_output=True, text=True)
    assert [p for p in r.stdout.splitlines() if not p.endswith("dist-info/METADATA")] == [], r.stdout
    assert "Prolog=/usr/lib/slurm-netacct/prolog" in (tree / "usr/share/doc/slurm-netacct/examples/slurm.conf.example"
                                                       ).read_text()
    # The hooks run the package's venv; units run the package's commands.
    for hook in ("prolog", "epilog"):
        assert "/usr/lib/slurm-netacct/venv/bin/python" in (tree / f"usr/lib/slurm-netacct/{hook}").read_text()
    daemon = (tree / "usr/lib/systemd/system/netacct-daemon.service").read_text()
    assert "ExecStart=/usr/sbin/netacct-daemon " in daemon
    for link in scripts:
        target = (tree / f"usr/{'bin' if link == 'netacct-report' else 'sbin'}/{link}").readlink()
        assert target == Path(f"/usr/lib/slurm-netacct/venv/bin/{link}")
        assert (tree / f"usr/lib/slurm-netacct/venv/bin/{link}").read_text().startswith(
            "#!/usr/lib/slurm-netacct/venv/bin/python\n")


def _pyver() -> str:
    return subprocess.check_output(["/usr/bin/python3", "-c", "import sys; print(f'{sys.version_info[0]}"
                                                              "{sys.version_info[1]}')"], text=True).strip()


def test_venv_holds_the_tested_versions(built: tuple[Path, Path, str, str]) -> None:
    tree = built[1]
    shipped = {d.name.removesuffix(".dist-info").split("-")[0].lower().replace("_", "-"):
               d.name.removesuffix(".dist-info").split("-")[1] for d in tree.glob("usr/lib/slurm-netacct/venv/lib/python3*/site-packages/*.dist-info")}
    tested = dict(line.lower().split("==") for line in subprocess.run(
        [str(ROOT / ".venv/bin/pip"), "freeze", "--exclude-editable"], capture_output=True, text=True,
        check=True).stdout.splitlines() if "==" in line)
    tested = {k.replace("_", "-"): v for k, v in tested.items()}
    runtime = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for req in runtime:
        name = re.split(r"[<>=!~ ]", req, maxsplit=1)[0].lower()
        assert shipped.get(name) == tested[name], (name, shipped.get(name), tested[name])
    assert shipped["slurm-netacct"] == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _owner(lib: str) -> str:
    for path in (lib, lib.removeprefix("/usr") if lib.startswith("/usr/") else "/usr" + lib):
        r = subprocess.run(["dpkg", "-S", path], capture_output=True, text=True)
        if r.returncode == 0:
            return r.stdout.split(":")[0]
    raise AssertionError(f"no Debian package owns {lib}")


def test_depends_cover_every_shared_library(built: tuple[Path, Path, str, str]) -> None:
    """Every ELF file's libraries come from a package in Depends (or an essential one)."""
    deb, tree = built[0], built[1]
    deps = {d.split()[0] for d in _info(deb, "--field").split("Depends:")[1].splitlines()[0].split(",")}
    essential = set(subprocess.run(["dpkg-query", "-W", "-f", "${Essential} ${Package}\n"], capture_output=True,
                                   text=True, check=True).stdout.split("\n"))
    essential_pkgs = {line.split()[1] for line in essential if line.startswith("yes ")}
    # What Depends bring along, transitively (libmariadb3 -> zlib1g, libpam0g -> libaudit1 -> libcap-ng0).
    closure, todo = set(deps), list(deps)
    while todo:
        r = subprocess.run(["dpkg-query", "-W", "-f", "${Depends}, ${Pre-Depends}", todo.pop()], capture_output=True,
                           text=True)
        for a in re.split(r"[,|]", r.stdout):
            if a.strip() and (name := a.split()[0].split(":")[0]) not in closure:
                closure.add(name)
                todo.append(name)
    elves = [p for p in tree.rglob("*") if p.is_file() and not p.is_symlink() and p.read_bytes()[:4] == b"\x7fELF"]
    assert len(elves) >= 5, elves
    for elf in elves:
        out = subprocess.run(["ldd", str(elf)], capture_output=True, text=True, check=True).stdout
        assert "not found" not in out, (elf, out)
        for lib in re.findall(r"=> (/\S+)", out):
            owner = _owner(lib)
            assert owner in closure | essential_pkgs, (elf.name, lib, owner)
        if elf.name.startswith("_mysql."):
            assert "libmariadb.so" in out, out


def test_build_leaves_the_checkout_as_it_was(built: tuple[Path, Path, str, str]) -> None:
    assert built[2] == built[3]


@pytest.mark.parametrize("argv", [["--version", "1.0 beta"], ["--version", "x1"], ["--bogus"], ["--version"]])
def test_bad_input_is_refused_and_writes_nothing(tmp_path: Path, argv: list[str]) -> None:
    r = subprocess.run([str(BUILD), "--out", str(tmp_path / "out"), *argv], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith(("build-deb: ", "usage: build-deb")), r.stderr
    assert not (tmp_path / "out").exists()


def test_maintainer_scripts_parse() -> None:
    for script in ("postinst", "prerm", "postrm"):
        subprocess.run(["sh", "-n", str(ROOT / "packaging" / "deb" / script)], check=True)

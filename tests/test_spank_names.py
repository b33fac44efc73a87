"""The SPANK plugin (C) and the Python package derive the same namespace path for a job."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slurm_netacct import naming
from slurm_netacct.naming import JobNames
from slurm_netacct import config

NSPATH = Path(__file__).resolve().parents[1] / "spank" / "netacct-nspath"


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    subprocess.run(["make", "-s", "-C", str(NSPATH.parent)], check=True)


def c_path(job: str, prefix: str = "netacct-", netns_dir: str = "/run/netns") -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(NSPATH), f"netns_dir={netns_dir}", f"prefix={prefix}", job],
                          capture_output=True, text=True)


@settings(max_examples=60, deadline=None)
@given(job=st.integers(min_value=1, max_value=naming.MAX_JOB_ID),
       prefix=st.from_regex(r"[A-Za-z0-9._-]{1,20}", fullmatch=True).filter(lambda p: p not in (".", "..")))
def test_c_and_python_agree_on_valid_ids(job: int, prefix: str) -> None:
    cfg = config.parse({"netns_prefix": prefix, "netns_dir": "/run/netns"})
    r = c_path(str(job), prefix)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(JobNames.of(cfg, job).netns_path)


@pytest.mark.parametrize("job", ["", "0", "007", "-1", "+1", "../x", "1/2", "4294967294", "4294967295",
                                 "4294967296", "99999999999999999999", " 1", "1a"])
def test_c_and_python_reject_the_same_ids(job: str) -> None:
    with pytest.raises(ValueError):
        naming.parse_job_id(job)
    r = c_path(job)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1


def _nspath_on_host(hostname: str, *args: str) -> subprocess.CompletedProcess[str]:
    """netacct-nspath in a UTS namespace of its own whose host name is `hostname`."""
    code = "import os, socket, sys; socket.sethostname(sys.argv[1]); os.execv(sys.argv[2], sys.argv[2:])"
    return subprocess.run(["unshare", "--uts", sys.executable, "-c", code, hostname, str(NSPATH), *args],
                          capture_output=True, text=True)


@pytest.mark.parametrize("host, short", [("n1", "n1"), ("cn0042.cluster.example", "cn0042"), ("node-7", "node-7")])
def test_c_and_python_agree_with_the_host_name_in_the_prefix(host: str, short: str) -> None:
    cfg = config.parse({"netns_prefix": "acct-%h-"})
    r = _nspath_on_host(host, "prefix=acct-%h-", "4242")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(JobNames.of(cfg, 4242, short).netns_path) == f"/run/netns/acct-{short}-4242"


def test_unusable_host_names_are_refused() -> None:
    for host in ("", "..", "a/b", "x" * 65):
        with pytest.raises(ValueError):
            naming.netns_name("acct-%h-", 1, host)
    for host in ("..", "a/b"):
        r = _nspath_on_host(host, "prefix=acct-%h-", "1")
        assert r.returncode == 2 and r.stdout == "" and "host name" in r.stderr


def test_boundaries() -> None:
    assert c_path("1").stdout.strip() == "/run/netns/netacct-1"
    assert c_path(str(naming.MAX_JOB_ID)).stdout.strip() == f"/run/netns/netacct-{naming.MAX_JOB_ID}"


@pytest.mark.parametrize("prefix", ["a" * naming.MAX_PREFIX_LEN, "a" * (naming.MAX_PREFIX_LEN + 1),
                                    "%h" * 16, "x" + "%h" * 16, "a%", "%x", "a/b", "a b", "%%h"])
def test_c_and_python_accept_the_same_prefixes(prefix: str) -> None:
    """Both sides read netns_prefix / prefix= with the same rule and the same length limit."""
    py_ok = naming.valid_netns_prefix(prefix)
    r = _nspath_on_host("n1", f"prefix={prefix}", "7")
    assert (r.returncode == 0) == py_ok, r.stderr
    if py_ok:
        assert r.stdout.strip() == f"/run/netns/{naming.netns_name(prefix, 7, 'n1')}"
    assert (len(prefix) <= naming.MAX_PREFIX_LEN) or not py_ok

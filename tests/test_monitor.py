"""Live usage: periodic samples into the node database, and the Prometheus exporter."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, Node
from slurm_netacct import counting
from slurm_netacct.node import exporter, sample
from slurm_netacct.store import db as store
from slurm_netacct.traffic import Counters, traffic_of
from slurm_netacct.errors import ExportError, NetacctError, SetupError
from topology import LAN4, PORT, WAN4

NODE = "n1"
FAMILIES = {"netacct_job_bytes": "counter", "netacct_job_packets": "counter",
            "netacct_jobs_running": "gauge", "netacct_job_read_errors": "gauge"}


def _live(node: Node, job: int) -> dict[str, dict[str, int]]:
    return traffic_of(node.live(job), node.cfg.class_names)


def _seen(node: Node) -> dict[str, dict[str, int]]:
    """What the LAN and WAN servers exchanged since the test began, as the node's way of
    counting counts it (Node.seen; the oracle: not our counters), as a job's traffic per
    class; for tests in which one job talks to the servers."""
    node.topo.wait_quiet()
    out = {}
    for klass in ("lan", "wan"):
        c = node.seen(klass)
        out[klass] = {"in_bytes": c["tx"][1], "out_bytes": c["rx"][1],
                      "in_packets": c["tx"][0], "out_packets": c["rx"][0]}
    return out


def _stored(node: Node, job: int) -> dict[str, dict[str, int]]:
    with sqlite3.connect(node.db) as conn:
        rows = conn.execute("SELECT class, in_bytes, out_bytes, in_packets, out_packets FROM traffic "
                            "WHERE job_id = ? ORDER BY class", (job,)).fetchall()
    return {r[0]: {"in_bytes": r[1], "out_bytes": r[2], "in_packets": r[3], "out_packets": r[4]} for r in rows}


def _job(node: Node, job: int) -> tuple[str, str | None]:
    with sqlite3.connect(node.db) as conn:
        [(state, sampled_at)] = conn.execute("SELECT state, sampled_at FROM jobs WHERE job_id = ?",
                                             (job,)).fetchall()
    return state, sampled_at


def _send(node: Node, job: int, kind: str, host: str, n: int) -> None:
    """n bytes of TCP to the server (tcp-up), or n bytes in 1000-byte datagrams from it
    (udp-down: what the job receives must not be bulk TCP, see Node.seen)."""
    args = [str(n)] if kind.startswith("tcp") else [str(n // 1000), "1000"]
    expect = args[0]
    assert node.traffic(job, kind, host, str(PORT), *args).strip() == expect
    node.topo.wait_quiet()  # the last ACKs have landed: the counters stand still


def _run_cli(node: Node, func: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    code = f"from slurm_netacct.cli.{func} import main; main()"
    full = dict(os.environ, NETACCT_CONFIG=str(node.config_path), SLURMD_NODENAME=NODE)
    full.update(env)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=full, timeout=120, cwd="/")


# --------------------------------------------------------------------------- sampling

def test_sample_stores_the_live_counters_and_the_epilog_overwrites_them(node: Node) -> None:
    job = 6101
    node.prolog(job)
    _send(node, job, "tcp-up", WAN4, 1_000_000)
    live = _seen(node)
    assert live["wan"]["out_bytes"] > 1_000_000 and live["lan"]["out_bytes"] == 0

    res = sample.sample_node(node.cfg, NODE)

    assert (res.sampled, res.skipped, res.errors) == (1, 0, 0)
    assert res.traffic == {job: live}
    assert res.jobs[job].user == "alice" and res.jobs[job].account == "physics"
    assert _stored(node, job) == live
    state, sampled_at = _job(node, job)
    assert state == "running" and sampled_at is not None and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", sampled_at)
    assert _live(node, job) == live  # sampling reads; it neither resets nor disturbs the counters

    _send(node, job, "udp-down", LAN4, 500_000)
    final = _seen(node)
    assert final["lan"]["in_bytes"] > 500_000 and final != live
    node.epilog(job)
    assert _stored(node, job) == final
    assert _job(node, job)[0] == "completed"
    # A later sample finds nothing to do and leaves the final numbers alone.
    res = sample.sample_node(node.cfg, NODE)
    assert (res.sampled, res.skipped, res.errors) == (0, 0, 0)
    assert _stored(node, job) == final


def test_a_node_without_a_database_has_nothing_running(bpf_node: Node) -> None:
    assert not bpf_node.db.exists()
    res = sample.sample_node(bpf_node.cfg, NODE)
    assert (res.sampled, res.skipped, res.errors) == (0, 0, 0)
    assert sample.live_traffic(bpf_node.cfg, NODE) == {}
    assert not bpf_node.db.exists()  # neither reading nor sampling creates one


def test_job_torn_down_between_listing_and_reading_is_skipped(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    job = 6102
    node.prolog(job)
    _send(node, job, "tcp-up", LAN4, 200_000)
    before = _seen(node)
    real = store.running_jobs

    def list_then_end(db: Any, n: str | None = None) -> list[dict[str, Any]]:
        rows = real(db, n)
        assert [r["job_id"] for r in rows] == [job]
        node.epilog(job)  # the job ends right after the sampler listed it
        return rows

    monkeypatch.setattr(store, "running_jobs", list_then_end)
    res = sample.sample_node(node.cfg, NODE)
    assert (res.sampled, res.skipped, res.errors) == (0, 1, 0)
    assert res.skipped_jobs == [job] and res.traffic == {}
    assert _job(node, job)[0] == "completed"
    assert _stored(node, job) == before


def test_job_torn_down_while_its_counters_are_read_is_skipped(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    job = 6103
    node.prolog(job)
    _send(node, job, "tcp-up", WAN4, 200_000)
    before = _seen(node)
    failed: list[NetacctError] = []
    cls = type(counting.named(node.backend))
    real_many = cls.read_many  # every way of counting reads all its jobs in one go

    def end_then_read_many(self: Any, cfg: Any, jobs: list[Any]) -> Any:
        node.epilog(job)  # the namespace goes away under the reader
        got = real_many(self, cfg, jobs)
        failed.extend(SetupError(v) for v in got.values() if isinstance(v, str))
        return got

    monkeypatch.setattr(cls, "read_many", end_then_read_many)
    res = sample.sample_node(node.cfg, NODE)
    assert len(failed) == 1  # the real read did hit the vanished namespace ...
    assert (res.sampled, res.skipped, res.errors) == (0, 1, 0)  # ... and that is no error
    assert res.failures == {}
    assert _job(node, job)[0] == "completed"
    assert _stored(node, job) == before


def test_epilog_storing_first_wins_over_a_sample(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    job = 6104
    node.prolog(job)
    _send(node, job, "tcp-up", WAN4, 100_000)
    final: dict[str, dict[str, int]] = {}
    read: dict[str, dict[str, int]] = {}
    real = traffic_of

    def read_then_end(counters: Counters, classes: Any) -> dict[str, dict[str, int]]:
        read.update(real(counters, classes))
        _send(node, job, "tcp-up", WAN4, 300_000)  # more traffic after the sampler's read ...
        final.update(_seen(node))
        node.epilog(job)  # ... and the epilog stores it before the sampler can
        return dict(read)

    monkeypatch.setattr(sample, "traffic_of", read_then_end)
    res = sample.sample_node(node.cfg, NODE)
    assert (res.sampled, res.skipped, res.errors) == (0, 1, 0)
    assert final["wan"]["out_bytes"] > read["wan"]["out_bytes"] + 300_000
    assert _stored(node, job) == final  # the stale sample did not overwrite the final counters
    state, sampled_at = _job(node, job)
    assert state == "completed" and sampled_at is None


@pytest.mark.parametrize("kind", ["bpf", "nftables"])
def test_unreadable_job_is_an_error_and_the_others_are_still_sampled(topo: Any, tmp_path: Path, kind: str) -> None:
    node = Node(topo, tmp_path, kind)
    topo.reset_servers()
    try:
        bad, good = 6105, 6106
        node.prolog(bad)
        node.prolog(good)
        _send(node, good, "tcp-up", LAN4, 100_000)
        # The bad job's namespace is there and the job runs, but its counters are gone.
        why = node.lose_counters(bad)
        res = sample.sample_node(node.cfg, NODE)
        assert (res.sampled, res.skipped, res.errors) == (1, 0, 1)
        assert list(res.failures) == [bad]
        assert str(res.failures[bad]) == why
        assert _stored(node, good) == _seen(node)
        assert _stored(node, bad) == {} and _job(node, bad) == ("running", None)
        node.epilog(bad)  # vanished counters: recorded as lost, exit 0
        node.epilog(good)
        assert _job(node, bad)[0] == "lost"
    finally:
        node.cleanup()


@pytest.mark.slow
def test_reading_many_namespaces_in_batches(nft_node: Node, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """nftread.read_tables joins one namespace after another and goes home once a batch:
    each answer belongs to its own path, errors stay with theirs, nothing stays open."""
    from slurm_netacct.kernel import netns, nftread

    jobs = [6107, 6108, 6109, 6110]
    for job in jobs:
        nft_node.prolog(job)
    for k, job in enumerate(jobs[:3]):  # different amounts, so a mix-up shows
        _send(nft_node, job, "tcp-up", WAN4, 50_000 * (k + 1))
    subprocess.run(["nsenter", f"--net={nft_node.netns_path(jobs[3])}", "nft", "delete", "table", "inet",
                    "netacct"], check=True)
    plain = tmp_path / "plain-file"
    plain.write_text("")
    paths = [nft_node.netns_path(jobs[0]), tmp_path / "missing", nft_node.netns_path(jobs[1]), plain,
             nft_node.netns_path(jobs[3]), nft_node.netns_path(jobs[2])]
    monkeypatch.setattr(nftread, "BATCH", 4)
    home = os.stat("/proc/thread-self/ns/net").st_ino
    netns.home_fd()  # opened once per thread and kept: not a leak of this call
    fds = len(os.listdir("/proc/self/fd"))
    got = nftread.read_tables(paths, "netacct")
    assert os.stat("/proc/thread-self/ns/net").st_ino == home
    assert len(os.listdir("/proc/self/fd")) == fds
    for i, job in ((0, jobs[0]), (2, jobs[1]), (5, jobs[2])):  # nft(8) itself is the oracle
        listed = json.loads(subprocess.run(["nsenter", f"--net={nft_node.netns_path(job)}", "nft", "-j", "list",
                                            "counters", "table", "inet", "netacct"],
                                           capture_output=True, text=True, check=True).stdout)["nftables"]
        assert isinstance(got[i], dict)
        assert got[i] == {c["counter"]["name"]: (c["counter"]["packets"], c["counter"]["bytes"])
                          for c in listed if "counter" in c}
    assert [got[0]["wan_out"][1] < got[2]["wan_out"][1] < got[5]["wan_out"][1]] == [True]
    assert isinstance(got[1], FileNotFoundError) and "no such network namespace" in str(got[1])
    assert isinstance(got[3], FileNotFoundError) and "not a network namespace" in str(got[3])
    assert got[4] == {}  # a dump of a table that is not there is empty, not an error
    for job in jobs:
        nft_node.epilog(job)


# --------------------------------------------------------------------------- exporter

def _parse(text: str) -> tuple[dict[str, str], dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    types: dict[str, str] = {}
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        for s in fam.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = s.value
    return types, samples


Traffic = dict[str, dict[str, int]]
ZERO = {"in_bytes": 0, "out_bytes": 0, "in_packets": 0, "out_packets": 0}


def _expected(truth: dict[int, Traffic], jobs: dict[int, tuple[str, str]],
              errors: int = 0) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The metrics the exporter must show: each job's traffic as the servers saw it."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {
        ("netacct_jobs_running", frozenset({("node", NODE)})): float(len(jobs) + errors),
        ("netacct_job_read_errors", frozenset({("node", NODE)})): float(errors),
    }
    for job, (user, account) in jobs.items():
        for klass, values in truth[job].items():
            for direction in ("in", "out"):
                labels = frozenset({("job_id", str(job)), ("user", user), ("account", account),
                                    ("node", NODE), ("class", klass), ("direction", direction)})
                out[("netacct_job_bytes_total", labels)] = float(values[f"{direction}_bytes"])
                out[("netacct_job_packets_total", labels)] = float(values[f"{direction}_packets"])
    return out


def _two_jobs(node: Node) -> tuple[dict[int, tuple[str, str]], dict[int, Traffic]]:
    """Job a talks to the WAN server only, job b to the LAN server only: (who, what servers saw)."""
    a, b = 6110, 6111
    node.prolog(a)
    node.prolog(b, SLURM_JOB_USER="bob", SLURM_JOB_ACCOUNT="chem")
    _send(node, a, "tcp-up", WAN4, 800_000)
    _send(node, b, "udp-down", LAN4, 300_000)
    seen = _seen(node)
    truth = {a: {"lan": ZERO, "wan": seen["wan"]}, b: {"lan": seen["lan"], "wan": ZERO}}
    assert truth[a]["wan"]["out_bytes"] > 800_000 and truth[b]["lan"]["in_bytes"] > 300_000
    return {a: ("alice", "physics"), b: ("bob", "chem")}, truth


def test_textfile_has_exactly_the_running_jobs_and_is_replaced_atomically(
        node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    jobs, truth = _two_jobs(node)
    directory = tmp_path / "textfile"
    directory.mkdir()
    path = directory / "netacct.prom"
    replaced: list[tuple[Path, Path, str | None]] = []
    synced: list[str] = []
    real_replace, real_fsync = os.replace, os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        src, dst = Path(src), Path(dst)
        # At the moment of the rename the new text is complete, on disk, readable by all,
        # in the same directory under a name the textfile collector ignores; the old file
        # is still whole.
        assert src.parent == dst.parent == directory
        assert not src.name.endswith(".prom")
        assert synced and synced[-1] == str(src)
        assert stat.S_IMODE(src.stat().st_mode) == 0o644
        assert src.read_text().endswith("\n") and _parse(src.read_text())[1]
        replaced.append((src, dst, dst.read_text() if dst.exists() else None))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)

    exporter.write_textfile(node.cfg, NODE, path)
    types, samples = _parse(path.read_text())
    assert types == FAMILIES
    assert samples == _expected(truth, jobs)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(directory) == ["netacct.prom"]
    assert len(replaced) == 1 and replaced[0][2] is None
    first = path.read_text()

    a, b = sorted(jobs)
    node.epilog(a)  # a finished job leaves the metrics
    exporter.write_textfile(node.cfg, NODE, path)
    types, samples = _parse(path.read_text())
    assert types == FAMILIES
    assert samples == _expected(truth, {b: jobs[b]})
    assert not any(("job_id", str(a)) in labels for _, labels in samples)
    assert len(replaced) == 2 and replaced[1][2] == first  # the old file was whole until replaced
    assert os.listdir(directory) == ["netacct.prom"]
    node.epilog(b)


def test_textfile_write_failure_leaves_no_temporary_file(bpf_node: Node, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "textfile"
    directory.mkdir()
    path = directory / "netacct.prom"
    path.write_text("old\n")

    def fail(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(ExportError) as err:
        exporter.write_textfile(bpf_node.cfg, NODE, path)
    assert str(err.value) == f"cannot write {path}: No space left on device"
    assert err.value.exit_code == 10
    assert os.listdir(directory) == ["netacct.prom"] and path.read_text() == "old\n"


def test_http_endpoint_serves_the_same_metrics_on_loopback(bpf_node: Node, tmp_path: Path) -> None:
    jobs, truth = _two_jobs(bpf_node)
    server, thread = exporter.serve(bpf_node.cfg, NODE, "127.0.0.1", 0)
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1" and port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            body = resp.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert not thread.is_alive()
    types, samples = _parse(body)
    assert types == FAMILIES  # only this collector: no process_* or python_* metrics
    assert samples == _expected(truth, jobs)
    textfile = tmp_path / "netacct.prom"
    exporter.write_textfile(bpf_node.cfg, NODE, textfile)
    assert _parse(textfile.read_text()) == (types, samples)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    for job in jobs:
        bpf_node.epilog(job)


# --------------------------------------------------------------------------- command line

def test_netacct_sample_command(bpf_node: Node, tmp_path: Path) -> None:
    job = 6120
    bpf_node.prolog(job)
    _send(bpf_node, job, "tcp-up", WAN4, 100_000)
    r = _run_cli(bpf_node, "sample")
    assert (r.returncode, r.stdout, r.stderr) == (0, "n1: 1 sampled, 0 skipped, 0 errors\n", "")
    assert _stored(bpf_node, job) == _seen(bpf_node)
    assert _job(bpf_node, job)[0] == "running"
    r = _run_cli(bpf_node, "sample", "--node", "n2")
    assert (r.returncode, r.stdout, r.stderr) == (0, "n2: 0 sampled, 0 skipped, 0 errors\n", "")

    # The counters vanish while the job still runs (an admin's mistake): an error, exit 7,
    # one line on stderr; the epilog then records the job as lost, with that sample.
    why = bpf_node.lose_counters(job)
    r = _run_cli(bpf_node, "sample")
    assert r.returncode == 7
    assert r.stdout == "n1: 0 sampled, 0 skipped, 1 errors\n"
    assert r.stderr == f"netacct-sample: job {job}: {why}\n"
    assert f"job {job}: cannot read its counters" in bpf_node.log.read_text()
    sampled = _stored(bpf_node, job)
    bpf_node.epilog(job)
    assert _job(bpf_node, job)[0] == "lost" and _stored(bpf_node, job) == sampled

    r = _run_cli(bpf_node, "sample", "--bogus")
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith("netacct-sample: unrecognized arguments: --bogus")
    r = _run_cli(bpf_node, "sample", "--node", "../x")
    assert (r.returncode, r.stderr) == (2, "netacct-sample: --node '../x' is not a valid node name\n")
    r = _run_cli(bpf_node, "sample", NETACCT_CONFIG=str(tmp_path / "missing.toml"))
    assert (r.returncode, r.stderr) == (3, f"netacct-sample: config file {tmp_path / 'missing.toml'} does not exist\n")
    bpf_node.epilog(job)


def test_netacct_exporter_command(bpf_node: Node, tmp_path: Path) -> None:
    job = 6121
    bpf_node.prolog(job, SLURM_JOB_ACCOUNT="bio")
    _send(bpf_node, job, "udp-down", WAN4, 100_000)
    expected = _expected({job: _seen(bpf_node)}, {job: ("alice", "bio")})

    path = tmp_path / "netacct.prom"
    r = _run_cli(bpf_node, "exporter", "--textfile", str(path))
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert _parse(path.read_text()) == (FAMILIES, expected)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644

    missing = tmp_path / "no-such-dir" / "netacct.prom"
    r = _run_cli(bpf_node, "exporter", "--textfile", str(missing))
    assert (r.returncode, r.stdout) == (10, "")
    assert r.stderr == f"netacct-exporter: cannot write {missing}: No such file or directory\n"
    for args in ([], ["--textfile", str(path), "--listen", "9835"], ["--listen", "http"],
                 ["--listen", "::1:9835"], ["--listen", "127.0.0.1:70000"]):
        r = _run_cli(bpf_node, "exporter", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stdout == "" and len(r.stderr.splitlines()) == 1 and r.stderr.startswith("netacct-exporter: ")

    env = dict(os.environ, NETACCT_CONFIG=str(bpf_node.config_path), SLURMD_NODENAME=NODE)
    proc = subprocess.Popen([sys.executable, "-c", "from slurm_netacct.cli.exporter import main; main()",
                             "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd="/")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.fullmatch(r"netacct-exporter: serving http://127\.0\.0\.1:(\d+)/metrics for node n1\n", line)
        assert m, line
        with urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/metrics", timeout=30) as resp:
            assert _parse(resp.read().decode()) == (FAMILIES, expected)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None and proc.stderr.read() == ""
    bpf_node.epilog(job)


# --------------------------------------------------------------------------- contrib

def test_contrib_units_and_dashboard(tmp_path: Path) -> None:
    contrib = ROOT / "contrib"
    units = ["netacct-sample.service", "netacct-sample.timer",
             "netacct-exporter.service", "netacct-exporter.timer"]
    # systemd-analyze checks that ExecStart= exists: point it at stand-ins for the scripts.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("netacct-sample", "netacct-exporter"):
        (bindir / name).write_text("#!/bin/sh\nexit 0\n")
        (bindir / name).chmod(0o755)
    for unit in units:
        text = (contrib / unit).read_text()
        assert "/opt/slurm-netacct/.venv/bin/" in text or unit.endswith(".timer")
        (tmp_path / unit).write_text(text.replace("/opt/slurm-netacct/.venv/bin/", f"{bindir}/"))
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is needed to check the units"
    r = subprocess.run([analyze, "verify", *(str(tmp_path / u) for u in units)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and not any("netacct" in line for line in r.stderr.splitlines()), r.stderr
    assert "OnUnitActiveSec=60" in (contrib / "netacct-sample.timer").read_text()
    assert "OnUnitActiveSec=30" in (contrib / "netacct-exporter.timer").read_text()

    dash = json.loads((contrib / "grafana-dashboard.json").read_text())
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    exported = {"netacct_job_bytes_total", "netacct_job_packets_total", "netacct_jobs_running",
                "netacct_job_read_errors"}
    for expr in exprs + [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]:
        used = set(re.findall(r"\bnetacct_[a-z_]+", expr))
        assert used and used <= exported, expr
        for label in re.findall(r"by \(([^)]*)\)", expr):
            assert {x.strip() for x in label.split(",")} <= set(exporter.JOB_LABELS), expr
    assert any("sum by (class, direction) (rate(netacct_job_bytes_total{" in e and "[5m]" in e for e in exprs)
    assert any(e.startswith("topk(10,") and 'class="wan", direction="out"' in e for e in exprs)
    assert any("sum by (account" in e for e in exprs)

"""Keep the benchmarks runnable: a tiny run of each (numbers are not checked here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, need_root


@pytest.mark.slow
def test_throughput_bench_runs(tmp_path: Path) -> None:
    need_root()
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--jobs", "3", "--seconds", "1",
                        "--reps", "1", "--rps-cpus", "1", "--json", str(out)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"bpf", "nftables", "iptables"}
    assert set(data["side_by_side"]) == {"bare", "bpf"}  # one way of the namespace engine side by side
    for res in data["results"].values():
        assert res["job0"] > 0 and res["jobN"] > 0 and res["job0_rps"] > 0


@pytest.mark.slow
def test_throughput_bench_runs_the_cgroup_engine(tmp_path: Path) -> None:
    need_root()
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--backends", "bpf,cgroup",
                        "--jobs", "3", "--seconds", "1", "--reps", "1", "--detached", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"bpf", "cgroup"}
    assert all(res["job0"] > 0 and res["jobN"] > 0 for res in data["results"].values())
    assert set(data["side_by_side"]) == {"bare", "bpf", "cgroup", "cgroup-detached"}
    assert all(v > 0 for v in data["side_by_side"].values())


@pytest.mark.slow
def test_throughput_bench_side_by_side_only(tmp_path: Path) -> None:
    """--jobs 0: only the bare node and each backend's job in turn, in the order given; a bad
    combination of flags is refused before anything is made."""
    need_root()
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--backends", "cgroup,bpf",
                        "--jobs", "0", "--seconds", "1", "--reps", "2", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["results"] == {}
    assert list(data["side_by_side"]) == ["bare", "cgroup", "bpf"]
    assert all(v > 0 for v in data["side_by_side"].values())
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--backends", "bpf",
                        "--detached", "--jobs", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--detached needs the cgroup backend" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["netns", "cgroup"])
def test_hooks_bench_runs(tmp_path: Path, engine: str) -> None:
    need_root()
    out = tmp_path / "h.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "hooks.py"), "--jobs", "3", "--runs", "2",
                        "--rounds", "2", "--engine", engine, "--json", str(out)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert len(data["prolog_ratios"]) == len(data["epilog_ratios"]) == 2
    assert data["prolog0_ms"] > 0 and data["prologN_ms"] > 0 and data["read_all_ms"] > 0


@pytest.mark.slow
def test_wire_bench_runs(tmp_path: Path) -> None:
    need_root()
    out = tmp_path / "w.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "wire.py"), "--mbytes", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    assert {r["backend"] for r in rows} == {"bpf", "cgroup", "nftables", "iptables"}
    assert all(r["counted"] == r["wire"] for r in rows if r["backend"] in ("bpf", "cgroup")), rows
    assert any(r.get("bpf_ns_per_run") for r in rows)
    assert any(r.get("bpf_ms_per_wire_gbyte") for r in rows)


@pytest.mark.slow
def test_ledger_bench_runs(tmp_path: Path) -> None:
    need_root()
    out = tmp_path / "l.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "ledger.py"), "--jobs", "2000", "--ship-jobs", "300",
                        "--nodes", "3", "--dir", str(tmp_path / "d"), "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    for way in ("plain", "rollups"):  # shipping without and with the rollups' upkeep
        assert data[f"ship1_{way}_records_per_s"] and min(data[f"ship1_{way}_records_per_s"]) > 0
        assert data[f"shipN_{way}_records_per_s"] > 0
    assert data["job_rows"] >= 2000 and data["rollup_rows"] > 0  # the report's ledger, rollups built
    assert data["grouped_s"] and min(data["grouped_s"]) > 0 and data["parsable_all_bytes"] > 2000 * 10

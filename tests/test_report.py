"""netacct-report: sacct flags, formats (golden outputs), merging, billing, privacy, errors."""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import sqlite3
import types
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import sqlite_utils
from slurm_netacct.cli import report as report_cli
from slurm_netacct.report import aggregate as report_aggregate
from slurm_netacct.report import records as report_records
from slurm_netacct.store import db as store
from slurm_netacct.errors import EXIT_CODES

LAN = "lan"


def _job(db: sqlite_utils.Database, job: int, node: str, user: str | None, account: str | None,
         partition: str, start: str, end: str | None, state: str,
         traffic: dict[str, tuple[int, int, int, int]], restart: int = 0, sampled_at: str | None = None) -> None:
    info = store.JobInfo(job_id=job, node=node, restart=restart, user=user, account=account, partition=partition)
    store.record_start(db, info, f"netacct-{job}", "100.64.0.2", None, "nftables")
    if state != "running":
        store.record_end(db, info, state, {k: dict(zip(("in_bytes", "out_bytes", "in_packets", "out_packets"), v))
                                           for k, v in traffic.items()})
    elif traffic:
        store.record_sample(db, info, {k: dict(zip(("in_bytes", "out_bytes", "in_packets", "out_packets"), v))
                                       for k, v in traffic.items()})
    db.conn.execute('UPDATE jobs SET start=?, "end"=?, sampled_at=? WHERE job_id=? AND node=? AND restart=?',
                    (start, end, sampled_at, job, node, restart))


@pytest.fixture
def dbs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    d = tmp_path / "nodes"
    d.mkdir()
    n1 = store.connect(d / "n1.db")
    _job(n1, 101, "n1", "alice", "physics", "batch", "2026-10-03T10:00:00Z", "2026-10-03T11:00:00Z", "completed",
         {"lan": (1000, 2000, 10, 20), "wan": (3_000_000_000, 500_000_000, 3000, 500)})
    _job(n1, 102, "n1", "bob", "chem", "batch", "2026-11-01T08:00:00Z", "2026-11-01T09:00:00Z", "completed",
         {"lan": (0, 0, 0, 0), "wan": (1024, 2048, 1, 2)})
    _job(n1, 103, "n1", "alice", "physics", "gpu", "2026-11-02T00:00:00Z", "2026-11-02T02:00:00Z", "completed",
         {"lan": (5, 6, 1, 1), "wan": (0, 0, 0, 0)})
    n1.close()
    n2 = store.connect(d / "n2.db")
    _job(n2, 103, "n2", "alice", "physics", "gpu", "2026-11-02T00:00:01Z", "2026-11-02T02:00:05Z", "completed",
         {"lan": (7, 8, 1, 1), "wan": (0, 0, 0, 0)})
    _job(n2, 104, "n2", "carol", None, "batch", "2026-11-05T00:00:00Z", None, "running",
         {"lan": (0, 0, 0, 0), "wan": (4096, 0, 4, 0)}, sampled_at="2026-11-05T00:01:00Z")
    n2.close()
    cfg = tmp_path / "netacct.toml"
    cfg.write_text(f'db = "{d}/%n.db"\n[report]\nadmins = ["dave"]\n')
    monkeypatch.setenv("NETACCT_CONFIG", str(cfg))
    monkeypatch.setenv("SLURMD_NODENAME", "login1")  # not a compute node: no live counters
    monkeypatch.delenv("SUDO_USER", raising=False)
    monkeypatch.delenv("SUDO_UID", raising=False)
    return d / "n1.db", d / "n2.db"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        report_cli.main(list(argv))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


ALL = ("-S", "2026-01-01")


def test_default_table(dbs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--db-dir", str(dbs[0].parent), *ALL)
    assert code == 0
    assert out == (
        "JobID User  Account NodeList State     LAN_In LAN_Out WAN_In WAN_Out\n"
        "----- ----- ------- -------- --------- ------ ------- ------ -------\n"
        "101   alice physics n1       completed   1000   1.95K  2.79G 476.84M\n"
        "102   bob   chem    n1       completed      0       0  1.00K   2.00K\n"
        "103   alice physics n1,n2    completed     12      14      0       0\n"
        "104   carol         n2       running        0       0  4.00K       0\n")


def test_parsable_formats_and_fields(dbs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    d = str(dbs[0].parent)
    code, out, _ = run(capsys, "--db-dir", d, *ALL, "-P", "-o", "jobid,user,nnodes,wan_in,TotalOut,wan_inpkts", "-j", "101,103")
    assert code == 0
    assert out == "JobID|User|NNodes|WAN_In|TotalOut|WAN_InPkts\n101|alice|1|3000000000|500002000|3000\n103|alice|2|0|14|0\n"
    code, out, _ = run(capsys, "--db-dir", d, "-S", "2026-11-06", "-p", "-n", "-o", "JobID,State,AsOf", "-s", "R")
    assert out == "104|running|2026-11-05T00:01:00Z|\n"
    code, out, _ = run(capsys, "--db-dir", d, *ALL, "--csv", "-o", "JobID,Account,WAN_In", "--units", "M", "-j", "101,104")
    assert out == "JobID,Account,WAN_In\n101,physics,2861.02M\n104,,0.00M\n"


def test_table_widths_truncate_like_sacct(dbs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--db-dir", str(dbs[0].parent), *ALL, "-j", "101", "-o", "JobID%3,Account%4,LAN_Out%8")
    assert out.splitlines() == ["Job Acco  LAN_Out", "--- ---- --------", "101 phy+    1.95K"]


def test_json_merges_nodes_with_per_node_breakdown(dbs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--db", str(dbs[0]), "--db", str(dbs[1]), "--json", "--per-node", "-j", "103")
    [rec] = json.loads(out)
    assert rec["nodes"] == ["n1", "n2"]
    assert rec["start"] == "2026-11-02T00:00:00Z" and rec["end"] == "2026-11-02T02:00:05Z"
    assert rec["traffic"]["lan"] == {"in_bytes": 12, "out_bytes": 14, "in_packets": 2, "out_packets": 2}
    assert rec["per_node"]["n2"]["lan"] == {"in_bytes": 7, "out_bytes": 8, "in_packets": 1, "out_packets": 1}


def test_the_same_database_twice_or_a_copy_counts_once(dbs: tuple[Path, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    backup = tmp_path / "n1-backup.db"
    backup.write_bytes(dbs[0].read_bytes())
    code, out, _ = run(capsys, "--db", str(dbs[0]), "--db", str(dbs[0]), "--db", str(backup), "--db", str(dbs[1]),
                       "--json", "-j", "101,103")
    recs = json.loads(out)
    assert [r["traffic"]["lan"]["in_bytes"] for r in recs] == [1000, 12]


def test_running_jobs_show_their_last_sample(dbs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--db-dir", str(dbs[0].parent), "--json", "-j", "104")
    [rec] = json.loads(out)
    assert rec["state"] == "running" and rec["end"] is None
    assert rec["live"] is False and rec["as_of"] == "2026-11-05T00:01:00Z"
    assert rec["traffic"]["wan"]["in_bytes"] == 4096


@pytest.mark.parametrize("flags, jobs", [
    (("-u", "alice"), [101, 103]),
    (("-u", "alice,bob"), [101, 102, 103]),
    (("-A", "chem"), [102]),
    (("-r", "gpu"), [103]),
    (("-N", "n2"), [103, 104]),
    (("-s", "CD", "-E", "2026-12-31"), [101, 102, 103]),
    (("-s", "running,completed", "-E", "2026-12-31"), [101, 102, 103, 104]),
    (("-s", "CD"), []),  # with -s and -S but no -E, the window is the instant -S (as sacct)
    (("-s", "CD", "-S", "2026-11-01", "-E", "2026-11-02T02:00:05"), [102, 103]),  # ended in the window
    (("-s", "CD", "-S", "2026-11-02T02:00:05"), [103]),  # ended at that very second
    (("-s", "CD", "-S", "2026-11-01T08:30", "-E", "2026-11-01T08:45"), []),  # none ended then
    (("-s", "R", "-S", "2026-11-01T08:30", "-E", "2026-11-01T08:45"), [102]),  # 102 ran then (completed since)
    (("-s", "R", "-S", "2026-11-06"), [104]),
    (("-S", "2026-11-01T08:30", "-E", "2026-11-02"), [102, 103]),  # overlap: 102 ends 09:00, 103 starts at 00:00Z
    (("-S", "2026-11-03"), [104]),  # still running
    (("-E", "2026-10-31"), [101]),
])
def test_selection_like_sacct(dbs: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                              flags: tuple[str, ...], jobs: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    import time
    time.tzset()
    args = list(flags)
    if "-S" not in args:
        args += ["-S", "2026-01-01"]
    code, out, err = run(capsys, "--db-dir", str(dbs[0].parent), "-n", "-P", "-o", "JobID", *args)
    assert code == 0, err
    assert [int(x) for x in out.split()] == jobs


def test_states_select_what_was_in_that_state_in_the_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """sacct: with -s and no -S the window is now (only jobs running now can match); a terminal
    state matches a job that ended in the window, `running` one that ran during it.
    Was: `-s CD` listed every completed job ever."""
    db = store.connect(tmp_path / "n1.db")
    now = datetime.now(timezone.utc)
    iso = lambda t: t.strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: E731
    _job(db, 1, "n1", "a", "x", "p", iso(now - timedelta(days=3)), iso(now - timedelta(days=3, minutes=-5)), "completed", {})
    _job(db, 2, "n1", "a", "x", "p", iso(now - timedelta(hours=1)), None, "running", {})
    _job(db, 3, "n1", "a", "x", "p", iso(now - timedelta(hours=2)), iso(now - timedelta(minutes=10)), "completed", {})
    _job(db, 4, "n1", "a", "x", "p", iso(now - timedelta(hours=2)), iso(now - timedelta(minutes=20)), "lost", {})
    db.close()
    monkeypatch.setenv("NETACCT_CONFIG", "/dev/null")
    base = ("--db", str(tmp_path / "n1.db"), "-n", "-P", "-o", "JobID")
    jobs = lambda *a: run(capsys, *base, *a)[1].split()  # noqa: E731
    assert jobs("-s", "CD") == []
    assert jobs("-s", "R") == ["2"]
    assert jobs("-s", "CD,lost", "-S", "now-1hour") == []  # -E defaults to -S: the instant
    assert jobs("-s", "CD,lost", "-S", "now-1hour", "-E", "now") == ["3", "4"]
    assert jobs("-s", "lost", "-S", "now-1hour", "-E", "now") == ["4"]
    assert jobs("-s", "CD", "-S", "now-4days", "-E", "now") == ["1", "3"]
    assert jobs("-s", "R,CD", "-S", "now-4days", "-E", "now") == ["1", "2", "3", "4"]  # 4 ran in the window too
    assert jobs("-s", "R", "-S", "now-4days", "-E", "now-2days") == ["1"]  # it was running then
    assert jobs("-j", "1,3", "-s", "CD") == ["1", "3"]  # with -j, -S defaults to the epoch, -E to now
    code, out, err = run(capsys, *base, "-s", "CD", "-E", "now-1day")  # -S defaults to now: after -E
    assert code == 2 and out == "" and err.startswith("netacct-report: -S/--starttime (") and "is after -E" in err


def test_default_window_is_today_unless_jobs_or_states(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    db = store.connect(tmp_path / "n1.db")
    now = datetime.now(timezone.utc)
    iso = lambda t: t.strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: E731
    midnight_utc = datetime.now().replace(hour=0, minute=0, second=0, microsecond=0).astimezone(timezone.utc)
    _job(db, 1, "n1", "a", "x", "p", iso(midnight_utc - timedelta(days=3)), iso(midnight_utc - timedelta(days=3) + timedelta(minutes=5)), "completed", {})
    _job(db, 2, "n1", "a", "x", "p", iso(midnight_utc + timedelta(seconds=1)),
         iso(max(now - timedelta(seconds=2), midnight_utc + timedelta(seconds=1))), "completed", {})
    db.close()
    monkeypatch.setenv("NETACCT_CONFIG", "/dev/null")
    base = ("--db", str(tmp_path / "n1.db"), "-n", "-P", "-o", "JobID")
    assert run(capsys, *base)[1].split() == ["2"]
    assert run(capsys, *base, "-S", "now-7days")[1].split() == ["1", "2"]
    assert run(capsys, *base, "-j", "1")[1].split() == ["1"]
    assert run(capsys, *base, "-s", "CD")[1].split() == []  # -s without -S: the instant now, as sacct


RATES = """
currency = "EUR"
[price]
lan_in = "0.001"
lan_out = "0.002"
wan_in = 0.01
wan_out = "0.09"
"""


def test_rates_cost_per_job_and_total(dbs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = tmp_path / "rates.toml"
    r.write_text(RATES)
    code, out, err = run(capsys, "--db-dir", str(dbs[0].parent), *ALL, "--rates", str(r), "-P", "-o", "JobID,Cost")
    # 101: 3 GB in * 0.01 + 0.5 GB out * 0.09 + 1000 B * 0.001/GB + 2000 B * 0.002/GB = 0.075005 -> 0.08
    # 102: 1024 * 0.01/1e9 + 2048 * 0.09/1e9 = 0.0000002... -> 0.00; 104 still runs: not billed
    assert out == "JobID|Cost(EUR)\n101|0.08\n102|0.00\n103|0.00\n"
    assert err == "netacct-report: note: 1 running jobs are not billed (a job is billed in the period it ends)\n"
    code, out, _ = run(capsys, "--db-dir", str(dbs[0].parent), *ALL, "--rates", str(r), "-j", "101,102", "-o", "JobID,Cost")
    assert out.splitlines()[-2:] == ["----- ---------", "Total      0.08"]


def test_group_by_account_and_month_with_rates(dbs: tuple[Path, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    r = tmp_path / "rates.toml"
    r.write_text(RATES.replace('wan_out = "0.09"', 'wan_out = "10"'))
    code, out, _ = run(capsys, "--db-dir", str(dbs[0].parent), *ALL, "--rates", str(r), "--group-by", "account",
                       "-P", "-o", "Account,Jobs,WAN_In,WAN_Out,Cost")
    # physics: jobs 101 and 103; WAN out 0.5 GB * 10 = 5 + WAN in 3 GB * 0.01 = 0.03 + LAN bytes ~0 -> 5.03
    assert out == ("Account|Jobs|WAN_In|WAN_Out|Cost(EUR)\n"  # carol's running job 104 is not billed
                   "chem|1|1024|2048|0.00\n"
                   "physics|2|3000000000|500000000|5.03\n")
    code, out, _ = run(capsys, "--db-dir", str(dbs[0].parent), *ALL, "--group-by", "month", "--json")
    groups = json.loads(out)
    assert [(g["key"], g["jobs"]) for g in groups] == [(["2026-10"], 1), (["2026-11"], 2)]
    code, out, _ = run(capsys, "--db-dir", str(dbs[0].parent), *ALL, "--group-by", "account,month", "-P",
                       "-o", "Account,Month,Jobs,LAN_In")
    assert out == ("Account|Month|Jobs|LAN_In\nchem|2026-11|1|0\n"
                   "physics|2026-10|1|1000\nphysics|2026-11|1|12\n")
    assert run(capsys, "--db-dir", str(dbs[0].parent), "--group-by", "account,colour")[0] == 2
    code, out, _ = run(capsys, "--db-dir", str(dbs[0].parent), *ALL, "--group-by", "node", "-P", "-o", "Node,Jobs,LAN_In")
    assert out == "Node|Jobs|LAN_In\nn1|3|1005\nn2|1|7\n"


def test_private_data_for_sudo_callers(dbs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SUDO_USER", "bob")
    monkeypatch.setenv("SUDO_UID", "1234")
    base = ("--db-dir", str(dbs[0].parent), *ALL, "-n", "-P", "-o", "JobID")
    assert run(capsys, *base)[1].split() == ["102"]
    code, _, err = run(capsys, *base, "-u", "alice")
    assert code == 9 and err.strip() == "netacct-report: bob may see only their own jobs (config [report] private = true)"
    assert run(capsys, *base, "-a")[0] == 9
    monkeypatch.setenv("SUDO_USER", "dave")  # a report admin
    assert run(capsys, *base)[1].split() == ["101", "102", "103", "104"]


def test_private_data_refuses_other_users_jobs_by_id_and_filters_accounts(
        dbs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Was: `-j` of another user's job and `-A ACCOUNT` gave empty output and exit 0 ("no traffic")."""
    monkeypatch.setenv("SUDO_USER", "bob")  # bob's only job is 102 (account chem)
    monkeypatch.setenv("SUDO_UID", "1234")
    base = ("--db-dir", str(dbs[0].parent), *ALL, "-n", "-P", "-o", "JobID")
    refused = ("netacct-report: job {} is another user's: bob may see only their own jobs "
               "(config [report] private = true)\n")
    assert run(capsys, *base, "-j", "101") == (9, "", refused.format(101))
    assert run(capsys, *base, "-j", "104,102,103") == (9, "", refused.format(103))  # the first such job
    assert run(capsys, *base, "--jobs=102", "-j", "104", "--group-by", "user") == (9, "", refused.format(104))
    assert run(capsys, *base, "-j", "102") == (0, "102\n", "")
    assert run(capsys, *base, "-j", "102,999") == (0, "102\n", "")  # a job no database holds: nothing to hide
    assert run(capsys, *base, "-u", "bob") == (0, "102\n", "")
    assert run(capsys, *base, "-A", "chem") == (0, "102\n", "")  # -A filters the caller's own jobs
    assert run(capsys, *base, "-A", "physics") == (0, "", "")
    assert run(capsys, *base, "-u", "bob,alice")[0] == 9
    assert run(capsys, *base, "--allusers")[0] == 9
    monkeypatch.setenv("SUDO_USER", "dave")  # a report admin sees any job
    assert run(capsys, *base, "-j", "101") == (0, "101\n", "")


@pytest.mark.parametrize("argv, code, msg", [
    (("-S", "yesterday-ish"), 2, "netacct-report: -S/--starttime: unrecognised time 'yesterday-ish'"),
    (("-o", "JobID,Nope"), 2, "netacct-report: -o/--format: unknown field 'Nope'"),
    (("-s", "pending"), 2, "netacct-report: -s/--state: unknown state 'pending'"),
    (("-j", "12x"), 4, "netacct-report: -j/--jobs: job id '12x' is not a positive decimal number"),
    (("-P", "--json"), 2, "netacct-report: choose one of -p, -P, --json, --csv"),
    (("--json", "--units", "M"), 2, "netacct-report: --units cannot be used with --json (JSON always has exact byte counts)"),  # was ignored
    (("--db", "/nonexistent.db"), 8, "netacct-report: database /nonexistent.db: No such file or directory"),
])
def test_errors_are_one_line_with_documented_codes(dbs: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                                                   argv: tuple[str, ...], code: int, msg: str) -> None:
    rc, out, err = run(capsys, "--db-dir", str(dbs[0].parent), *argv)
    assert rc == code and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith(msg), err


def test_bad_rates_file(dbs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = tmp_path / "r.toml"
    for body, fragment in (("[price]\nwan_out = -1\n", "price.wan_out"), ("[price]\nwan_sideways = 1\n", "price.wan_sideways"),
                           ("unit = 'GiB'\ncolour = 1\n[price]\nwan_out = 1\n", "unknown key 'colour'"),
                           ("[price]\nwan_out = 'cheap'\n", "price.wan_out")):
        r.write_text(body)
        rc, _, err = run(capsys, "--db-dir", str(dbs[0].parent), "--rates", str(r))
        assert rc == 3 and fragment in err and len(err.strip().splitlines()) == 1


def test_rates_must_price_exactly_the_report_classes(dbs: tuple[Path, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Was: a misspelt class (`wann_out`) was accepted and that traffic silently cost 0."""
    r = tmp_path / "r.toml"
    d = ("--db-dir", str(dbs[0].parent), *ALL, "-P", "-o", "JobID,Cost")
    r.write_text(RATES + 'wann_out = "100"\n')
    assert run(capsys, *d, "--rates", str(r)) == (
        3, "", f"netacct-report: rates file {r}: key 'price.wann_out': 'wann' is not a traffic class "
               "(known: lan, wan)\n")
    r.write_text(RATES.replace('wan_in = 0.01\n', ''))
    assert run(capsys, *d, "--rates", str(r)) == (
        3, "", f"netacct-report: rates file {r}: key 'price.wan_in' is missing: every class and direction "
               "needs a price (a rate of 0 must be written as 0)\n")
    r.write_text(RATES.replace('wan_in = 0.01', 'wan_in = 0'))
    assert run(capsys, *d, "--rates", str(r))[0] == 0
    # A class found in a database (configured once, since removed) must be priced too.
    extra = store.connect(dbs[0].parent / "n3.db")
    _job(extra, 105, "n3", "alice", "physics", "batch", "2026-11-03T00:00:00Z", "2026-11-03T01:00:00Z",
         "completed", {"hpc": (10**9, 0, 1, 0)})
    extra.close()
    err = run(capsys, *d, "--rates", str(r))[2]
    assert err == (f"netacct-report: rates file {r}: key 'price.hpc_in' is missing: every class and direction "
                   "needs a price (a rate of 0 must be written as 0)\n")
    r.write_text(RATES + 'hpc_in = "2"\nhpc_out = "0"\n')
    assert run(capsys, *d, "--rates", str(r), "-j", "105") == (0, "JobID|Cost(EUR)\n105|2.00\n", "")


def test_database_is_opened_read_only(dbs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    before = dbs[0].read_bytes()
    os.chmod(dbs[0], 0o444)  # a write would fail: the report must not try one
    try:
        code, out, err = run(capsys, "--db", str(dbs[0]), *ALL, "-P", "-n", "-o", "JobID")
    finally:
        os.chmod(dbs[0], 0o600)
    with sqlite3.connect(dbs[0]) as conn:
        ids = [str(j) for (j,) in conn.execute("SELECT DISTINCT job_id FROM jobs ORDER BY job_id")]
    assert (code, err) == (0, "") and out.split() == ids and len(ids) == 3
    assert dbs[0].read_bytes() == before
    assert not os.path.exists(f"{dbs[0]}-journal")
    with sqlite3.connect(dbs[0]) as conn:
        assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone() == (3,)


def test_parallel_aggregation_equals_the_single_process_one(tmp_path: Path) -> None:
    report = _report_api()
    import random
    rng = random.Random(7)
    paths = []
    for n in range(3):
        db = store.connect(tmp_path / f"n{n}.db")
        for j in range(1, 200):
            if rng.random() < 0.5:  # about half the jobs on each node: many span nodes
                _job(db, j, f"n{n}", f"u{j % 5}", f"a{j % 3}", "p", f"2026-{1 + j % 12:02d}-01T00:00:00Z",
                     f"2026-{1 + j % 12:02d}-01T01:00:00Z", "completed",
                     {"lan": tuple(rng.randrange(10**6) for _ in range(4)), "wan": tuple(rng.randrange(10**6) for _ in range(4))})
        db.close()
        paths.append(tmp_path / f"n{n}.db")
    classes = ["lan", "wan"]
    for by in (("account",), ("account", "month"), ("node", "user")):
        single = report.aggregate(report.iter_jobs(paths, report.Query(), classes), by)
        multi = report.aggregate_parallel(paths, report.Query(), classes, by, workers=3, min_span=0)
        assert [(g.key, g.jobs, g.vec) for g in single] == [(g.key, g.jobs, g.vec) for g in multi]
        assert sum(g.jobs for g in single) >= 150


# --------------------------------------------------------------------------- fuzzing the command line

_FIELDS = ["JobID", "User", "Account", "Partition", "NodeList", "NNodes", "Start", "End", "State", "AsOf",
           "LAN_In", "WAN_OutPkts", "TotalIn", "totalout", "Cost", "Jobs", "Month", "Node", "jobid"]
_HOSTILE = st.one_of(
    st.sampled_from(["", " ", "-", "--", ",", ",,", "%", "%5", "a,b", "-5", "-0", "0", "+1", "1e9", "nan", "inf",
                     "9" * 30, "-" + "9" * 30, "9" * 5000, "/", "/nonexistent", "../x", "~", "$HOME", "\t", "a\nb",
                     "\r", "\u2028", "\x85", "\x1b[31m", "ünïcødé", "日本", "١٢٣", "﷽", "\udcff"]),
    st.text(alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=20),
    st.binary(max_size=12).filter(lambda b: b"\x00" not in b).map(os.fsdecode),  # argv as the OS hands it over
    st.integers().map(str),
)


def _argv_strategy(paths: dict[str, str], hostile: st.SearchStrategy[str]) -> st.SearchStrategy[list[str]]:
    """A command line of netacct-report's real flags with plausible values and, three
    times in four, a `hostile` one instead (st.nothing(): plausible values only)."""

    def _mostly(plausible: list[str] | st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        good = st.sampled_from(plausible) if isinstance(plausible, list) else plausible
        return st.one_of(good, good, good, hostile)

    def _csv_of(elements: list[str] | st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        return st.lists(_mostly(elements), min_size=1, max_size=3).map(",".join)

    width = st.one_of(st.integers(min_value=0, max_value=40), st.integers(min_value=0), st.just(10**30))
    field = st.one_of(st.sampled_from(_FIELDS), st.builds(lambda f, w: f"{f}%{w}", st.sampled_from(_FIELDS), width))
    time = st.one_of(
        st.sampled_from(["2026-01-01", "2026-11-02T08:30", "0001-01-01", "9999-12-31T23:59:59", "0999-01-01", "1125",
                         "112526", "11/25-08:00", "11.25.26", "08:00", "12:00PM", "13:00PM", "midnight", "noon",
                         "fika", "teatime", "now", "today", "2026-02-30", "0000-01-01", "24:00", "now-7days"]),
        st.builds(lambda sign, n, unit: f"now{sign}{n}{unit}", st.sampled_from("+-"),
                  st.one_of(st.integers(min_value=0, max_value=10**4), st.integers(min_value=0)),
                  st.sampled_from(["", "s", "minutes", "hours", "days", "weeks", "fortnights"])))
    values: dict[str, st.SearchStrategy[str]] = {
        "-j": _csv_of(["101", "102", "103", "104", "1", "4294967294"]),
        "-u": _csv_of(["alice", "bob", "carol", "dave", "root"]),
        "-A": _csv_of(["physics", "chem"]),
        "-r": _csv_of(["batch", "gpu"]),
        "-N": _csv_of(["n1", "n2"]),
        "-s": _csv_of(["R", "CD", "running", "completed", "lost", "reconciled"]),
        "-S": _mostly(time), "-E": _mostly(time),
        "-o": _csv_of(field),
        "--units": _mostly(list("KMGTP")),
        "--group-by": _csv_of(["user", "account", "partition", "node", "day", "month"]),
        "--rates": _mostly([paths["rates"], paths["rates"], paths["bad-rates"], paths["binary"], paths["tmp"],
                            paths["missing"], paths["null"]]),
        "--statement": _mostly([paths["tmp"] + "/s.html", paths["tmp"] + "/s.csv", paths["tmp"] + "/s.pdf",
                                paths["missing"] + "/s.csv", paths["dir"]]),
        "--db": _mostly(sorted(paths.values())),
        "--db-dir": _mostly([paths["dir"], paths["odd-dir"], paths["tmp"], paths["n1"], paths["missing"]]),
    }
    aliases = {"-j": "--jobs", "-u": "--user", "-A": "--accounts", "-r": "--partition", "-N": "--nodelist",
               "-S": "--starttime", "-E": "--endtime", "-s": "--state", "-o": "--format"}

    def spellings(flag: str, value: str) -> st.SearchStrategy[list[str]]:  # -j 1, -j1, --jobs 1, --jobs=1
        long = aliases.get(flag, flag)
        forms = [[long, value], [f"{long}={value}"]] + ([[flag, value], [flag + value]] if flag != long else [])
        return st.sampled_from(forms)

    with_value = st.sampled_from(sorted(values)).flatmap(
        lambda flag: values[flag].flatmap(lambda value: spellings(flag, value)))
    switches = st.sampled_from(["-a", "-p", "-P", "-n", "--json", "--csv", "--per-node", "--helpformat", "--allusers",
                                "--parsable2", "--noheader", "-pn", "--gr", "--db-d", "--", "-h", "--overwrite"]).map(lambda s: [s])
    part = st.one_of(with_value, with_value, switches)
    stray = st.one_of(st.just([]), st.just([]), st.just([]), hostile.map(lambda s: [s]))  # a stray word, at times
    source = st.sampled_from([["--db-dir", paths["dir"]], ["--db", paths["n1"], "--db", paths["n2"]], []])
    return st.builds(lambda src, parts, i, extra: src + [a for p in parts[:i] + [extra] + parts[i:] for a in p],
                     source, st.lists(part, max_size=5), st.integers(0, 5), stray)


@pytest.fixture
def fuzz_paths(dbs: tuple[Path, Path], tmp_path: Path) -> dict[str, str]:
    (tmp_path / "rates.toml").write_text(RATES)
    (tmp_path / "bad-rates.toml").write_text("[price]\nwan_out = -1\n")
    (tmp_path / "binary").write_bytes(bytes(range(256)) * 4)  # neither UTF-8 text nor a database
    (tmp_path / "text.db").write_text("not a database\n")
    odd = tmp_path / os.fsdecode(b"odd ?#%41 \xff")  # URI characters and a byte that is not UTF-8
    odd.mkdir()
    (odd / os.fsdecode(b"n1?#%2e\xff.db")).write_bytes(dbs[0].read_bytes())
    return {"odd-dir": str(odd), "odd-db": str(odd / os.fsdecode(b"n1?#%2e\xff.db")),
            "n1": str(dbs[0]), "n2": str(dbs[1]), "dir": str(dbs[0].parent), "rates": str(tmp_path / "rates.toml"),
            "bad-rates": str(tmp_path / "bad-rates.toml"), "binary": str(tmp_path / "binary"),
            "text": str(tmp_path / "text.db"), "tmp": str(tmp_path), "missing": str(tmp_path / "missing.db"),
            "null": "/dev/null"}


def run_isolated(argv: list[str]) -> tuple[int, str, str]:
    """report_main in-process, with stdout/stderr encoded as a real UTF-8 terminal would
    (stdout strict, stderr backslashreplace, as CPython sets them up): (exit code, out, err)."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", newline="", write_through=True)
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace", newline="", write_through=True)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            report_cli.main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else -1)
    return (code, out.buffer.getvalue().decode("utf-8"),  # type: ignore[attr-defined]
            err.buffer.getvalue().decode("utf-8"))  # type: ignore[attr-defined]


def test_any_command_line_succeeds_or_fails_on_one_line_with_a_documented_code(
        fuzz_paths: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """For any argv: exit 0 with nothing on stderr but notes and warnings (one line each,
    'netacct-report: note: ' or 'netacct-report: warning: '), or exactly one line on stderr
    (prefixed 'netacct-report: '), nothing on stdout, and a documented exit code other than 1 (a bug).

    NETACCT_FUZZ_EXAMPLES=20000 runs a longer campaign (~4 minutes)."""
    seen: collections.Counter[int] = collections.Counter()
    p = fuzz_paths

    @settings(max_examples=int(os.environ.get("NETACCT_FUZZ_EXAMPLES", "300")), deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(argv=st.one_of(_argv_strategy(p, _HOSTILE), _argv_strategy(p, st.nothing())),
           sudo=st.sampled_from([None, None, "bob", "dave"]))
    # Each of these but the last two once ended in a traceback or a multi-line error:
    @example(argv=["--db-dir", p["dir"], "a\nb"], sudo=None)  # argparse echoes a stray word as typed
    @example(argv=["--db-dir", p["dir"], "--rates", p["binary"]], sudo=None)  # UnicodeDecodeError
    @example(argv=["--db-dir", p["dir"], "-S", "now+1400000000days"], sudo=None)  # OverflowError (timedelta)
    @example(argv=["--db-dir", p["dir"], "-E", "now+3000000days"], sudo=None)  # OverflowError (datetime)
    @example(argv=["--db-dir", p["dir"], "-S", "0001-01-01"], sudo=None)  # astimezone: year 0 is out of range
    @example(argv=["--db-dir", p["dir"], "-A", "\udcff"], sudo=None)  # sqlite3 cannot bind a surrogate escape
    @example(argv=["--db=--"], sudo=None)  # argparse stores [] for an option's value "--"
    @example(argv=["--db-dir", p["dir"], "-j--"], sudo=None)
    @example(argv=["--db-dir", p["dir"], "-S", "2026-01-01", "-o", f"JobID%{10**30}"], sudo=None)  # str.ljust
    @example(argv=["--db-dir", p["dir"], "-S", "now-" + "9" * 5000], sudo=None)  # int() refuses 5000 digits
    @example(argv=["--db", p["odd-db"], "-S", "2026-01-01"], sudo=None)  # see test_database_path_is_a_path_not_a_uri
    def check(argv: list[str], sudo: str | None) -> None:
        if sudo is None:
            monkeypatch.delenv("SUDO_USER", raising=False)
            monkeypatch.delenv("SUDO_UID", raising=False)
        else:  # undone at the test's end: the environment is back as it was
            monkeypatch.setenv("SUDO_USER", sudo)
            monkeypatch.setenv("SUDO_UID", "4321")
        code, out, err = run_isolated(argv)
        seen[code] += 1
        if code == 0:
            assert all(line.startswith(("netacct-report: note: ", "netacct-report: warning: "))
                       for line in err.splitlines()) and (err == "" or err.endswith("\n")), (argv, err)
            return
        assert code in EXIT_CODES and code != 1, (argv, code, err)
        assert err.startswith("netacct-report: ") and err.endswith("\n") and len(err.splitlines()) == 1, (argv, err)
        assert out == "", (argv, out)

    check()
    # The strategy reaches both sides of the contract, and often (~35% successes, ~50% usage errors).
    total = sum(seen.values())
    assert seen[0] >= total // 20 and seen[2] >= total // 20, seen


def test_database_path_is_a_path_not_a_uri(dbs: tuple[Path, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """'?', '#' and '%' are file name characters, and a name need not be UTF-8 (was: opened
    the database named by the path's prefix, or failed)."""
    odd = tmp_path / os.fsdecode(b"odd ?#%41 \xff")
    odd.mkdir()
    copy = odd / os.fsdecode(b"n1?#%2e\xff.db")
    copy.write_bytes(dbs[0].read_bytes())
    want = run(capsys, "--db", str(dbs[0]), *ALL, "-P", "-o", "JobID,LAN_In,WAN_Out")
    assert want[0] == 0 and want[1].count("\n") == 4  # header and jobs 101, 102, 103
    assert run(capsys, "--db", str(copy), *ALL, "-P", "-o", "JobID,LAN_In,WAN_Out") == want
    assert run(capsys, "--db-dir", str(odd), *ALL, "-P", "-o", "JobID,LAN_In,WAN_Out") == want


def test_years_before_1000_compare_as_times(dbs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """-S 0999-01-01 selects every job (was: '999-01-01T00:00:00Z', which sorts after 2026)."""
    code, out, err = run(capsys, "--db-dir", str(dbs[0].parent), "-S", "0999-01-01", "-n", "-P", "-o", "JobID")
    assert code == 0, err
    assert out.split() == ["101", "102", "103", "104"]


# --------------------------------------------------------------------------- issue 18

def _copies(tmp_path: Path) -> tuple[Path, Path]:
    """Two copies of node n1's database: an old one where job 77 still runs with a 10-byte
    sample, and the current one where it completed with 7 GB in and 9 GB out."""
    old = store.connect(tmp_path / "a-old.db")
    _job(old, 77, "n1", "alice", "physics", "batch", "2026-11-20T08:00:00Z", None, "running",
         {"wan": (10, 10, 1, 1)}, sampled_at="2026-11-20T08:01:00Z")
    _job(old, 78, "n1", "alice", "physics", "batch", "2026-11-20T08:00:00Z", "2026-11-20T09:00:00Z", "completed",
         {"wan": (5, 5, 1, 1)})
    old.close()
    new = store.connect(tmp_path / "b-new.db")
    _job(new, 77, "n1", "alice", "physics", "batch", "2026-11-20T08:00:00Z", "2026-11-21T08:00:00Z", "completed",
         {"wan": (7_000_000_000, 9_000_000_000, 700, 900)})
    _job(new, 78, "n1", "alice", "physics", "batch", "2026-11-20T08:00:00Z", "2026-11-20T09:00:00Z", "completed",
         {"wan": (5, 5, 1, 1)})
    new.close()
    return tmp_path / "a-old.db", tmp_path / "b-new.db"


def test_the_most_final_copy_of_a_node_row_wins_whatever_the_order(dbs: tuple[Path, Path], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Was: the copy that sorted first won (`running|10|10` from --db-dir), no warning."""
    d = tmp_path / "copies"
    d.mkdir()
    old, new = _copies(d)
    want = "77|completed|7000000000|9000000000\n"
    warning = ("netacct-report: warning: 1 job rows differ between database copies (first: job 77 on n1); "
               "the most final copy is used\n")
    fmt = ("-n", "-P", "-o", "JobID,State,WAN_In,WAN_Out", "-j", "77")
    for argv in (("--db-dir", str(d)), ("--db", str(old), "--db", str(new)), ("--db", str(new), "--db", str(old))):
        code, out, err = run(capsys, *argv, *fmt)
        assert (code, out, err) == (0, want, warning), argv
    code, out, err = run(capsys, "--db-dir", str(d), "-n", "-P", "-o", "JobID,WAN_In", "-j", "78")
    assert (code, out, err) == (0, "78|5\n", "")  # identical copies: no warning
    code, out, err = run(capsys, "--db-dir", str(d), "-j", "77,78", "--json", "--group-by", "user")
    assert json.loads(out)[0]["traffic"]["wan"]["in_bytes"] == 7_000_000_005 and err == warning


@pytest.mark.parametrize("a, b, winner", [
    # (state, end, sampled_at, wan in bytes) of two copies of one (job, node, run) row
    (("running", None, "2026-11-20T08:01:00Z", 10), ("completed", "2026-11-21T00:00:00Z", None, 99), 99),
    (("running", None, "2026-11-20T08:01:00Z", 10), ("lost", "2026-11-21T00:00:00Z", "2026-11-20T09:00:00Z", 50), 50),
    (("reconciled", "2026-11-22T00:00:00Z", None, 60), ("completed", "2026-11-21T00:00:00Z", None, 99), 60),
    (("running", None, "2026-11-20T08:01:00Z", 10), ("running", None, "2026-11-20T08:02:00Z", 20), 20),
    (("completed", "2026-11-21T00:00:00Z", None, 1), ("completed", "2026-11-21T00:00:00Z", None, 2), "first"),
])
def test_copies_rank_terminal_then_later_end_or_sample(tmp_path: Path, a: tuple[str, str | None, str | None, int],
                                                       b: tuple[str, str | None, str | None, int],
                                                       winner: int | str) -> None:
    report = _report_api()
    paths = []
    for name, (state, end, sampled, n) in (("x.db", a), ("y.db", b)):
        db = store.connect(tmp_path / name)
        _job(db, 5, "n1", "u", "a", "p", "2026-11-20T08:00:00Z", end, state, {"wan": (n, 0, 1, 0)}, sampled_at=sampled)
        db.close()
        paths.append(tmp_path / name)
    for order in (paths, paths[::-1]):
        notes = report.Notes()
        [rec] = report.iter_jobs(order, report.Query(), ["wan"], notes)
        first = a[3] if order == paths else b[3]
        assert rec.traffic["wan"]["in_bytes"] == (first if winner == "first" else winner)
        assert (notes.differing, notes.first_differing) == (1, (5, "n1"))


def test_parallel_aggregation_resolves_copies_and_counts_them_alike(tmp_path: Path) -> None:
    report = _report_api()
    old, new = _copies(tmp_path)
    for j in range(1000, 1100):  # more jobs, so that the id range is split between workers
        for path, n in ((old, 1), (new, 2)):
            db = store.connect(path)
            _job(db, j, "n1", "bob", "chem", "p", "2026-11-20T08:00:00Z", "2026-11-20T09:00:00Z", "completed",
                 {"wan": (n if j % 10 == 0 else 3, 0, 1, 0)})
            db.close()
    paths = [old, new]
    single_notes, multi_notes = report.Notes(), report.Notes()
    single = report.aggregate(report.iter_jobs(paths, report.Query(), ["wan"], single_notes), ("user",))
    multi = report.aggregate_parallel(paths, report.Query(), ["wan"], ("user",), workers=2, min_span=0,
                                      notes=multi_notes)
    assert [(g.key, g.jobs, g.vec) for g in single] == [(g.key, g.jobs, g.vec) for g in multi]
    assert [g.vec[0] for g in single] == [7_000_000_005, 90 * 3 + 10 * 1]  # alice; bob: the first copy of a tie
    assert (single_notes.differing, single_notes.first_differing) == (11, (77, "n1"))
    assert (multi_notes.differing, multi_notes.first_differing) == (11, (77, "n1"))


def test_billing_counts_each_job_once_in_the_period_it_ended(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Was: a job running from October into November was billed, in full, in both months."""
    import time
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    n1, n2 = store.connect(tmp_path / "n1.db"), store.connect(tmp_path / "n2.db")
    G = 10**9
    _job(n1, 1, "n1", "alice", "physics", "batch", "2026-10-20T00:00:00Z", "2026-11-03T00:00:00Z", "completed",
         {"lan": (1, 2, 1, 1), "wan": (10 * G, G, 10, 1)})  # October into November
    _job(n1, 2, "n1", "alice", "physics", "batch", "2026-10-05T00:00:00Z", "2026-10-06T00:00:00Z", "completed",
         {"lan": (0, 0, 0, 0), "wan": (3 * G, 7 * G, 3, 7)})
    _job(n1, 3, "n1", "bob", "chem", "batch", "2026-11-10T00:00:00Z", "2026-11-11T00:00:00Z", "completed",
         {"lan": (5 * G, 0, 5, 0), "wan": (G, G, 1, 1)})
    _job(n1, 4, "n1", "bob", "chem", "batch", "2026-10-31T23:00:00Z", "2026-10-31T23:59:59Z", "lost",
         {"lan": (0, 0, 0, 0), "wan": (G // 3, G // 7, 1, 1)})  # the last second of October
    _job(n1, 5, "n1", "bob", "chem", "batch", "2026-10-31T23:30:00Z", "2026-11-01T00:00:00Z", "reconciled",
         {"lan": (0, 0, 0, 0), "wan": (G // 11, G // 13, 1, 1)})  # the first second of November
    _job(n1, 6, "n1", "alice", "physics", "batch", "2026-11-20T00:00:00Z", None, "running",
         {"lan": (0, 0, 0, 0), "wan": (G, G, 1, 1)}, sampled_at="2026-11-20T01:00:00Z")  # no end: not billed
    _job(n1, 7, "n1", "alice", "chem", "batch", "2026-10-30T00:00:00Z", "2026-10-31T12:00:00Z", "completed",
         {"lan": (0, 0, 0, 0), "wan": (2 * G, 0, 2, 0)})
    _job(n2, 7, "n2", "alice", "chem", "batch", "2026-10-30T00:00:00Z", "2026-11-01T01:00:00Z", "completed",
         {"lan": (0, 0, 0, 0), "wan": (0, 2 * G, 0, 2)})  # the job ends with its last node: November
    n1.close()
    n2.close()
    rates = tmp_path / "rates.toml"
    rates.write_text(RATES)
    monkeypatch.setenv("NETACCT_CONFIG", "/dev/null")
    src = ("--db-dir", str(tmp_path))
    oct_, nov, both = (("-S", "2026-10-01", "-E", "2026-10-31T23:59:59"),
                       ("-S", "2026-11-01", "-E", "2026-11-30T23:59:59"),
                       ("-S", "2026-10-01", "-E", "2026-11-30T23:59:59"))
    note = "netacct-report: note: 1 running jobs are not billed (a job is billed in the period it ends)\n"

    def billed(window: tuple[str, ...], *more: str) -> tuple[list[dict], str]:
        code, out, err = run(capsys, *src, *window, "--rates", str(rates), "--json", *more)
        assert code == 0, err
        return json.loads(out), err

    groups = {}
    for name, window in (("oct", oct_), ("nov", nov), ("both", both)):
        groups[name], err = billed(window, "--group-by", "month")
        assert err == ("" if name == "oct" else note)
    assert [(g["key"], g["jobs"]) for g in groups["oct"]] == [(["2026-10"], 2)]  # jobs 2 and 4
    assert [(g["key"], g["jobs"]) for g in groups["nov"]] == [(["2026-11"], 4)]  # jobs 1, 3, 5 and 7
    assert groups["both"] == groups["oct"] + groups["nov"]  # each month's group is that month's run
    total = lambda gs, f: sum(f(g) for g in gs)  # noqa: E731
    for field in ("in_bytes", "out_bytes", "in_packets", "out_packets"):
        for klass in ("lan", "wan"):
            parts = [total(groups[p], lambda g: g["traffic"][klass][field]) for p in ("oct", "nov", "both")]
            assert parts[0] + parts[1] == parts[2]
    costs = [total(groups[p], lambda g: Decimal(g["cost"])) for p in ("oct", "nov", "both")]
    assert costs[0] + costs[1] == costs[2] and costs[0] > 0 and costs[1] > 0
    # Per job with --rates: the two months list disjoint jobs whose union is the two-month run.
    jobs = {name: [r["job_id"] for r in billed(w)[0]] for name, w in (("oct", oct_), ("nov", nov), ("both", both))}
    assert jobs == {"oct": ["2", "4"], "nov": ["1", "3", "5", "7"], "both": ["1", "2", "3", "4", "5", "7"]}
    per_job = {r["job_id"]: Decimal(r["cost"]) for r in billed(both)[0]}
    assert sum(per_job.values()) == sum(Decimal(r["cost"]) for w in (oct_, nov) for r in billed(w)[0])
    # The same with the grouped totals of one multi-month run against per-user groups of each month.
    code, out, _ = run(capsys, *src, *both, "--group-by", "user,day", "-P", "-n", "-o", "User,Day,Jobs")
    assert out == ("alice|2026-10-06|1\nalice|2026-11-01|1\nalice|2026-11-03|1\n"
                   "bob|2026-10-31|1\nbob|2026-11-01|1\nbob|2026-11-11|1\n")  # days of the end, UTC
    # Listing without --rates/--group-by keeps the overlap rule: job 1 ran in October too.
    code, out, err = run(capsys, *src, *oct_, "-n", "-P", "-o", "JobID")
    assert (code, out.split(), err) == (0, ["1", "2", "4", "5", "7"], "")
    # The parallel aggregation (one worker per job-id range) gives the same groups and notes.
    report = _report_api()
    q = report.Query(start="2026-10-01T00:00:00Z", end="2026-11-30T23:59:59Z", billing=True)
    paths = [tmp_path / "n1.db", tmp_path / "n2.db"]
    single_notes, multi_notes = report.Notes(), report.Notes()
    single = report.aggregate(report.iter_jobs(paths, q, ["lan", "wan"], single_notes), ("month",))
    multi = report.aggregate_parallel(paths, q, ["lan", "wan"], ("month",), workers=2, min_span=0, notes=multi_notes)
    assert [(g.key, g.jobs, g.vec) for g in single] == [(g.key, g.jobs, g.vec) for g in multi]
    assert single_notes.lines() == multi_notes.lines() == [note[len("netacct-report: "):-1]]


def _report_api() -> types.SimpleNamespace:
    """The report library as one namespace, as these tests call it."""
    return types.SimpleNamespace(aggregate=report_aggregate.aggregate,
                                 aggregate_parallel=report_aggregate.aggregate_parallel,
                                 iter_jobs=report_records.iter_jobs, Query=report_records.Query,
                                 Notes=report_records.Notes)


def test_counts_past_2_to_the_53_stay_exact(tmp_path: Path) -> None:
    """SQLite's TOTAL() is a float; the report sums as integers (found by the ledger's property test)."""
    from slurm_netacct.report import records
    from slurm_netacct.store import db as store

    db = store.connect(tmp_path / "n1.db")
    big = 2**53 + 1
    store.record_end(db, store.JobInfo(9, "n1", user="ann"), "completed",
                     {"lan": {"in_bytes": big, "out_bytes": 2**62 + 3, "in_packets": 1, "out_packets": big}})
    [rec] = records.load([tmp_path / "n1.db"], {9})
    assert rec.traffic["lan"] == {"in_bytes": big, "out_bytes": 2**62 + 3, "in_packets": 1, "out_packets": big}

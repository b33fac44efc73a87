"""netacct-report --statement: the figures equal sums of -P rows; the HTML checked as Chromium renders it.

The browser is Debian's chromium, driven by selenium through Debian's /usr/bin/chromedriver
(scripts/bootstrap --test installs both): one browser for the module, nothing downloaded.
"""

from __future__ import annotations

import collections
import csv
import io
import random
import re
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from slurm_netacct.cli import report as report_cli
from slurm_netacct.store import db as store

FIELDS = ("in_bytes", "out_bytes", "in_packets", "out_packets")
RATES = 'currency = "EUR"\n[price]\nlan_in = "0.001"\nlan_out = "0.002"\nwan_in = "0.01"\nwan_out = "0.09"\n'
NOVEMBER = ("-S", "2026-11-01T00:00:00", "-E", "2026-11-30T23:59:59")
HOSTILE = '<script>alert("x")</script>&amp;'  # an account name that must come out as text


def _job(db, job: int, node: str, user: str | None, account: str | None, start: str, end: str | None,
         state: str, traffic: dict[str, tuple[int, int, int, int]]) -> None:  # type: ignore[no-untyped-def]
    info = store.JobInfo(job_id=job, node=node, restart=0, user=user, account=account, partition="batch")
    store.record_start(db, info, f"netacct-{job}", "100.64.0.2", None, "nftables")
    t = {k: dict(zip(FIELDS, v)) for k, v in traffic.items()}
    if state == "running":
        store.record_sample(db, info, t)
    else:
        store.record_end(db, info, state, t)
    db.conn.execute('UPDATE jobs SET start=?, "end"=? WHERE job_id=? AND node=?', (start, end, job, node))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Two node databases: ~150 jobs ending through November (some multi-node), a job that ends a
    second before and one a second after it, a running job, a job without an account, a hostile name."""
    tmp = tmp_path_factory.mktemp("statement")
    d = tmp / "nodes"
    d.mkdir()
    rng = random.Random(16)
    dbs = {n: store.connect(d / f"{n}.db") for n in ("n1", "n2")}
    users = {"physics": ["alice", "bob"], "chem": ["carol"], HOSTILE: ["eve"], None: ["dan"]}
    for job in range(1, 151):
        account = rng.choice(list(users))
        user = rng.choice(users[account])
        day = rng.randrange(1, 31)
        end = f"2026-11-{day:02d}T{rng.randrange(24):02d}:{rng.randrange(60):02d}:00Z"
        for node in (["n1", "n2"] if job % 7 == 0 else [rng.choice(["n1", "n2"])]):
            traffic = {"lan": tuple(rng.randrange(10**9) for _ in FIELDS),
                       "wan": tuple(rng.randrange(10**(job % 11 + 1)) for _ in FIELDS)}
            _job(dbs[node], job, node, user, account, "2026-10-31T12:00:00Z", end, "completed", traffic)
    big = (10**12, 5 * 10**11, 10**6, 10**6)
    _job(dbs["n1"], 900, "n1", "alice", "physics", "2026-10-30T00:00:00Z", "2026-10-31T23:59:59Z", "completed",
         {"wan": big})  # October's
    _job(dbs["n1"], 901, "n1", "alice", "physics", "2026-11-30T00:00:00Z", "2026-12-01T00:00:00Z", "completed",
         {"wan": big})  # December's
    _job(dbs["n2"], 902, "n2", "bob", "physics", "2026-11-29T00:00:00Z", None, "running", {"wan": big})
    for db in dbs.values():
        db.close()
    (tmp / "rates.toml").write_text(RATES)
    (tmp / "netacct.toml").write_text(f'db = "{d}/%n.db"\n')
    yield tmp


@pytest.fixture
def env(cluster: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NETACCT_CONFIG", str(cluster / "netacct.toml"))
    monkeypatch.setenv("SLURMD_NODENAME", "login1")
    monkeypatch.setenv("TZ", "UTC")
    monkeypatch.delenv("SUDO_USER", raising=False)
    monkeypatch.delenv("SUDO_UID", raising=False)
    import time
    time.tzset()
    return cluster


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = report_cli.COMMAND.run(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def src(c: Path) -> tuple[str, ...]:
    return ("--db-dir", str(c / "nodes"), "--rates", str(c / "rates.toml"), *NOVEMBER)


CLASSES = ("lan", "wan")
BYTE_COLS = [f"{k.upper()}_{d}" for k in CLASSES for d in ("In", "Out")]


class Expected:
    """What the statement must show, from `-P` output: the per-job rows summed per account, user
    and day, and the Cost of each group as `--group-by ... -P` prints it."""

    def __init__(self, capsys: pytest.CaptureFixture[str], c: Path) -> None:
        code, out, err = run(capsys, *src(c), "-P", "-o", "JobID,User,Account,End," + ",".join(BYTE_COLS) + ",Cost")
        assert code == 0, err
        rows = list(csv.DictReader(io.StringIO(out), delimiter="|"))
        assert len(rows) == 150  # Oct's, Dec's and the running job are not November's
        self.jobs = rows
        self.account: dict[str, list[int]] = collections.defaultdict(lambda: [0] * 5)
        self.user: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0] * 5)
        self.day: dict[str, dict[str, int]] = collections.defaultdict(lambda: collections.defaultdict(int))
        for r in rows:
            acct = r["Account"] or "(none)"
            for key, table in ((acct, self.account), ((acct, r["User"]), self.user)):
                v = table[key]  # type: ignore[index]
                v[0] += 1
                for i, col in enumerate(BYTE_COLS):
                    v[1 + i] += int(r[col])
            for k in CLASSES:
                self.day[r["End"][:10]][k] += int(r[f"{k.upper()}_In"]) + int(r[f"{k.upper()}_Out"])
        self.account_cost = self._costs(capsys, c, "account")
        self.user_cost = self._costs(capsys, c, "account,user")
        code, out, _ = run(capsys, *src(c), "--group-by", "account", "-o", "Account,Cost")
        self.total_cost = out.splitlines()[-1].split()[-1]  # the table's Total line

    @staticmethod
    def _costs(capsys: pytest.CaptureFixture[str], c: Path, by: str) -> dict[tuple[str, ...], str]:
        cols = [k.capitalize() for k in by.split(",")]
        _, out, _ = run(capsys, *src(c), "--group-by", by, "-P", "-n", "-o", ",".join(cols) + ",Cost")
        return {tuple(line.split("|")[:-1]): line.split("|")[-1] for line in out.splitlines()}


def test_csv_equals_sums_of_parsable_rows(env: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    exp = Expected(capsys, env)
    out = tmp_path / "nov.csv"
    code, stdout, err = run(capsys, *src(env), "--statement", str(out))
    assert (code, stdout) == (0, "")
    assert err == "netacct-report: note: 1 running jobs are not billed (a job is billed in the period it ends)\n"
    text = out.read_bytes().decode("utf-8")
    assert text.endswith("\r\n") and "\n" not in text.replace("\r\n", "")  # RFC 4180 line ends
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert list(rows[0]) == ["PeriodStart", "PeriodEnd", "Level", "Account", "User", "Jobs", *BYTE_COLS,
                             "Cost", "Currency"]
    assert {(r["PeriodStart"], r["PeriodEnd"], r["Currency"]) for r in rows} == {
        ("2026-11-01T00:00:00Z", "2026-11-30T23:59:59Z", "EUR")}
    accounts = [r for r in rows if r["Level"] == "account"]
    assert [r["Account"] for r in accounts] == sorted(exp.account) and HOSTILE in exp.account
    for r in accounts:
        assert [int(r["Jobs"])] + [int(r[c]) for c in BYTE_COLS] == exp.account[r["Account"]]
        assert r["Cost"] == exp.account_cost[(r["Account"],)] and r["User"] == ""
    users = [r for r in rows if r["Level"] == "user"]
    assert {(r["Account"], r["User"]) for r in users} == set(exp.user)
    for r in users:
        assert [int(r["Jobs"])] + [int(r[c]) for c in BYTE_COLS] == exp.user[(r["Account"], r["User"])]
        assert r["Cost"] == exp.user_cost[(r["Account"], r["User"])]
    # per account, then its users: each account row is followed by its own users
    levels = [(r["Level"], r["Account"]) for r in rows]
    for i, (level, acct) in enumerate(levels[:-1]):
        if level == "user":
            assert levels[i - 1][1] == acct
    [total] = [r for r in rows if r["Level"] == "total"]
    assert rows[-1] is total and total["Cost"] == exp.total_cost
    assert int(total["Jobs"]) == 150
    assert [int(total[c]) for c in BYTE_COLS] == [sum(int(j[c]) for j in exp.jobs) for c in BYTE_COLS]
    assert Decimal(total["Cost"]) == sum(Decimal(r["Cost"]) for r in accounts)


def test_flags_errors_and_files(env: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    base = ("--db-dir", str(env / "nodes"), *NOVEMBER)
    rates = ("--rates", str(env / "rates.toml"))
    html, csv_ = tmp_path / "s.html", tmp_path / "s.csv"

    def refused(*argv: str, code: int = 2) -> str:
        rc, out, err = run(capsys, *argv)
        assert (rc, out) == (code, "") and err.count("\n") == 1, (argv, rc, err)
        assert list(tmp_path.iterdir()) == [] or html.read_text() == "old", list(tmp_path.iterdir())
        return err

    assert refused(*base, "--statement", str(html)) == (
        "netacct-report: --statement needs --rates FILE (a statement prices the traffic)\n")
    for flag in (["-P"], ["--json"], ["--csv"], ["-o", "JobID"], ["--group-by", "user"], ["--units", "G"],
                 ["-n"], ["--helpformat"], ["--per-node"], ["-p"]):
        assert "--statement writes its own format: not with" in refused(*base, *rates, "--statement", str(html), *flag)
    assert refused(*base, *rates, "--statement", str(tmp_path / "s.pdf")) == (
        f"netacct-report: --statement {tmp_path}/s.pdf: the name must end in .html or .csv (the format)\n")
    assert "no such directory" in refused(*base, *rates, "--statement", str(tmp_path / "no" / "s.csv"))
    assert "given twice" in refused(*base, *rates, "--statement", str(html), "--statement", str(html))
    assert refused(*base, *rates, "--overwrite") == "netacct-report: --overwrite is for --statement\n"
    bad = env / "bad-rates.toml"
    bad.write_text("[price]\nlan_in = 1\n")
    assert "rates file" in refused(*base, "--rates", str(bad), "--statement", str(html), code=3)
    # An existing file is kept, and then nothing is written (not even the other file of the run).
    html.write_text("old")
    err = refused(*base, *rates, "--statement", str(csv_), "--statement", str(html))
    assert err == f"netacct-report: --statement {html}: the file exists (give --overwrite to replace it)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.html"] and html.read_text() == "old"
    rc, _, _ = run(capsys, *base, *rates, "--statement", str(csv_), "--statement", str(html), "--overwrite")
    assert rc == 0 and html.read_text().startswith("<!DOCTYPE html>") and csv_.read_text().startswith("PeriodStart,")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv", "s.html"]  # no temporary file left
    assert oct(html.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    import os
    m = os.umask(0)
    os.umask(m)
    return m


def test_empty_period(env: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path, browser: object) -> None:
    out, page = tmp_path / "empty.csv", tmp_path / "empty.html"
    rc, _, err = run(capsys, "--db-dir", str(env / "nodes"), "--rates", str(env / "rates.toml"),
                     "-S", "2027-01-01", "-E", "2027-01-31T23:59:59", "--statement", str(out), "--statement", str(page))
    assert rc == 0 and "1 running jobs are not billed" in err  # job 902 still runs
    assert out.read_bytes().decode().splitlines()[1:] == [
        "2027-01-01T00:00:00Z,2027-01-31T23:59:59Z,total,,,0,0,0,0,0,0.00,EUR"]
    browser.get(page.as_uri())  # type: ignore[attr-defined]
    js = browser.execute_script  # type: ignore[attr-defined]
    assert js("return document.getElementById('total').innerText") == "Total: 0.00 EUR for 0 jobs"
    assert _table(browser, "table.accounts")[1:] == [["Total", "0", "0", "0", "0", "0", "0.00"]]
    assert js("return document.querySelectorAll('svg.daily rect.bar, svg.top, section.account').length") == 0
    assert js("return document.querySelectorAll('svg.daily text.day').length") == 31  # the empty days are drawn
    assert "No jobs." in js("return document.body.innerText")


# In the browser ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Headless Chromium (Debian's) through Debian's chromedriver: both paths given, so selenium
    never looks for (or downloads) a driver or a browser of its own."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1400,1000", "--force-device-scale-factor=1"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=opts)
    yield drv
    drv.quit()


def _num(text: str) -> int:
    assert re.fullmatch(r"\d{1,3}(,\d{3})*", text), text
    return int(text.replace(",", ""))


def _table(drv, css: str) -> list[list[str]]:  # type: ignore[no-untyped-def]
    """The rendered text of a table's cells, row by row (header first)."""
    return drv.execute_script(  # type: ignore[no-any-return]
        "return Array.from(document.querySelector(arguments[0]).rows)"
        ".map(r => Array.from(r.cells).map(c => c.innerText.trim()))", css)


def test_html_in_a_browser_shows_the_same_numbers(env: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                  browser: object) -> None:
    drv = browser
    exp = Expected(capsys, env)
    page = tmp_path / "nov.html"
    assert run(capsys, *src(env), "--statement", str(page))[0] == 0
    drv.get(page.as_uri())  # type: ignore[attr-defined]
    js = drv.execute_script  # type: ignore[attr-defined]
    # Self-contained and inert: nothing loaded besides the page, no script, the hostile name as text.
    assert js("return performance.getEntriesByType('resource').length") == 0
    assert js("return document.scripts.length") == 0
    assert js("return document.styleSheets.length") == 1
    assert js("return document.getElementById('total-cost').innerText") == exp.total_cost
    assert js("return document.getElementById('total-jobs').innerText") == "150"
    assert "2026-11-01T00:00:00Z to 2026-11-30T23:59:59Z" in js("return document.getElementById('period').innerText")
    assert js("return document.getElementById('source').innerText").startswith("From node databases n1.db, n2.db; made ")

    # The accounts table: its rendered text equals the sums of the -P rows.
    head, *body = _table(drv, "table.accounts")
    assert head == ["Account", "Jobs", "LAN in", "LAN out", "WAN in", "WAN out", "Cost (EUR)"]
    assert [r[0] for r in body[:-1]] == sorted(exp.account)
    for r in body[:-1]:
        assert [_num(x) for x in r[1:6]] == exp.account[r[0]], r[0]
        assert r[6] == exp.account_cost[(r[0],)]
    assert body[-1][0] == "Total" and body[-1][6] == exp.total_cost
    assert [_num(x) for x in body[-1][1:6]] == [sum(v[i] for v in exp.account.values()) for i in range(5)]

    # Each account's section: its users, then the account's total.
    sections = js("return Array.from(document.querySelectorAll('section.account')).map(s => s.dataset.account)")
    assert sections == sorted(exp.account)
    for i, acct in enumerate(sections):
        head, *body = _table(drv, f"section.account:nth-of-type({i + 1}) table")
        assert js("return document.querySelectorAll('section.account')[arguments[0]].querySelector('h2').innerText",
                  i) == f"Account {acct}"
        assert [r[0] for r in body[:-1]] == sorted(u for a, u in exp.user if a == acct)
        for r in body[:-1]:
            assert [_num(x) for x in r[1:6]] == exp.user[(acct, r[0])]
            assert r[6] == exp.user_cost[(acct, r[0])]
        assert body[-1][0] == "Account total" and [_num(x) for x in body[-1][1:6]] == exp.account[acct]
        assert body[-1][6] == exp.account_cost[(acct,)]

    # The daily chart: a bar per day and class whose bytes are the -P rows' and whose rendered
    # height is to the plot's what its bytes are to the scale's top.
    bars = js("""
        const svg = document.querySelector('svg.daily');
        const plot = svg.querySelector('rect.plot').getBoundingClientRect();
        return {top: svg.dataset.maxBytes, plot: plot.height, bottom: plot.bottom,
                bars: Array.from(svg.querySelectorAll('rect.bar')).map(b => {
                    const r = b.getBoundingClientRect();
                    return [b.dataset.day, b.dataset['class'], b.dataset.bytes, r.height, r.bottom];
                })};""")
    top, plot_h = int(bars["top"]), bars["plot"]
    assert top >= max(sum(v.values()) for v in exp.day.values())
    drawn: dict[str, dict[str, int]] = collections.defaultdict(dict)
    stack: dict[str, float] = collections.defaultdict(lambda: bars["bottom"])
    for day, klass, nbytes, height, bottom in bars["bars"]:
        drawn[day][klass] = int(nbytes)
        assert height == pytest.approx(plot_h * int(nbytes) / top, abs=0.01), (day, klass)
        assert bottom == pytest.approx(stack[day], abs=0.01)  # stacked on the class below
        stack[day] = bottom - height
    assert drawn == {d: {k: n for k, n in v.items() if n} for d, v in exp.day.items()}
    labels = js("return Array.from(document.querySelectorAll('svg.daily text.day')).map(t => t.textContent)")
    assert labels == [f"11-{d:02d}" for d in range(1, 31)]  # every day of the month, with jobs or not
    ticks = js("return Array.from(document.querySelectorAll('svg.daily text.tick')).map(t => t.textContent)")
    assert len(ticks) == 5 and ticks[0] == "0 B"

    # The top jobs: the dearest of the -P rows, bar widths in proportion to their costs.
    dearest = sorted(exp.jobs, key=lambda r: (-Decimal(r["Cost(EUR)"]),
                                              -sum(int(r[c]) for c in BYTE_COLS), int(r["JobID"])))[:10]
    got = js("""
        const svg = document.querySelector('svg.top');
        const plot = svg.querySelector('rect.plot').getBoundingClientRect();
        return {plot: plot.width, max: svg.dataset.maxCost,
                jobs: Array.from(svg.querySelectorAll('text.job')).map(t => t.textContent),
                costs: Array.from(svg.querySelectorAll('text.cost')).map(t => t.textContent),
                widths: Array.from(svg.querySelectorAll('rect.bar')).map(b => b.getBoundingClientRect().width)};""")
    assert got["jobs"] == [r["JobID"] for r in dearest]
    assert [c.split(" ")[0] for c in got["costs"]] == [r["Cost(EUR)"] for r in dearest]
    assert all(c.split(" ")[1] == "EUR" for c in got["costs"])
    top_cost = Decimal(dearest[0]["Cost(EUR)"])
    assert Decimal(got["max"]) == top_cost > 0
    for w, r in zip(got["widths"], dearest):
        assert w == pytest.approx(got["plot"] * float(Decimal(r["Cost(EUR)"]) / top_cost), abs=0.01)
    head, *body = _table(drv, "table.topjobs")
    assert [r[0] for r in body] == [r["JobID"] for r in dearest]
    assert [r[6] for r in body] == [r["Cost(EUR)"] for r in dearest]
    for row, r in zip(body, dearest):
        assert _num(row[4]) == sum(int(r[f"{k.upper()}_In"]) for k in CLASSES)
        assert _num(row[5]) == sum(int(r[f"{k.upper()}_Out"]) for k in CLASSES)

    # The rates, as the file gives them.
    assert _table(drv, "table.rates")[1:] == [["LAN", "0.001", "0.002"], ["WAN", "0.01", "0.09"]]
    shot = tmp_path / "statement.png"
    drv.save_screenshot(str(shot))  # type: ignore[attr-defined]
    assert shot.stat().st_size > 10_000  # something was drawn

"""A billing statement (netacct-report --statement): per account and user, as self-contained HTML or CSV.

The figures come from the report's own aggregation (aggregate.py, or the ledger's), in one
pass: groups by account, user and day, summed into coarser ones (aggregate.regroup), while the
dearest jobs are noted as the records go by. So each equals what `netacct-report -P` prints for
the same selection: an account's row is the row of `--group-by account`, a user's the row of
`--group-by account,user`, a day's bars the row of `--group-by day`, a job's cost the Cost of
the per-job listing with `--rates`. Costs
follow the report's rounding rule: each row priced exactly and rounded once; the statement's
total is the sum of the account costs. The HTML needs nothing from outside: inline CSS, inline
SVG charts, no script.
"""

from __future__ import annotations

import csv
import heapq
import io
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from html import escape

from .aggregate import Group, regroup
from .rates import UNITS, Rates
from .records import JobRecord

TOP_JOBS = 10  # jobs in the "top jobs by cost" chart and table
_PALETTE = ("#2b6cb0", "#dd6b20", "#2f855a", "#9b2c2c", "#6b46c1", "#b7791f", "#2c7a7b", "#702459")
_MAX_DAYS = 400  # a daily chart over a longer period shows only the days that have jobs


@dataclass
class Statement:
    """What a statement shows; the groups as the report's aggregation made them."""

    classes: list[str]
    rates: Rates
    start: str | None  # the window (UTC ISO); None: open
    end: str | None
    generated: str  # when it was made (UTC ISO)
    source: str  # where the records came from, for the reader
    accounts: list[Group]  # by ("account",)
    users: list[Group]  # by ("account", "user")
    days: list[Group]  # by ("day",)
    top_jobs: list[JobRecord]  # priced, dearest first
    notes: list[str] = field(default_factory=list)

    @property
    def total_cost(self) -> Decimal:
        """The sum of the account costs (as the report's Total of --group-by account)."""
        return sum((a.cost for a in self.accounts), Decimal(0))

    @property
    def total_vec(self) -> list[int]:
        vec = [0] * (4 * len(self.classes))
        for a in self.accounts:
            vec = [x + y for x, y in zip(vec, a.vec)]
        return vec

    @property
    def jobs(self) -> int:
        return sum(a.jobs for a in self.accounts)


KEYS = ("account", "user", "day")  # the statement's groups: each a sum of these finer ones


class TopJobs:
    """The dearest jobs of a stream of job records, found while the records pass on."""

    def __init__(self, rates: Rates, top: int = TOP_JOBS) -> None:
        self.rates = rates
        self.top = top
        self._kept: list[tuple[Decimal, int, JobRecord]] = []

    def watch(self, records: Iterable[JobRecord]) -> Iterator[JobRecord]:
        """Each record, priced (its `cost` set), after noting it; memory stays flat."""
        for rec in records:
            rec.cost = self.rates.cost(rec.traffic)
            self._kept.append((rec.cost, sum(rec.vec[0::4]) + sum(rec.vec[1::4]), rec))
            if len(self._kept) > 4 * self.top:  # only the dearest can make the list
                self._kept = heapq.nsmallest(self.top, self._kept, key=_dearest)
            yield rec

    @property
    def jobs(self) -> list[JobRecord]:
        """The dearest first (then the most bytes, then the lowest job id)."""
        return [k[2] for k in heapq.nsmallest(self.top, self._kept, key=_dearest)]


def build(fine: list[Group], top_jobs: list[JobRecord], rates: Rates, classes: list[str], start: str | None,
          end: str | None, generated: str, source: str) -> Statement:
    """A statement from the report's groups by KEYS (aggregate.aggregate's or the ledger's) and
    the dearest jobs: accounts, users and days are their sums (aggregate.regroup)."""
    return Statement(classes=classes, rates=rates, start=start, end=end, generated=generated, source=source,
                     accounts=regroup(fine, (0,), rates), users=regroup(fine, (0, 1), rates),
                     days=regroup(fine, (2,), rates), top_jobs=top_jobs)


def _dearest(p: tuple[Decimal, int, JobRecord]) -> tuple[Decimal, int, int]:
    return (-p[0], -p[1], p[2].job_id)


def _unit_name(rates: Rates) -> str:
    return next(name for name, size in UNITS.items() if size == rates.unit_bytes)


def _cost(rates: Rates, value: Decimal) -> str:
    return f"{value:.{rates.decimals}f}"


# CSV -----------------------------------------------------------------------------------------

def csv_columns(classes: list[str]) -> list[str]:
    """The CSV's header (README, "Billing statements")."""
    return (["PeriodStart", "PeriodEnd", "Level", "Account", "User", "Jobs"]
            + [f"{k.upper()}_{d}" for k in classes for d in ("In", "Out")] + ["Cost", "Currency"])


def to_csv(st: Statement) -> str:
    """One row per account, each followed by its users' rows, then the total."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\r\n")  # RFC 4180, as spreadsheets and finance systems expect
    w.writerow(csv_columns(st.classes))
    period = [st.start or "", st.end or ""]

    def row(level: str, account: str, user: str, jobs: int, vec: list[int], cost: Decimal) -> None:
        nums = [str(vec[4 * i + j]) for i in range(len(st.classes)) for j in (0, 1)]
        w.writerow([*period, level, account, user, str(jobs), *nums, _cost(st.rates, cost), st.rates.currency])

    for acct in st.accounts:
        row("account", acct.key[0], "", acct.jobs, acct.vec, acct.cost)
        for u in st.users:
            if u.key[0] == acct.key[0]:
                row("user", u.key[0], u.key[1], u.jobs, u.vec, u.cost)
    row("total", "", "", st.jobs, st.total_vec, st.total_cost)
    return out.getvalue()


# HTML ----------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1a202c;
 margin:2em auto;max-width:1100px;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #cbd5e0}
table{border-collapse:collapse;margin:.6em 0 1em}th,td{padding:.25em .6em;border-bottom:1px solid #e2e8f0}
th{text-align:left;background:#edf2f7}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
tr.total td{font-weight:600;border-top:2px solid #4a5568}.meta{color:#4a5568;margin:.2em 0}
.big{font-size:1.3em;font-weight:600}.legend span{display:inline-block;margin-right:1.2em}
.legend i{display:inline-block;width:.9em;height:.9em;margin-right:.3em;vertical-align:-.1em}
svg text{font:11px system-ui,"DejaVu Sans",sans-serif;fill:#2d3748}.note{color:#9b2c2c}
@media print{body{margin:0;max-width:none}h2{break-after:avoid}section{break-inside:avoid}}
"""


def _color(i: int) -> str:
    return _PALETTE[i % len(_PALETTE)]


def _bytes(n: int) -> str:
    return f"{n:,}"


def _si(n: float) -> str:
    """A byte count in decimal units for an axis (1.25 GB)."""
    for i, unit in enumerate(("B", "kB", "MB", "GB", "TB", "PB", "EB")):
        if n < 1000 ** (i + 1) or unit == "EB":
            return f"{n / 1000 ** i:.4g} {unit}"
    return str(n)  # pragma: no cover


def _nice(x: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten that is at least x (x > 0)."""
    p = 10 ** (len(str(x)) - 1)
    return next(m * p for m in (1, 2, 5, 10) if m * p >= x)


def _traffic_head(classes: list[str]) -> str:
    return "".join(f'<th class="n">{escape(k.upper())} in</th><th class="n">{escape(k.upper())} out</th>'
                   for k in classes)


def _traffic_cells(vec: list[int], classes: list[str]) -> str:
    return "".join(f'<td class="n">{_bytes(vec[4 * i + j])}</td>' for i in range(len(classes)) for j in (0, 1))


def _group_table(st: Statement, rows: list[Group], name: str, key: Callable[[Group], str], total_label: str,
                 total: tuple[int, list[int], Decimal], css: str) -> str:
    cur = f" ({escape(st.rates.currency)})" if st.rates.currency else ""
    out = [f'<table class="{css}"><thead><tr><th>{name}</th><th class="n">Jobs</th>{_traffic_head(st.classes)}'
           f'<th class="n">Cost{cur}</th></tr></thead><tbody>']
    for g in rows:
        out.append(f'<tr><td>{escape(key(g))}</td><td class="n">{g.jobs:,}</td>{_traffic_cells(g.vec, st.classes)}'
                   f'<td class="n">{_cost(st.rates, g.cost)}</td></tr>')
    jobs, vec, cost = total
    out.append(f'<tr class="total"><td>{total_label}</td><td class="n">{jobs:,}</td>{_traffic_cells(vec, st.classes)}'
               f'<td class="n">{_cost(st.rates, cost)}</td></tr></tbody></table>')
    return "".join(out)


def _period_days(st: Statement) -> list[str]:
    """The days of the daily chart: every day of the period (the days that have jobs beyond it)."""
    have = sorted(g.key[0] for g in st.days if g.key[0])
    first = (st.start or (have[0] if have else st.generated))[:10]
    last = (st.end or st.generated)[:10]
    try:
        a, b = date.fromisoformat(first), date.fromisoformat(last)
    except ValueError:
        return have
    if not 0 <= (b - a).days <= _MAX_DAYS:
        return have
    days = [(a + timedelta(days=i)).isoformat() for i in range((b - a).days + 1)]
    return sorted(set(days) | set(have))


def _daily_chart(st: Statement) -> str:
    """Stacked bars: the bytes (in + out) of each class per day of the jobs' end."""
    days = _period_days(st)
    by_day = {g.key[0]: g for g in st.days}
    totals = {d: sum(by_day[d].vec[0::4]) + sum(by_day[d].vec[1::4]) if d in by_day else 0 for d in days}
    top = _nice(max(totals.values(), default=0) or 1)
    left, right, upper, lower, height = 80, 10, 10, 50, 240
    plot_w = max(len(days) * 22, 600)
    w, h = left + plot_w + right, upper + height + lower
    slot = plot_w / max(len(days), 1)
    parts = [f'<svg class="chart daily" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             f'viewBox="0 0 {w} {h}" role="img" aria-label="traffic per day by class" data-max-bytes="{top}">',
             f'<rect class="plot" x="{left}" y="{upper}" width="{plot_w}" height="{height}" fill="#f7fafc"/>']
    for i in range(5):  # grid and axis labels: 0, 1/4, ... of the scale
        y = upper + height - height * i / 4
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.2f}" y2="{y:.2f}" stroke="#cbd5e0"/>'
                     f'<text class="tick" x="{left - 6}" y="{y + 4:.2f}" text-anchor="end">{_si(top * i / 4)}</text>')
    for n, d in enumerate(days):
        x = left + n * slot + slot * 0.15
        base = upper + height
        g = by_day.get(d)
        for i, k in enumerate(st.classes):
            b = (g.vec[4 * i] + g.vec[4 * i + 1]) if g else 0
            if b == 0:
                continue
            bh = height * b / top
            base -= bh
            parts.append(f'<rect class="bar" data-day="{d}" data-class="{escape(k)}" data-bytes="{b}" '
                         f'x="{x:.3f}" y="{base:.6f}" width="{slot * 0.7:.3f}" height="{bh:.6f}" fill="{_color(i)}">'
                         f'<title>{d} {escape(k)}: {_bytes(b)} bytes</title></rect>')
        if len(days) <= 31 or n % max(1, len(days) // 31) == 0:
            tx, ty = left + n * slot + slot / 2, upper + height + 8
            parts.append(f'<text class="day" x="{tx:.2f}" y="{ty}" text-anchor="end" '
                         f'transform="rotate(-60 {tx:.2f} {ty})">{d[5:]}</text>')
    parts.append("</svg>")
    legend = "".join(f'<span><i style="background:{_color(i)}"></i>{escape(k.upper())}</span>'
                     for i, k in enumerate(st.classes))
    return "".join(parts) + f'<div class="legend">{legend}</div>'


def _top_chart(st: Statement) -> str:
    """Horizontal bars: the cost of each of the dearest jobs."""
    jobs = st.top_jobs
    top = max((j.cost or Decimal(0) for j in jobs), default=Decimal(0))
    left, plot_w, row = 90, 560, 24
    w, h = left + plot_w + 190, row * len(jobs) + 10
    cur = f" {escape(st.rates.currency)}" if st.rates.currency else ""
    parts = [f'<svg class="chart top" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             f'viewBox="0 0 {w} {h}" role="img" aria-label="top jobs by cost" data-max-cost="{top}">',
             f'<rect class="plot" x="{left}" y="0" width="{plot_w}" height="{h}" fill="none"/>']
    for n, j in enumerate(jobs):
        cost = j.cost or Decimal(0)
        bw = float(plot_w * cost / top) if top else 0.0
        y = 5 + n * row
        parts.append(f'<text class="job" x="{left - 8}" y="{y + 15}" text-anchor="end">{j.job_id}</text>'
                     f'<rect class="bar" data-job="{j.job_id}" data-cost="{_cost(st.rates, cost)}" x="{left}" '
                     f'y="{y + 2}" width="{bw:.6f}" height="{row - 6}" fill="{_color(0)}">'
                     f'<title>job {j.job_id}: {_cost(st.rates, cost)}{cur}</title></rect>'
                     f'<text class="cost" x="{left + bw + 6:.3f}" y="{y + 15}">{_cost(st.rates, cost)}{cur} '
                     f'· {escape(j.user or "")} · {escape(j.account or "(none)")}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _top_table(st: Statement) -> str:
    cur = f" ({escape(st.rates.currency)})" if st.rates.currency else ""
    out = [f'<table class="topjobs"><thead><tr><th>Job</th><th>User</th><th>Account</th><th>End</th>'
           f'<th class="n">In</th><th class="n">Out</th><th class="n">Cost{cur}</th></tr></thead><tbody>']
    for j in st.top_jobs:
        out.append(f'<tr><td>{j.job_id}</td><td>{escape(j.user or "")}</td><td>{escape(j.account or "(none)")}</td>'
                   f'<td>{escape(j.end or "")}</td><td class="n">{_bytes(sum(j.vec[0::4]))}</td>'
                   f'<td class="n">{_bytes(sum(j.vec[1::4]))}</td>'
                   f'<td class="n">{_cost(st.rates, j.cost or Decimal(0))}</td></tr>')
    out.append("</tbody></table>")
    return "".join(out)


def _rates_table(st: Statement) -> str:
    unit = _unit_name(st.rates)
    cur = f"{escape(st.rates.currency)} " if st.rates.currency else ""
    rows = "".join(f'<tr><td>{escape(k.upper())}</td><td class="n">{st.rates.prices[(k, "in")]}</td>'
                   f'<td class="n">{st.rates.prices[(k, "out")]}</td></tr>' for k in st.classes)
    return (f'<table class="rates"><thead><tr><th>Class</th><th class="n">In ({cur}per {unit})</th>'
            f'<th class="n">Out ({cur}per {unit})</th></tr></thead><tbody>{rows}</tbody></table>')


def to_html(st: Statement) -> str:
    """The statement as one self-contained HTML page (inline CSS and SVG, no script)."""
    cur = escape(st.rates.currency)
    period = f'{escape(st.start or "the beginning")} to {escape(st.end or st.generated)} (UTC)'
    total = (st.jobs, st.total_vec, st.total_cost)
    sections = []
    for acct in st.accounts:
        users = [u for u in st.users if u.key[0] == acct.key[0]]
        sections.append(
            f'<section class="account" data-account="{escape(acct.key[0])}"><h2>Account {escape(acct.key[0])}</h2>'
            + _group_table(st, users, "User", lambda g: g.key[1], "Account total", (acct.jobs, acct.vec, acct.cost),
                           "users")
            + "</section>")
    notes = "".join(f'<p class="note">{escape(n)}</p>' for n in st.notes)
    return "".join([
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        f"<title>Network traffic statement {escape((st.start or '')[:10])} to {escape((st.end or st.generated)[:10])}"
        "</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Network traffic statement</h1>",
        f'<p class="meta" id="period">Jobs that ended from {period}</p>',
        f'<p class="meta" id="source">From {escape(st.source)}; made {escape(st.generated)}</p>',
        f'<p class="big" id="total">Total: <span id="total-cost">{_cost(st.rates, st.total_cost)}</span> {cur} '
        f'for <span id="total-jobs">{st.jobs:,}</span> jobs</p>',
        notes,
        "<h2>Accounts</h2>",
        _group_table(st, st.accounts, "Account", lambda g: g.key[0], "Total", total, "accounts"),
        '<p class="meta">Traffic in bytes: "in" is what the jobs received, "out" what they sent. Each cost is '
        "its row's traffic priced exactly and rounded once, half-up; the total is the sum of the account "
        "costs. A job is billed in the period in which it ended.</p>",
        "<h2>Traffic per day by class</h2>",
        '<p class="meta">Bytes in and out of the jobs that ended on each day (UTC).</p>',
        _daily_chart(st),
        f"<h2>Top {len(st.top_jobs)} jobs by cost</h2>" if st.top_jobs else "<h2>Top jobs by cost</h2><p>No jobs.</p>",
        _top_chart(st) + _top_table(st) if st.top_jobs else "",
        *sections,
        "<h2>Rates</h2>",
        _rates_table(st),
        "</body></html>\n",
    ])

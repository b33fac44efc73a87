"""Output of netacct-report: sacct-like columns as a table, -p/-P, CSV or JSON (streamed)."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TextIO

from ..errors import UsageError
from .aggregate import Group
from .rates import Rates
from .records import JobRecord
from .units import human_bytes, in_units

_JOB_FIELDS: dict[str, Callable[[JobRecord], Any]] = {
    "JobID": lambda r: str(r.job_id),
    "User": lambda r: r.user or "",
    "Account": lambda r: r.account or "",
    "Partition": lambda r: r.partition or "",
    "NodeList": lambda r: ",".join(r.nodes),
    "NNodes": lambda r: str(len(r.nodes)),
    "Start": lambda r: r.start or "Unknown",
    "End": lambda r: r.end or "Unknown",
    "State": lambda r: r.state,
    "AsOf": lambda r: ("live" if r.live else (r.as_of or "")) if r.state == "running" else "",
}
MAX_WIDTH = 1000  # the largest -o/--format %WIDTH
_METRICS = {"In": "in_bytes", "Out": "out_bytes", "InPkts": "in_packets", "OutPkts": "out_packets"}


@dataclass(frozen=True)
class Column:
    """One output column: its header, how to get the raw value, whether it holds bytes."""

    name: str
    get: Callable[[Any], Any]
    is_bytes: bool = False
    width: int | None = None


def _traffic_getter(classes: list[str], klass: str | None, metric: str) -> Callable[[Any], int]:
    offset = list(_METRICS).index(metric)
    if klass is None:
        return lambda r: sum(r.vec[offset::4])
    i = 4 * classes.index(klass) + offset
    return lambda r: r.vec[i]


def _key_getter(i: int) -> Callable[[Group], str]:
    return lambda g: g.key[i]


def available(classes: list[str], grouped: tuple[str, ...] | None, rates: Rates | None) -> dict[str, Column]:
    """Every column this report can show, by canonical name."""
    cols: dict[str, Column] = {}
    if grouped:
        for i, by in enumerate(grouped):
            cols[by.capitalize()] = Column(by.capitalize(), _key_getter(i))
        cols["Jobs"] = Column("Jobs", lambda g: str(g.jobs))
    else:
        for name, fn in _JOB_FIELDS.items():
            cols[name] = Column(name, fn)
    for klass in classes:
        for metric in _METRICS:
            name = f"{klass.upper()}_{metric}"
            cols[name] = Column(name, _traffic_getter(classes, klass, metric), metric in ("In", "Out"))
    for metric in _METRICS:
        cols[f"Total{metric}"] = Column(f"Total{metric}", _traffic_getter(classes, None, metric), metric in ("In", "Out"))
    if rates is not None:
        label = f"Cost({rates.currency})" if rates.currency else "Cost"
        cols["Cost"] = Column(label, lambda r: r.cost)
    return cols


def default_format(classes: list[str], grouped: tuple[str, ...] | None, rates: Rates | None) -> list[str]:
    base = [b.capitalize() for b in grouped] + ["Jobs"] if grouped else ["JobID", "User", "Account", "NodeList", "State"]
    base += [f"{k.upper()}_{m}" for k in classes for m in ("In", "Out")]
    return base + (["Cost"] if rates is not None else [])


def columns(spec: str | None, classes: list[str], grouped: tuple[str, ...] | None, rates: Rates | None) -> list[Column]:
    """Parse -o/--format ("JobID,User%12,lan_in"): names are case-insensitive, %N a width
    (1 to MAX_WIDTH; %0 means as wide as the values, as without %N)."""
    avail = available(classes, grouped, rates)
    by_lower = {k.lower(): v for k, v in avail.items()}
    names = spec.split(",") if spec else default_format(classes, grouped, rates)
    out: list[Column] = []
    for item in names:
        m = re.fullmatch(r"\s*([A-Za-z0-9_]+)(?:%([0-9]+))?\s*", item)
        if not m or m.group(1).lower() not in by_lower:
            raise UsageError(f"-o/--format: unknown field {item.strip()!r} "
                             f"(known: {', '.join(avail)})")
        digits = m.group(2)
        if digits and (len(digits.lstrip("0")) > len(str(MAX_WIDTH)) or int(digits) > MAX_WIDTH):
            raise UsageError(f"-o/--format: {item.strip()!r}: a width is at most {MAX_WIDTH}")
        width = int(digits) if digits else None
        col = by_lower[m.group(1).lower()]
        out.append(Column(col.name, col.get, col.is_bytes, width))
    return out


def _text(col: Column, row: Any, units: str | None, human: bool, decimals: int) -> str:
    value = col.get(row)
    if isinstance(value, Decimal):
        return f"{value:.{decimals}f}"
    if col.is_bytes:
        if units:
            return in_units(int(value), units)
        return human_bytes(int(value)) if human else str(value)
    return str(value)


def write_table(out: TextIO, rows: Iterable[Any], cols: list[Column], header: bool, units: str | None,
                decimals: int, total: Decimal | None = None) -> None:
    """A fixed-width table like sacct's (buffers the rows to size the columns)."""
    lines = [[_text(c, r, units, True, decimals) for c in cols] for r in rows]
    if total is not None:
        lines.append(["Total" if i == 0 else "" for i in range(len(cols))])
        for i, c in enumerate(cols):
            if c.name.startswith("Cost"):
                lines[-1][i] = f"{total:.{decimals}f}"
    heads = [c.name for c in cols]
    widths = []
    for i, c in enumerate(cols):
        widths.append(c.width if c.width else max([len(heads[i])] + [len(line[i]) for line in lines]))

    def fit(text: str, w: int, right: bool, mark: str = "+") -> str:
        if len(text) > w:  # sacct cuts a header short and marks a cut value with '+'
            return text[: w - len(mark)] + mark
        return text.rjust(w) if right else text.ljust(w)

    right = [c.is_bytes or c.name.startswith("Cost") or c.name.endswith("Pkts") or c.name == "Jobs" for c in cols]
    if header:
        out.write(" ".join(fit(h, w, r, "") for h, w, r in zip(heads, widths, right)).rstrip() + "\n")
        out.write(" ".join("-" * w for w in widths) + "\n")
    for i, line in enumerate(lines):
        if total is not None and i == len(lines) - 1:
            out.write(" ".join("-" * w for w in widths) + "\n")
        out.write(" ".join(fit(t, w, r) for t, w, r in zip(line, widths, right)).rstrip() + "\n")


def write_parsable(out: TextIO, rows: Iterable[Any], cols: list[Column], header: bool, units: str | None,
                   decimals: int, trailing: bool) -> None:
    """-p (trailing '|') and -P (none): one line per row, streamed; raw bytes unless --units."""
    end = "|\n" if trailing else "\n"
    if header:
        out.write("|".join(c.name for c in cols) + end)
    for r in rows:
        out.write("|".join(_text(c, r, units, False, decimals) for c in cols) + end)


def write_csv(out: TextIO, rows: Iterable[Any], cols: list[Column], header: bool, units: str | None,
              decimals: int) -> None:
    w = csv.writer(out, lineterminator="\n")
    if header:
        w.writerow([c.name for c in cols])
    for r in rows:
        w.writerow([_text(c, r, units, False, decimals) for c in cols])


def write_json(out: TextIO, items: Iterator[dict[str, Any]]) -> None:
    """A JSON array written one element at a time (constant memory)."""
    out.write("[")
    first = True
    for item in items:
        out.write("\n  " if first else ",\n  ")
        out.write(json.dumps(item, sort_keys=False))
        first = False
    out.write("\n]\n" if not first else "]\n")

"""sacct's time formats for -S/--starttime and -E/--endtime, in local time.

Accepted (as sacct(1) documents them):
  HH:MM[:SS][AM|PM]                   today at that time
  MMDD[YY][-HH:MM[:SS]]               e.g. 1125, 112526, 1125-14:30; without YY a month later
                                      than the current one is last year's (as in sacct)
  MM.DD[.YY][-HH:MM[:SS]]
  MM/DD[/YY][-HH:MM[:SS]]
  YYYY-MM-DD[THH:MM[:SS]]
  today, midnight (00:00 today), noon (12:00), fika (15:00), teatime (16:00), now
  now[+|-]COUNT[seconds|minutes|hours|days|weeks]   (default unit: seconds)
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta

_UNITS = {"": 1, "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
          "min": 60, "mins": 60, "minute": 60, "minutes": 60,
          "h": 3600, "hour": 3600, "hours": 3600,
          "d": 86400, "day": 86400, "days": 86400,
          "w": 604800, "week": 604800, "weeks": 604800}
_NAMED = {"today": (0, 0), "midnight": (0, 0), "noon": (12, 0), "fika": (15, 0), "teatime": (16, 0)}


def _hms(text: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"(\d{1,2}):(\d{2})(?::(\d{2}))?\s*([AaPp][Mm])?", text, re.ASCII)
    if not m:
        raise ValueError(f"bad time of day {text!r}")
    h, mi, s = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    if m.group(4):
        if not 1 <= h <= 12:
            raise ValueError(f"bad 12-hour time {text!r}")
        h = h % 12 + (12 if m.group(4).lower() == "pm" else 0)
    if h > 23 or mi > 59 or s > 59:
        raise ValueError(f"bad time of day {text!r}")
    return h, mi, s


def _year(yy: str | None, month: int, now: datetime) -> int:
    """The year of a date: as given (YY is 20YY), else sacct's rule for a date without one.

    sacct reads -S and -E with parse_time(text, past=1) (SLURM src/sacct/options.c); for a
    date without a year, parse_time (src/common/parse_time.c) takes last year if the month is
    later than the current month, else this year (the current month included, whatever the
    day): on 2026-11-30, 1201 is 2025-12-01 and 1115 is 2026-11-15."""
    if yy is not None:
        return 2000 + int(yy) if len(yy) == 2 else int(yy)
    return now.year - 1 if month > now.month else now.year


def parse(text: str, now: datetime | None = None) -> datetime:
    """A naive local datetime for a sacct time string; ValueError with the reason.

    Digits are ASCII only; a time beyond datetime's range (years 1-9999) is a ValueError too."""
    try:
        return _parse(text, now or datetime.now())
    except OverflowError:  # timedelta or datetime arithmetic beyond years 1-9999
        raise ValueError(f"time out of range {text!r}") from None


def _parse(text: str, now: datetime) -> datetime:
    t = text.strip()
    low = t.lower()
    if low in _NAMED:
        h, mi = _NAMED[low]
        return now.replace(hour=h, minute=mi, second=0, microsecond=0)
    m = re.fullmatch(r"now(?:\s*([+-])\s*(\d+)\s*([a-z]*))?", low, re.ASCII)
    if m:
        if not m.group(1):
            return now.replace(microsecond=0)
        unit = m.group(3)
        if unit not in _UNITS:
            raise ValueError(f"bad unit {unit!r} in {text!r}")
        if len(m.group(2)) > 18:  # int() refuses over 4300 digits; anything this long is out of range
            raise OverflowError
        delta = timedelta(seconds=int(m.group(2)) * _UNITS[unit])
        return (now + delta if m.group(1) == "+" else now - delta).replace(microsecond=0)
    m = re.fullmatch(r"(\d{4})-(\d{2})-(\d{2})(?:T(\d{1,2}:\d{2}(?::\d{2})?))?", t, re.ASCII)
    if m:
        h, mi, s = _hms(m.group(4)) if m.group(4) else (0, 0, 0)
        return datetime(int(m.group(1)), int(m.group(2)), int(m.group(3)), h, mi, s)
    m = re.fullmatch(r"(\d{2})(\d{2})(\d{2})?(?:-(.+))?", t, re.ASCII)  # MMDD[YY][-time]
    if m is None:
        m = re.fullmatch(r"(\d{1,2})[./](\d{1,2})(?:[./](\d{2}|\d{4}))?(?:-(.+))?", t, re.ASCII)
    if m:
        h, mi, s = _hms(m.group(4)) if m.group(4) else (0, 0, 0)
        month = int(m.group(1))
        return datetime(_year(m.group(3), month, now), month, int(m.group(2)), h, mi, s)
    if re.fullmatch(r"\d{1,2}:\d{2}(?::\d{2})?\s*([AaPp][Mm])?", t, re.ASCII):
        h, mi, s = _hms(t)
        return now.replace(hour=h, minute=mi, second=s, microsecond=0)
    raise ValueError(f"unrecognised time {text!r} (see sacct(1): e.g. 2026-11-25T08:00, 1125, "
                     "11/25-08:00, now-7days, midnight)")

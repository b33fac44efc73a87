"""Prices of traffic per class and direction (a --rates file), and the cost of some traffic."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path

from ..errors import ConfigError
from ..traffic import Traffic


@dataclass(frozen=True)
class Rates:
    """Prices per unit of traffic for each (class, direction); see README "Billing"."""

    prices: dict[tuple[str, str], Decimal]
    unit_bytes: int = 10**9  # "GB": clouds bill decimal gigabytes
    decimals: int = 2
    currency: str = ""

    def cost(self, traffic: Traffic) -> Decimal:
        """The exact price of the traffic, rounded half-up to `decimals` once."""
        total = Decimal(0)
        for (klass, direction), price in self.prices.items():
            n = traffic.get(klass, {}).get(f"{direction}_bytes", 0)
            total += Decimal(n) * price / Decimal(self.unit_bytes)
        return total.quantize(Decimal(1).scaleb(-self.decimals), rounding=ROUND_HALF_UP)


UNITS = {"GB": 10**9, "GiB": 2**30, "TB": 10**12, "TiB": 2**40, "MB": 10**6, "MiB": 2**20}
_KEY = re.compile(r"([a-z][a-z0-9_]{0,15})_(in|out)")


def load(path: Path, classes: Sequence[str]) -> Rates:
    """Parse a rates file for a report over `classes`; ConfigError naming the key on any problem.

        currency = "EUR"        # a label for the Cost column (optional)
        unit = "GB"             # price unit: GB (10^9 bytes, default), GiB, TB, TiB, MB, MiB
        decimals = 2            # costs are rounded half-up to this many decimals
        [price]                 # per unit, for <class>_<in|out>: every class, both directions
        lan_in = 0
        wan_out = "0.09"        # strings keep exact decimals; numbers are read as written

    `classes` are the traffic classes of the report (the configured ones and any other a
    database holds): a key for another class is an error (a misspelt class would cost 0),
    and so is a class or direction without a key (a rate of 0 must be written as 0)."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"rates file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"rates file {path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"rates file {path}: not valid TOML ({exc})") from None
    for key in data:
        if key not in ("currency", "unit", "decimals", "price"):
            raise ConfigError(f"rates file {path}: unknown key '{key}'")
    unit = data.get("unit", "GB")
    if unit not in UNITS:
        raise ConfigError(f"rates file {path}: key 'unit': {unit!r} is not one of {', '.join(UNITS)}")
    decimals = data.get("decimals", 2)
    if not isinstance(decimals, int) or isinstance(decimals, bool) or not 0 <= decimals <= 10:
        raise ConfigError(f"rates file {path}: key 'decimals': must be an integer from 0 to 10")
    currency = data.get("currency", "")
    if not isinstance(currency, str):
        raise ConfigError(f"rates file {path}: key 'currency': must be a string")
    prices_raw = data.get("price", {})
    if not isinstance(prices_raw, dict) or not prices_raw:
        raise ConfigError(f"rates file {path}: key 'price': must be a table of <class>_<in|out> = price")
    prices: dict[tuple[str, str], Decimal] = {}
    for key, value in prices_raw.items():
        m = _KEY.fullmatch(key)
        if not m:
            raise ConfigError(f"rates file {path}: key 'price.{key}': expected <class>_in or <class>_out")
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"rates file {path}: key 'price.{key}': must be a number")
        try:
            price = Decimal(str(value))
        except InvalidOperation:
            raise ConfigError(f"rates file {path}: key 'price.{key}': {value!r} is not a number") from None
        if not price.is_finite() or price < 0:
            raise ConfigError(f"rates file {path}: key 'price.{key}': must be a non-negative number")
        if m.group(1) not in classes:
            raise ConfigError(f"rates file {path}: key 'price.{key}': {m.group(1)!r} is not a traffic class "
                              f"(known: {', '.join(classes)})")
        prices[(m.group(1), m.group(2))] = price
    for klass in classes:
        for direction in ("in", "out"):
            if (klass, direction) not in prices:
                raise ConfigError(f"rates file {path}: key 'price.{klass}_{direction}' is missing: every class "
                                  "and direction needs a price (a rate of 0 must be written as 0)")
    return Rates(prices=prices, unit_bytes=UNITS[unit], decimals=decimals, currency=currency)

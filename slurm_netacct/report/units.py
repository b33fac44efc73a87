"""Byte counts as sacct prints them (binary units)."""

from __future__ import annotations


def human_bytes(n: int) -> str:
    """Bytes in binary units as sacct prints them: 512, 1.50K, 3.20M, ..."""
    value = float(n)
    for unit in ("", "K", "M", "G", "T", "P"):
        if value < 1024 or unit == "P":
            return f"{n}" if unit == "" else f"{value:.2f}{unit}"
        value /= 1024
    return str(n)  # pragma: no cover


def in_units(n: int, unit: str) -> str:
    """Bytes in a fixed sacct unit (K, M, G, T, P = powers of 1024), two decimals."""
    power = "KMGTP".index(unit) + 1
    return f"{n / 1024**power:.2f}{unit}"

"""The shape of a job's traffic: per class and direction, packets and bytes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

DIRECTIONS = ("out", "in")  # out: the job sent it (remote = daddr); in: the job received it
FIELDS = ("in_bytes", "out_bytes", "in_packets", "out_packets")  # a class's numbers, as stored
Traffic = dict[str, dict[str, int]]  # class -> {in_bytes, out_bytes, in_packets, out_packets}


class Count(NamedTuple):
    """Packets and bytes of one counter (a tuple: cheap to make for a thousand jobs a read)."""

    packets: int = 0
    bytes: int = 0


Counters = dict[tuple[str, str], Count]  # (class, direction) -> Count


def empty_counters(class_names: Iterable[str]) -> Counters:
    """Zero counters for every class and direction."""
    return {(k, d): Count() for k in class_names for d in DIRECTIONS}


def traffic_of(counters: Counters, class_names: Iterable[str]) -> Traffic:
    """Counters as class -> {in_bytes, out_bytes, in_packets, out_packets}, every class given."""
    out: Traffic = {}
    for klass in class_names:
        cin = counters.get((klass, "in"), Count())
        cout = counters.get((klass, "out"), Count())
        out[klass] = {"in_bytes": cin.bytes, "out_bytes": cout.bytes,
                      "in_packets": cin.packets, "out_packets": cout.packets}
    return out


def checked(traffic: Mapping[str, Mapping[str, int]]) -> Traffic:
    """A copy holding exactly the four numbers of each class, as ints."""
    return {k: {f: int(v[f]) for f in FIELDS} for k, v in traffic.items()}


def summary(traffic: Mapping[str, Mapping[str, int]]) -> str:
    """One line for the log: lan in=..B/..p out=..B/..p, wan ..."""
    return ", ".join(f"{k} in={v['in_bytes']}B/{v['in_packets']}p out={v['out_bytes']}B/{v['out_packets']}p"
                     for k, v in traffic.items())



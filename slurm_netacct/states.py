"""A job run's states as the store records them, and how final each one is."""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    """The state of one run of a job on one node (stored as its value)."""

    RUNNING = "running"  # set up by the prolog; its counters are live (or the last sample)
    COMPLETED = "completed"  # the epilog stored its final counters
    RECONCILED = "reconciled"  # netacct-reconcile (or a later prolog) stored what was left
    LOST = "lost"  # its counters were gone before they could be read: the last sample stands


TERMINAL = frozenset({State.COMPLETED, State.RECONCILED, State.LOST})
# When a job's rows (one per node and run) disagree, the job shows the most telling one: a
# run still going, then one that lost traffic, then one reconciled; completed only if all are.
SHOWN_FIRST = {State.RUNNING: 0, State.LOST: 1, State.RECONCILED: 2, State.COMPLETED: 3}
# sacct's names and abbreviations for -s/--state, and ours.
ALIASES = {"r": State.RUNNING, "running": State.RUNNING, "cd": State.COMPLETED,
           "completed": State.COMPLETED, "lost": State.LOST, "reconciled": State.RECONCILED}

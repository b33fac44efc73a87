"""The project's exception types and the exit code each one maps to."""

from __future__ import annotations


class NetacctError(Exception):
    """Base class: a failure with a one-line message and a documented exit code."""

    exit_code = 1


class UsageError(NetacctError):
    """The command line was malformed."""

    exit_code = 2


class ConfigError(NetacctError):
    """The configuration file is missing, unreadable or invalid."""

    exit_code = 3


class JobIdError(NetacctError):
    """A job id (SLURM_JOB_ID or --job) is missing or not a valid SLURM job id."""

    exit_code = 4


class NoNamespaceError(NetacctError):
    """The job has no network namespace on this node."""

    exit_code = 5


class PoolExhaustedError(NetacctError):
    """No free address is left in the configured pool."""

    exit_code = 6


class SetupError(NetacctError):
    """Building or tearing down the job's network failed (kernel, nft, iptables)."""

    exit_code = 7


class StoreError(NetacctError):
    """The node database could not be read or written.

    The epilog does not fail for this alone: it spools the job's final record (exit 0, logged
    as an error). It exits 8 only when the record cannot be spooled either; the job's
    namespace and counters are then kept for a later run."""

    exit_code = 8


class NotAllowedError(NetacctError):
    """The invoking user may not see what was asked for (private data)."""

    exit_code = 9


class ExportError(NetacctError):
    """The metrics could not be written (textfile) or served (HTTP)."""

    exit_code = 10


class LedgerError(NetacctError):
    """The cluster ledger (MariaDB) could not be reached or used: down, unreachable, a wrong
    password, a schema this version does not know. Nothing is lost: the node database keeps
    every record, and shipping resumes from its watermark."""

    exit_code = 11


EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "unexpected internal error (a bug: please report it with the log)",
    2: "usage error on the command line",
    3: "configuration error",
    4: "invalid or missing job id",
    5: "the job has no network namespace on this node",
    6: "the address pool is exhausted",
    7: "network setup or teardown failed",
    8: "database error (an epilog: its record could not be spooled either; counters kept)",
    9: "not allowed: another user's jobs (private data)",
    10: "the metrics could not be written or served",
    11: "the cluster ledger could not be reached or used (nothing is lost: shipping resumes later)",
}

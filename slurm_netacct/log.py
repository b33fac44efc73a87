"""Logging for the hooks: every line carries the job id; syslog, a file, or stderr."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from pathlib import Path

LOGGER_NAME = "slurm_netacct"


def setup(log_file: Path | None, ident: str) -> logging.Logger:
    """Configure the project logger once: log_file if set, else syslog, else stderr."""
    logger = logging.getLogger(LOGGER_NAME)
    if getattr(logger, "_netacct_configured", False):
        return logger
    handler: logging.Handler
    fmt = f"%(asctime)s {ident}[{os.getpid()}]: %(levelname)s %(message)s"
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(log_file)
        except OSError:
            handler = logging.StreamHandler(sys.stderr)
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log",
                                                 facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        fmt = f"{ident}[{os.getpid()}]: %(levelname)s %(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%Y-%m-%dT%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger._netacct_configured = True  # type: ignore[attr-defined]
    return logger


def get() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)

"""Logging for every command: one line per event, with its level, readable in a terminal, a file or journald.

Under journald (``JOURNAL_STREAM`` names the very stream we write to, as sd-daemon(3) documents) a line
is ``<P>logger: message`` with the syslog priority P (journald stamps the time itself); anywhere else it is
``2026-01-31T12:00:00.123Z LEVEL logger: message``. Times are UTC: logs of two devices in different time
zones (a laptop abroad and the machine at home) then compare without arithmetic, and no DST jump ever
reorders them. A newline inside a message (or a traceback) is escaped, so one event is one line.

``verbose`` turns on our own debug output only: other libraries' loggers (pyroute2's netlink dumps, trio,
dnspython, ...) stay at WARNING unless ``debug_libs`` is set too.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import IO, Final

OUR_LOGGER: Final = "tunneld"

# sd-daemon(3): the kernel's syslog priorities as line prefixes.
PRIORITIES: Final = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
                     logging.DEBUG: 7}

_ESCAPES: Final = {ord("\n"): "\\n", ord("\r"): "\\r"}


def under_journald(stream: IO[str], env: Mapping[str, str] = os.environ) -> bool:
    """True when ``stream`` is the journald stream systemd connected us to: ``JOURNAL_STREAM`` is
    ``DEVICE:INODE`` of that stream, so a child whose stderr was redirected elsewhere does not match."""
    value = env.get("JOURNAL_STREAM", "")
    dev, colon, ino = value.partition(":")
    if not colon or not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor (a test's StringIO, a closed fd)
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def _priority(levelno: int) -> int:
    for level in sorted(PRIORITIES, reverse=True):
        if levelno >= level:
            return PRIORITIES[level]
    return 7


class LineFormatter(logging.Formatter):
    """One event, one line: ``journal`` True for journald's form, else with a UTC millisecond time."""

    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += " | " + self.formatException(record.exc_info)
        elif record.exc_text:
            text += " | " + record.exc_text
        text = f"{record.name}: {text}".translate(_ESCAPES)
        if self.journal:
            return f"<{_priority(record.levelno)}>{text}"
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z {record.levelname} {text}"


def setup(verbose: bool = False, debug_libs: bool = False, stream: IO[str] | None = None,
          env: Mapping[str, str] = os.environ) -> logging.Handler:
    """Send every logger's records to ``stream`` (stderr) in our format; ours at DEBUG with ``verbose``
    (else INFO), everyone else's at WARNING (DEBUG with ``debug_libs``). Replaces the handler of an earlier
    call, so calling it twice does not double the lines. Returns the handler."""
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LineFormatter(journal=under_journald(stream, env)))
    root = logging.getLogger()
    for old in root.handlers[:]:
        if isinstance(old.formatter, LineFormatter):  # ours from an earlier call; others (pytest's) stay
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug_libs else logging.WARNING)
    logging.getLogger(OUR_LOGGER).setLevel(logging.DEBUG if verbose else logging.INFO)
    return handler

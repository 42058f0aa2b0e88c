"""Logging for every long-running command: on a terminal, under systemd, for collectors.

Under systemd (`JOURNAL_STREAM` names our stderr) journald adds the time itself
and reads a `<N>` syslog priority at the start of each line, so lines carry the
priority and no timestamp: `journalctl -p warning` then filters. `log_format =
"json"` writes one JSON object per line for log collectors. Libraries that log
every retry at INFO (linuxpy's `opening /dev/video0`) are held at WARNING.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Literal

LogFormat = Literal["text", "json"]

#: logging level -> syslog priority (sd-daemon(3): <3> error, <4> warning, <6> info ...)
PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
#: third-party loggers that say INFO on every attempt; their warnings still pass
CHATTY = ("linuxpy",)
HANDLER_NAME = "madoguchi"


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (levels in between round up in severity)."""
    for level in sorted(PRIORITY, reverse=True):
        if levelno >= level:
            return PRIORITY[level]
    return 7


def under_journald(stream: IO[str], environ: Mapping[str, str]) -> bool:
    """True when `stream` is the journal stream systemd gave us (`JOURNAL_STREAM=dev:ino`)."""
    value = environ.get("JOURNAL_STREAM")
    if not value:
        return False
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return True  # set but not checkable (a stream without a descriptor): trust it
    return (st.st_dev, st.st_ino) == (dev, ino)


class JournalFormatter(logging.Formatter):
    """`<4>agent.station: message`: priority prefix on every line, no timestamp."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.name}: {super().format(record)}"
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.splitlines() or [""])


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, priority, logger, message (and exception)."""

    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "priority": priority(record.levelno),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        line = json.dumps(out, ensure_ascii=False)
        return f"<{priority(record.levelno)}>{line}" if self.journal else line


def make_formatter(fmt: LogFormat, journal: bool) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter(journal)
    if journal:
        return JournalFormatter("%(message)s")
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def error_line(text: str, stream: IO[str] | None = None) -> str:
    """A line a command prints for the user on stderr; `<3>` (error) under journald, so
    `journalctl -p err` shows why the service did not start."""
    stream = sys.stderr if stream is None else stream
    return f"<3>{text}" if under_journald(stream, os.environ) else text


def setup_logging(
    level: str = "INFO",
    fmt: LogFormat = "text",
    stream: IO[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> logging.Handler:
    """Configure the root logger (replacing a handler of an earlier call, no other); returns
    the handler."""
    stream = sys.stderr if stream is None else stream
    environ = os.environ if environ is None else environ
    handler = logging.StreamHandler(stream)
    handler.setFormatter(make_formatter(fmt, under_journald(stream, environ)))
    handler.set_name(HANDLER_NAME)
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == HANDLER_NAME:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level))
    for name in CHATTY:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    return handler

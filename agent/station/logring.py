"""The agent's last log lines in memory, for `cmd/logs` (issue #22, point 4).

A station is rarely reachable by ssh, so the dashboard asks for its recent log over
MQTT. The ring holds the agent's own formatted records and nothing else: it sits on
the root logger beside the journald/stderr handler and formats with the same
formatter, so it can hold nothing the journal does not (personal data is never
logged at any level). Bounded by line count, line length and characters in all, so
a burst of errors cannot grow the process; an answer is bounded again in bytes so it
fits well inside an MQTT message.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any

from agent.logsetup import HANDLER_NAME

MAX_LINES = 1000  # what the ring keeps
MAX_LINE_CHARS = 2000  # a longer line is cut, with a marker
MAX_RING_CHARS = 512 * 1024  # and the whole ring, whatever the lines (about 0.5-2 MB)
MAX_ANSWER_LINES = 500  # the most `cmd/logs` returns
MAX_ANSWER_BYTES = 64 * 1024  # the most UTF-8 bytes of lines in one answer
DEFAULT_LINES = 100
RING_NAME = "madoguchi-ring"


class LogRing(logging.Handler):
    """A logging handler keeping the last `max_lines` formatted lines."""

    def __init__(
        self,
        max_lines: int = MAX_LINES,
        max_line_chars: int = MAX_LINE_CHARS,
        max_chars: int = MAX_RING_CHARS,
    ) -> None:
        super().__init__()
        self.max_line_chars = max_line_chars
        self.max_chars = max_chars
        self._chars = 0
        self._lines: collections.deque[str] = collections.deque()
        self._max_lines = max_lines
        self._guard = threading.Lock()  # records arrive from driver threads too
        self.dropped = 0  # lines pushed out of the ring since the start
        self.set_name(RING_NAME)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # never let logging break the agent
            self.handleError(record)
            return
        if len(line) > self.max_line_chars:
            line = line[: self.max_line_chars] + " …[cut]"
        with self._guard:
            self._lines.append(line)
            self._chars += len(line)
            while len(self._lines) > self._max_lines or self._chars > self.max_chars:
                self._chars -= len(self._lines.popleft())
                self.dropped += 1

    def tail(self, n: int, max_bytes: int = MAX_ANSWER_BYTES) -> tuple[list[str], bool]:
        """The last `n` lines, oldest first, at most `max_bytes` of UTF-8; and whether
        the byte bound cut the answer short."""
        with self._guard:
            lines = list(self._lines)[-n:] if n > 0 else []
        out: list[str] = []
        size = 0
        for line in reversed(lines):
            size += len(line.encode("utf-8", "replace")) + 1
            if size > max_bytes:
                out.reverse()
                return out, True
            out.append(line)
        out.reverse()
        return out, False

    def install(self) -> LogRing:
        """Attach to the root logger with the agent handler's formatter (replacing an
        earlier ring, as setup_logging replaces its handler)."""
        root = logging.getLogger()
        formatter = next(
            (h.formatter for h in root.handlers if h.get_name() == HANDLER_NAME and h.formatter),
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"),
        )
        self.setFormatter(formatter)
        for old in list(root.handlers):
            if old.get_name() == RING_NAME:
                root.removeHandler(old)
        root.addHandler(self)
        return self

    def uninstall(self) -> None:
        logging.getLogger().removeHandler(self)

    async def command(self, body: dict[str, Any]) -> dict[str, Any]:
        """`cmd/logs {"lines": N}`: the last N lines (1..MAX_ANSWER_LINES, default 100)."""
        n = parse_lines(body.get("lines", DEFAULT_LINES))
        lines, cut = self.tail(n)
        return {"lines": lines, "truncated": cut, "max_lines": MAX_ANSWER_LINES}


def parse_lines(value: Any) -> int:
    """A hostile `lines` value is refused (ValueError) rather than guessed at."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"lines: an integer 1..{MAX_ANSWER_LINES} is needed")
    if not 1 <= value <= MAX_ANSWER_LINES:
        raise ValueError(f"lines: {value} is outside 1..{MAX_ANSWER_LINES}")
    return value

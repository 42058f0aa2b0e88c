"""Operator sessions: staff badge taps decide who is on duty. A station rule, not a driver's.

The card reader only reports a card and its UID; which UIDs are staff badges,
and for how long a session lasts, is configured on the reader's device entry
but applies to the whole station (every record carries the operator on duty).
"""

from __future__ import annotations

from collections.abc import Callable

from agent.config import Config, PcscDevice

#: a session's idle timeout when only the `staff` dataset maps badges
DEFAULT_TIMEOUT_S = 8 * 3600.0


class OperatorSessions:
    """Staff badge taps -> the operator every record carries. Pure: the clock is passed in.

    The station keeps one (agent/station/station.py), fed by the card reads of every
    reader, so a session survives a driver restart and covers every device.

    A mapped badge starts a session; the same badge again ends it; another
    mapped badge takes over. A session ends by itself after `timeout_s`
    without activity (a tap or a record).
    """

    def __init__(self, operators: dict[str, str], timeout_s: float) -> None:
        self.operators = {k.lower(): v for k, v in operators.items()}
        self.timeout_s = timeout_s
        self._current: str | None = None
        self._last = 0.0

    def tap(
        self, uid: str, now: float, staff: Callable[[str], str | None] | None = None
    ) -> tuple[str, str] | None:
        """A badge with `uid` was tapped: ("start"|"end", operator id), or None if unmapped.
        `staff` (the `staff` dataset) decides first; the hand-edited map is the fallback."""
        op = staff(uid) if staff is not None else None
        op = op or self.operators.get(uid.lower())
        if op is None:
            return None
        if self.current(now) == op:
            self._current = None
            return ("end", op)
        self._current, self._last = op, now
        return ("start", op)

    def current(self, now: float) -> str | None:
        if self._current is not None and now - self._last > self.timeout_s:
            self._current = None
        return self._current

    def touch(self, now: float) -> str | None:
        """A record is being made: who is on duty (and keep the session alive)."""
        op = self.current(now)
        if op is not None:
            self._last = now
        return op


def operator_sessions(config: Config) -> OperatorSessions | None:
    """One station-wide session book from every card reader's badge mapping."""
    readers = [d for d in config.devices if isinstance(d, PcscDevice) and d.operators]
    if not readers:
        if config.datasets is not None:  # the `staff` dataset may map badges of any card read
            return OperatorSessions({}, DEFAULT_TIMEOUT_S)
        return None
    operators: dict[str, str] = {}
    for dev in readers:
        operators.update(dev.operators)
    return OperatorSessions(operators, min(d.operator_timeout_s for d in readers))

"""Log a condition that repeats on every retry once per change of state, then in summaries.

A camera that is not plugged in fails every few seconds for days; one line per
attempt is 30,000 journal lines a day that bury everything else. `Repeats`
logs the first failure, a different failure, and the recovery at once, and
while the same failure goes on only a summary every `summary_every_s`:
`camera-1: still unavailable (47 attempts in 10 min)`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


def span(seconds: float) -> str:
    """`40 s`, `10 min`, `3.5 h`: how long, for a person."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Repeats:
    """The retry log of one device (or server): `failed()` per attempt, `ok()` when it works.

    A device that flaps (opens, fails again within `stable_s`) is one ongoing failure:
    its recoveries and its failures count as attempts, not as news.
    """

    def __init__(
        self,
        logger: logging.Logger,
        name: str,
        summary_every_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        stable_s: float = 60.0,
    ) -> None:
        self.logger = logger
        self.name = name
        self.summary_every_s = summary_every_s
        self.stable_s = stable_s
        self._clock = clock
        self._state: tuple[str, str] | None = None  # the failure going on (kept while flapping)
        self._failing = False
        self._ok_since: float | None = None
        self._since = 0.0
        self._last_summary = 0.0
        self._attempts = 0
        self._recovery_said = False

    @property
    def attempts(self) -> int:
        """Failed attempts in the current failure (0 when it works)."""
        return self._attempts if self._failing else 0

    def failed(self, state: str, detail: str, level: int = logging.WARNING) -> bool:
        """One more failed attempt in `state` ("unavailable", "failing") for `detail`.

        Logs `name: detail` when the state or the detail is new (or the device had
        worked for `stable_s`), else a summary at most every `summary_every_s`.
        Returns whether anything was logged.
        """
        now = self._clock()
        if self._ok_since is not None and now - self._ok_since >= self.stable_s:
            self._state = None  # it had really recovered: this is a new failure
        self._ok_since = None
        self._failing = True
        if self._state != (state, detail):
            self._state = (state, detail)
            self._since = self._last_summary = now
            self._attempts = 1
            self._recovery_said = False
            self.logger.log(level, "%s: %s", self.name, detail)
            return True
        self._attempts += 1
        if now - self._last_summary < self.summary_every_s:
            return False
        self._last_summary = now
        self.logger.log(
            level,
            "%s: still %s (%d attempts in %s)",
            self.name,
            state,
            self._attempts,
            span(now - self._since),
        )
        return True

    def ok(self, what: str = "working again") -> bool:
        """It works: say so once per failure (a flapping device only the first time)."""
        if not self._failing:
            return False
        self._failing = False
        self._ok_since = self._clock()
        if self._recovery_said:
            return False  # flapping: said once for this failure
        self._recovery_said = True
        attempts, took = self._attempts, span(self._clock() - self._since)
        self.logger.info("%s: %s after %d failed attempt(s) in %s", self.name, what, attempts, took)
        return True

"""How long a trial has run: a remote configuration on trial, a release switch awaiting
its health check. Both must act "N seconds after it began", across restarts of the
process and reboots, so the start is kept in a file.

The wall clock alone is wrong for that on a Raspberry Pi: it has no RTC, boots with
fake-hwclock's last saved time, then NTP steps the clock by minutes or hours. A step
back would postpone a rollback by as much (a station left on a configuration that
cannot reach its broker); a step forward would end the trial early. So a start is a
`Stamp`: the wall clock *and* the boot's id and CLOCK_BOOTTIME (counted from boot,
suspend included, never stepped). Within the same boot the elapsed time is exact; after
a reboot only the wall clock is left, and it is never trusted for more than the whole
trial: what is left is always between 0 and the deadline.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class Clocks(Protocol):
    """The seam: the system's clocks (`SYSTEM`), or agent.testing.FakeClocks."""

    def wall(self) -> float: ...

    def boottime(self) -> float: ...

    def boot_id(self) -> str | None: ...


class SystemClocks:
    def wall(self) -> float:
        return time.time()

    def boottime(self) -> float:
        return time.clock_gettime(time.CLOCK_BOOTTIME)

    def boot_id(self) -> str | None:
        try:
            return BOOT_ID.read_text().strip() or None
        except OSError:
            return None  # not Linux: the wall clock alone, still bounded by the deadline


SYSTEM: Clocks = SystemClocks()


@dataclass(frozen=True)
class Stamp:
    """When a trial began."""

    wall: float
    boot_id: str | None = None
    boottime: float | None = None

    @classmethod
    def now(cls, clocks: Clocks = SYSTEM) -> Stamp:
        return cls(clocks.wall(), clocks.boot_id(), clocks.boottime())

    def as_dict(self) -> dict[str, Any]:
        return {"boot_id": self.boot_id, "boottime": self.boottime}

    @classmethod
    def from_dict(cls, wall: float, d: dict[str, Any]) -> Stamp:
        """`wall` from the record's own field; boot_id / boottime if it has them (a file
        written before they were kept has only the wall clock)."""
        boot_id, boottime = d.get("boot_id"), d.get("boottime")
        if not (isinstance(boottime, int | float) and math.isfinite(boottime)):
            boottime = None
        return cls(
            float(wall),
            boot_id if isinstance(boot_id, str) else None,
            None if boottime is None else float(boottime),
        )


def elapsed(since: Stamp, clocks: Clocks = SYSTEM) -> float:
    """Seconds since `since`: CLOCK_BOOTTIME within the same boot, else the wall clock."""
    same_boot = since.boot_id is not None and since.boot_id == clocks.boot_id()
    now = clocks.boottime()
    if same_boot and since.boottime is not None and since.boottime <= now:
        return now - since.boottime
    return clocks.wall() - since.wall  # another boot, or a start this boot cannot have had


def left(since: Stamp, deadline_s: float, clocks: Clocks = SYSTEM) -> float:
    """Seconds of a `deadline_s` trial begun at `since` still to run, in [0, deadline_s]."""
    return min(deadline_s, max(0.0, deadline_s - elapsed(since, clocks)))

"""How long a trial has run (agent/station/trial_clock.py): CLOCK_BOOTTIME within a boot,
the wall clock after a reboot, and never less than nothing nor more than the deadline."""

from __future__ import annotations

import time

from agent.station.trial_clock import SYSTEM, Stamp, elapsed, left
from agent.testing import FakeClocks


def test_within_a_boot_a_step_of_the_wall_clock_changes_nothing() -> None:
    clocks = FakeClocks()
    since = Stamp.now(clocks)
    clocks.advance(10)
    clocks.step_wall(-3600)  # NTP steps the clock back an hour
    assert elapsed(since, clocks) == 10
    assert left(since, 30, clocks) == 20
    clocks.step_wall(+7200)  # and forward: the trial does not end early either
    assert left(since, 30, clocks) == 20
    clocks.advance(25)
    assert left(since, 30, clocks) == 0


def test_after_a_reboot_the_wall_clock_counts_bounded_by_the_deadline() -> None:
    clocks = FakeClocks()
    since = Stamp.now(clocks)
    clocks.advance(4)
    clocks.reboot(wall_step=6)  # down for 6 s
    assert elapsed(since, clocks) == 10 and left(since, 30, clocks) == 20
    clocks.reboot(wall_step=-86_400)  # a Pi without RTC: booted a day in the past
    assert left(since, 30, clocks) == 30  # never more than the whole trial
    clocks.reboot(wall_step=90_000)
    assert left(since, 30, clocks) == 0


def test_a_stamp_survives_its_file_and_an_old_file_has_the_wall_clock_only() -> None:
    clocks = FakeClocks()
    since = Stamp.now(clocks)
    record = {"applied_at": since.wall, **since.as_dict()}
    assert Stamp.from_dict(record["applied_at"], record) == since
    old = Stamp.from_dict(since.wall, {"applied_at": since.wall})
    assert (old.boot_id, old.boottime) == (None, None)
    clocks.advance(5)
    clocks.step_wall(-100)
    assert left(old, 30, clocks) == 30  # the wall clock, bounded
    junk = Stamp.from_dict(since.wall, {"boot_id": 7, "boottime": "x"})
    assert (junk.boot_id, junk.boottime) == (None, None)
    assert Stamp.from_dict(since.wall, {"boottime": float("nan")}).boottime is None


def test_a_boottime_this_boot_has_not_reached_counts_on_the_wall_clock() -> None:
    """A state file that says the trial began after now (edited, or torn): not a trial
    that never ends in this boot; the wall clock decides, bounded as after a reboot."""
    clocks = FakeClocks()
    since = Stamp(clocks.wall() - 100, clocks.boot_id(), clocks.boottime() + 1e9)
    assert elapsed(since, clocks) == 100 and left(since, 30, clocks) == 0


def test_the_system_clocks_of_this_machine() -> None:
    since = Stamp.now(SYSTEM)
    assert since.boot_id is not None and len(since.boot_id) == 36  # Linux's uuid
    assert since.boottime is not None and since.boottime > 0
    time.sleep(0.02)
    assert 0.015 < elapsed(since, SYSTEM) < 5
    assert 0 < left(since, 30) < 30

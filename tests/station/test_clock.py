"""clock_synced() reads the kernel's NTP state with a real, read-only adjtimex."""

from __future__ import annotations

import time

from agent.station import clock


def test_adjtimex_struct_is_decoded_right() -> None:
    got = clock.read_timex()
    assert got is not None, "adjtimex is available on every Linux"
    state, tx = got
    assert 0 <= state <= clock.TIME_ERROR  # TIME_OK .. TIME_ERROR
    # Fields after `status` land where the kernel wrote them only if the layout is right.
    assert abs(tx.time_sec - time.time()) < 60
    # microseconds, or nanoseconds once an NTP daemon has set STA_NANO (seen on a CI host)
    assert 0 <= tx.time_usec < (1_000_000_000 if tx.status & clock.STA_NANO else 1_000_000)
    assert 1_000 <= tx.tick <= 100_000  # microseconds per kernel tick (USER_HZ)
    assert tx.modes == 0  # nothing was asked to change


def test_clock_synced_matches_the_kernel_state() -> None:
    got = clock.read_timex()
    assert got is not None
    state, tx = got
    expected = state != clock.TIME_ERROR and not tx.status & clock.STA_UNSYNC
    assert clock.clock_synced() is expected


def test_verdict_from_state_and_flags() -> None:
    assert clock.synced(0, 0x2001) is True  # TIME_OK, STA_PLL | STA_NANO
    assert clock.synced(0, clock.STA_UNSYNC) is False
    assert clock.synced(clock.TIME_ERROR, 0) is False
    assert clock.synced(1, 0) is True  # TIME_INS: leap second pending, still synced

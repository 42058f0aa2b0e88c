"""The records window (agent/station/uplink.py `Window`): 8 messages awaiting their
PUBACK on a LAN, up to 32 while PUBACKs are slow (issue #18, points 2 and 5)."""

from __future__ import annotations

import logging

import pytest

from agent.station.uplink import Window


def test_quick_pubacks_keep_the_low_window() -> None:
    w = Window(8, 32)
    for _ in range(100):
        w.observe(0.004)
    assert w.size == 8
    assert w.describe() == {"window": 8, "puback_rtt_ms": 4.0}


def test_slow_pubacks_grow_it_and_quick_ones_shrink_it_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agent.station.uplink")
    w = Window(8, 32)
    w.observe(0.055)  # the first round trip of a WAN
    assert w.size == 32
    for _ in range(3):  # a few quick ones do not undo it (smoothed)
        w.observe(0.002)
    assert w.size == 32
    for _ in range(30):
        w.observe(0.002)
    assert w.size == 8
    said = [r.getMessage() for r in caplog.records]
    assert said[0] == "uplink: PUBACKs take 55 ms: 32 records message(s) in flight at once"
    assert said[1].endswith(": 8 records message(s) in flight at once") and len(said) == 2


def test_between_the_thresholds_it_stays_where_it_is() -> None:
    quick, slow = Window(8, 32), Window(8, 32)
    slow.observe(0.05)
    for _ in range(50):
        quick.observe(0.02)
        slow.observe(0.02)
    assert (quick.size, slow.size) == (8, 32)


def test_a_fixed_window_never_changes() -> None:
    w = Window(16, 16)
    for rtt in (0.5, 0.001, 0.3):
        w.observe(rtt)
        assert w.size == 16
    assert Window(8, 4).high == 8  # the schema refuses it; the class does not shrink below low


def test_a_puback_outstanding_long_grows_the_window_before_it_arrives() -> None:
    """The uplink's `_oldest_slow`: a WAN's first round trip is not waited out at 8."""
    w = Window(8, 32)
    w.observe(0.002)
    w.observe_waiting(Window.LONG_RTT_S)
    assert w.size == 32 and w.rtt_s == Window.LONG_RTT_S
    w.observe_waiting(0.001)  # a lower bound never lowers the estimate
    assert w.rtt_s == Window.LONG_RTT_S

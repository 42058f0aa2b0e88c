"""Operator sessions (staff badges): a station rule, pure, the clock passed in."""

from __future__ import annotations

from agent.station.operators import OperatorSessions


def test_operator_sessions_start_end_takeover_and_time_out() -> None:
    s = OperatorSessions({"01010601CB095703": "staff-014", "aa": "staff-002"}, timeout_s=60)
    assert s.tap("ffff", 0) is None
    assert s.current(0) is None
    assert s.tap("01010601cb095703", 0) == ("start", "staff-014")
    assert s.touch(50) == "staff-014"
    assert s.touch(100) == "staff-014"  # 50 s idle: still on duty
    assert s.tap("aa", 101) == ("start", "staff-002")
    assert s.tap("aa", 102) == ("end", "staff-002")
    assert s.current(102) is None
    assert s.tap("aa", 200) == ("start", "staff-002")
    assert s.current(261) is None  # idle past the timeout

"""The fuzz time budget can fail: a check that burns CPU past 100 ms twice is an error."""

from __future__ import annotations

import time

import pytest

from tests.fuzz._budget import LIMIT_S, budgeted


def test_a_slow_input_fails_and_a_fast_one_passes() -> None:
    calls = 0

    @budgeted
    def slow() -> None:
        nonlocal calls
        calls += 1
        end = time.thread_time() + LIMIT_S * 1.5
        while time.thread_time() < end:
            pass

    with pytest.raises(AssertionError, match="ms of CPU, over 100 ms"):
        slow()
    assert calls == 2  # confirmed on a second run before failing

    @budgeted
    def fast() -> None:
        time.sleep(LIMIT_S * 1.5)  # waiting is not CPU: a busy machine does not fail it

    fast()

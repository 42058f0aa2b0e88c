"""Example counts and the time budget for the parser fuzz tests.

`make test` runs each with a modest count; `make fuzz` sets MADOGUCHI_FUZZ_EXAMPLES
(200,000 by default there). Only the documented errors may come out, and no input
may take over 100 ms: measured as this thread's CPU time (`@budgeted`), so that the
other processes of a busy machine do not fail a fast parser, and confirmed by a
second run of the same input before it fails the test.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("MADOGUCHI_FUZZ_EXAMPLES", "60"))
LIMIT_S = 0.100

settings.register_profile(
    "madoguchi-fuzz",
    max_examples=EXAMPLES,
    deadline=None,  # wall-clock time on a shared machine is noise; @budgeted counts CPU
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
    print_blob=True,
)
FUZZ = settings.get_profile("madoguchi-fuzz")

F = TypeVar("F", bound=Callable[..., None])


def budgeted(test: F) -> F:
    """Fail an input whose check takes over LIMIT_S of CPU time, twice in a row."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        took = []
        for _ in range(2):
            start = time.thread_time()
            test(*args, **kwargs)
            took.append(time.thread_time() - start)
            if took[-1] <= LIMIT_S:
                return
        ms = " and ".join(f"{t * 1000:.0f}" for t in took)
        raise AssertionError(f"this input took {ms} ms of CPU, over {LIMIT_S * 1000:.0f} ms")

    return run  # type: ignore[return-value]

"""Example counts for the parser fuzz tests.

`make test` runs each with a modest count; `make fuzz` sets MADOGUCHI_FUZZ_EXAMPLES
(200,000 by default there). Every input must finish within 100 ms (the deadline),
and only the documented errors may come out.
"""

from __future__ import annotations

import os
from datetime import timedelta

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("MADOGUCHI_FUZZ_EXAMPLES", "60"))

settings.register_profile(
    "madoguchi-fuzz",
    max_examples=EXAMPLES,
    deadline=timedelta(milliseconds=100),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
    print_blob=True,
)
FUZZ = settings.get_profile("madoguchi-fuzz")

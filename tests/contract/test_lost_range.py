"""The lost-range record kind (docs/CONTRACT.md "lost-range record"): its validation
raises only ValueError, whatever the record holds."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.contract.validate import check_record, lost_range

BASE = {
    "id": "01a234d5-9fd5-7cfc-ad45-c7c7b34374fa",
    "seq": 10,
    "captured_at": "2026-12-02T03:40:46.120Z",
    "device": "outbox",
    "kind": "lost_range",
    "source": "agent",
}


def test_a_good_range_and_the_bad_ones() -> None:
    assert lost_range(check_record({**BASE, "data": {"first_seq": 3, "last_seq": 9}})) == (3, 9)
    for data in (
        {"first_seq": 0, "last_seq": 9},
        {"first_seq": 5, "last_seq": 4},
        {"first_seq": 3, "last_seq": 10},  # not below the record's own seq
        {"first_seq": True, "last_seq": 4},
        {"first_seq": "3", "last_seq": 4},
        {"last_seq": 4},
        [],
    ):
        with pytest.raises(ValueError):
            check_record({**BASE, "data": data})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=300)
@given(
    data=json_values | st.fixed_dictionaries({"first_seq": json_values, "last_seq": json_values}),
    seq=json_values | st.integers(-5, 20),
)
def test_validation_raises_only_value_error(data: Any, seq: Any) -> None:
    try:
        first, last = lost_range(check_record({**BASE, "seq": seq, "data": data}))
    except ValueError:
        return
    assert 1 <= first <= last < seq

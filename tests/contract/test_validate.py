"""Record validation: what the registry keys on, refused with a reason when absent."""

from __future__ import annotations

from typing import Any

import pytest

from agent.contract.validate import check_record

GOOD: dict[str, Any] = {
    "id": "0190c8e4-7d3a-7b61-9c2e-5f0a4b3c2d1e",
    "seq": 1,
    "captured_at": "2024-07-01T09:00:00.000+09:00",
    "device": "scanner",
    "kind": "barcode",
    "data": {"text": "4901234567894"},
}


def test_a_good_record_is_returned_as_it_is() -> None:
    assert check_record(GOOD) is GOOD


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"id": ""}, "string id"),
        ({"id": 7}, "string id"),
        ({"seq": 0}, "positive integer seq"),
        ({"seq": True}, "positive integer seq"),
        ({"seq": "1"}, "positive integer seq"),
        ({"captured_at": None}, "string captured_at"),
        ({"device": 1}, "string device"),
        ({"kind": ["barcode"]}, "string kind"),
    ],
)
def test_a_record_without_what_the_registry_keys_on_is_refused(
    change: dict[str, Any], reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        check_record({**GOOD, **change})


def test_what_is_not_an_object_is_refused() -> None:
    with pytest.raises(ValueError, match="not an object"):
        check_record([GOOD])

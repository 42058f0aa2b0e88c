"""The operator-feedback rules (agent/station/feedback.py): ACK / NAK and the verdicts."""

from __future__ import annotations

from typing import Any

import pytest

from agent.station.feedback import VERDICTS, acknowledged, rejected_verdict, verdict

VALID = {"type": "gtin", "valid": True, "problems": []}
INVALID = {"type": "gtin", "valid": False, "problems": ["bad_check_digit"]}
UNEXPECTED = {"type": "gtin", "valid": True, "problems": ["unexpected_type"]}
EXPIRED = {"type": "gs1", "valid": True, "problems": ["expired"]}


@pytest.mark.parametrize(
    ("interpretation", "nak_invalid", "ack"),
    [
        (None, True, True),  # not a barcode, or not interpreted: stored is enough
        (None, False, True),
        (VALID, True, True),
        (INVALID, True, False),
        (INVALID, False, True),  # stored either way; only the beep differs
        (UNEXPECTED, True, False),
        (UNEXPECTED, False, True),
        (EXPIRED, True, True),  # an expired lot is an alert, not a rescan
        ({"type": "gtin"}, True, True),  # no "valid" key: taken as valid
    ],
)
def test_the_nak_rule(interpretation: dict[str, Any] | None, nak_invalid: bool, ack: bool) -> None:
    assert acknowledged(interpretation, nak_invalid=nak_invalid) is ack


@pytest.mark.parametrize("interpretation", [VALID, INVALID, UNEXPECTED, EXPIRED, None])
def test_a_nak_never_shows_ok(interpretation: dict[str, Any] | None) -> None:
    """The scanner's NAK and the page's message come from the same interpretation."""
    if not acknowledged(interpretation, nak_invalid=True):
        assert verdict(interpretation) != "ok"


def test_rejected_reads_have_their_own_verdicts() -> None:
    assert rejected_verdict("not_stored") == "not_stored"
    assert rejected_verdict("12 bytes with binary control characters") == "read_error"
    assert rejected_verdict(None) == "read_error"
    assert {rejected_verdict("not_stored"), rejected_verdict("x")} <= set(VERDICTS)

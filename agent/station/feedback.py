"""Operator feedback: what one read's outcome is, and what the operator is told.

Pure rules, no I/O: the station loop decides ACK / NAK with `acknowledged`,
the kiosk page shows `verdict`. Both read the same interpretation, so the
beep at the scanner and the message on the screen cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.contract.records import Record


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one read: stored (record), suppressed as a repeat, or refused."""

    accepted: bool
    record: Record | None = None
    duplicate: bool = False
    error: str | None = None
    interpretation: dict[str, Any] | None = None
    #: the record's `data.verdict` from the station's reference datasets, if any
    reference: dict[str, Any] | None = None


def acknowledged(interpretation: dict[str, Any] | None, *, nak_invalid: bool) -> bool:
    """The NAK rule for a stored read: ACK unless the device NAKs invalid reads
    (`nak_invalid`) and this one is invalid or of a type the station does not take."""
    if interpretation is None or not nak_invalid:
        return True
    return bool(interpretation.get("valid", True)) and "unexpected_type" not in (
        interpretation.get("problems", [])
    )


#: what the kiosk page shows for a read; the page maps each code to Japanese
VERDICTS = {
    "ok": "stored and valid",
    "invalid_ticket": "a vaccination ticket whose number is wrong",
    "invalid_code": "a barcode that failed its check (check digit, length, separator)",
    "expired": "an expired vaccine lot: a safety problem",
    "unexpected": "a kind of code this station does not take",
    "read_error": "the device could not read it: scan again",
    "not_stored": "the record could not be stored: call staff",
    "card_not_genuine": "a My Number card that failed the authenticity check: call staff",
    "already_used": "a vaccination ticket the city already recorded as used (reference data)",
    "recalled": "a vaccine lot the city recalled (reference data): a safety problem",
}

#: reference-data verdicts (agent/station/datasets.py) that the page shows over the rest
REFERENCE_ALARMS = ("recalled", "already_used")

#: card_auth verdicts (docs/CONTRACT.md) that are not an alarm: genuine, or not judged
CARD_OK = {"genuine", "clock_unsynced"}


def card_verdict(card_auth: str | None) -> str | None:
    """The alarm for a card read whose authenticity check failed (issue #21), else None."""
    if card_auth is None or card_auth in CARD_OK:
        return None
    return "card_not_genuine"


def verdict(interpretation: dict[str, Any] | None, reference: dict[str, Any] | None = None) -> str:
    """One code per read for the page's big message (the page maps codes to Japanese).
    `reference` is the record's `data.verdict`: what the city knows comes first."""
    if isinstance(reference, dict) and reference.get("verdict") in REFERENCE_ALARMS:
        return str(reference["verdict"])
    if interpretation is None:
        return "ok"
    problems = set(interpretation.get("problems") or [])
    if "expired" in problems:
        return "expired"
    if "unexpected_type" in problems:
        return "unexpected"
    if not interpretation.get("valid", True) or problems:
        kind = str(interpretation.get("type", ""))
        return "invalid_ticket" if kind.startswith("vaccination_ticket") else "invalid_code"
    return "ok"


def rejected_verdict(reason: str | None) -> str:
    """The code for a read that was not stored: the outbox refused it, or the device failed."""
    return "not_stored" if reason == "not_stored" else "read_error"

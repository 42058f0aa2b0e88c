"""個人番号カード交付申請書 QR: the 23-digit 申請書ID.

Source: J-LIS 個人番号カード交付申請書 (申請書ID 23桁). No public check-digit rule, so
the only test is "exactly 23 ASCII digits".
"""

from __future__ import annotations

from agent.interpret._common import Interpretation, is_digits, result

APPLICATION_ID = "mynumber_application_id"
LENGTH = 23


def match(text: str) -> Interpretation | None:
    """The application-form reading of `text`, or None if it is not 23 digits."""
    if len(text) != LENGTH or not is_digits(text):
        return None
    return result(APPLICATION_ID, {"application_id": text})

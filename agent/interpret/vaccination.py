"""新型コロナワクチン接種券 (VRS): the 18-digit OCR/QR line and the NW-7 ticket number.

Source: 厚生労働省「新型コロナウイルス感染症に係る予防接種の実施に関する手引き」13.1版 p.130.
18 digits = 券種 (1) + 回数 (1) + 市町村コード (6, last digit a check digit) + 券番号 (10).
The optional NW-7 (Codabar) barcode usually carries the 10-digit 券番号 alone, sometimes
all 18 digits; scanners may or may not pass the Codabar start/stop characters (A-D).
The 券番号 has no check digit: only the municipality code is protected.
"""

from __future__ import annotations

from agent.interpret._common import Interpretation, is_digits, result
from agent.interpret.municipality import is_valid_municipality_code

TICKET = "vaccination_ticket"
TICKET_NUMBER = "vaccination_ticket_number"
_CODABAR_START_STOP = frozenset("ABCDabcd")


def strip_codabar(text: str) -> str:
    """`A1234567890B` -> `1234567890`: drop Codabar start/stop characters when both are there."""
    if len(text) >= 3 and text[0] in _CODABAR_START_STOP and text[-1] in _CODABAR_START_STOP:
        return text[1:-1]
    return text


def parse_ticket(digits: str) -> Interpretation:
    """The 18-digit line; `digits` must already be 18 ASCII digits."""
    municipality = digits[2:8]
    fields = {
        "kind_code": digits[0],
        "round_code": digits[1],
        "municipality_code": municipality,
        "ticket_number": digits[8:18],
    }
    problems = [] if is_valid_municipality_code(municipality) else ["bad_check_digit"]
    return result(TICKET, fields, problems)


def parse_ticket_number(digits: str) -> Interpretation:
    """The 10-digit 券番号 alone (NW-7); no check digit, so any 10 digits are valid."""
    return result(TICKET_NUMBER, {"ticket_number": digits})


def match(text: str) -> Interpretation | None:
    """The ticket reading of `text` (Codabar framing allowed), or None if it is not one."""
    body = strip_codabar(text)
    if not is_digits(body):
        return None
    if len(body) == 18:
        return parse_ticket(body)
    if len(body) == 10:
        return parse_ticket_number(body)
    return None

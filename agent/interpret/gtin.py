"""JAN / EAN-13, EAN-8, UPC-A and ITF-14: a GTIN and its GS1 mod-10 check digit.

Source: GS1 General Specifications §7.9 (check digit calculation): weights 3,1,3,...
from the rightmost data digit; check = (10 - sum mod 10) mod 10. Hand-written because it
sits on the hot path; biip's `Gtin` agrees with it (the tests compare both).
"""

from __future__ import annotations

from agent.interpret._common import Interpretation, is_digits, result

GTIN = "gtin"
FORMATS = {8: "GTIN-8", 12: "GTIN-12", 13: "GTIN-13", 14: "GTIN-14"}


def gtin_check_digit(payload: str) -> int:
    """The GS1 mod-10 check digit for `payload` (the GTIN without its last digit)."""
    if not payload or not is_digits(payload):
        raise ValueError("a GTIN payload is ASCII digits")
    return _check(payload)


def _check(payload: str) -> int:
    # Weight 3 on the rightmost payload digit, then 1, 3, 1 ... leftwards.
    total = 3 * sum(map(int, payload[::-2])) + sum(map(int, payload[-2::-2]))
    return (10 - total % 10) % 10


def is_valid_gtin(code: str) -> bool:
    """Whether `code` is an 8/12/13/14-digit GTIN with a correct check digit."""
    if len(code) not in FORMATS or not is_digits(code):
        return False
    return _check(code[:-1]) == ord(code[-1]) - 48


def parse_gtin(code: str) -> Interpretation:
    """A GTIN reading of `code`; wrong length or non-digits are problems, not exceptions."""
    if not is_digits(code):
        return result(GTIN, {"gtin": code}, ["malformed"])
    if len(code) not in FORMATS:
        return result(GTIN, {"gtin": code}, ["wrong_length"])
    fields = {"gtin": code, "gtin14": code.rjust(14, "0"), "format": FORMATS[len(code)]}
    ok = _check(code[:-1]) == ord(code[-1]) - 48
    return result(GTIN, fields, [] if ok else ["bad_check_digit"])

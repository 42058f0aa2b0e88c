"""Interpretation: barcode text in, meaning out. Pure: no I/O, no clock but `today`.

`interpret()` never raises and never blocks: any string in, a result out.
The result shape is the contract's `data.interpretation`:
`{"type": ..., "valid": bool, "fields": {...}, "problems": [...]}`.

One module per format (vaccination, municipality, gs1, gtin, mynumber_form, text);
this module only dispatches, cheaply, on the AIM identifier, the length and the
character set, so that the ~90 µs biip parse runs only on strings that can be GS1.
Formats, fields and problems: docs/interpretation.md.
"""

from __future__ import annotations

import logging
from datetime import date

from agent.interpret import gs1, gtin, mynumber_form, vaccination
from agent.interpret._common import Interpretation, is_digits, result
from agent.interpret.text import parse_text

__all__ = ["Interpretation", "interpret", "split_aim"]

log = logging.getLogger(__name__)

_GTIN_LENGTHS_WITHOUT_AIM = frozenset({8, 13, 14})  # 12 digits (UPC-A) only under ]E
_CODABAR_FIRST = frozenset("ABCDabcd")


def interpret(
    text: str,
    *,
    symbology: str | None = None,
    gs_substitute: str | None = None,
    today: date | None = None,
) -> Interpretation:
    """What a scanned string means. `text` has its AIM identifier already split off.

    `symbology` is that AIM identifier (`]d2` ...), `gs_substitute` the character the
    device sends for GS, `today` the date expiry is judged against (default: today).
    """
    try:
        return _dispatch(text, symbology, gs_substitute, today)
    except Exception as e:  # the contract: a result for every read, whatever went wrong
        # Only the exception type: messages from parsers quote the scanned text.
        log.warning("interpretation failed (%s); the read is kept as text", type(e).__name__)
        return result("text", {}, ["interpretation_failed"])


def _dispatch(
    raw: str, symbology: str | None, gs_substitute: str | None, today: date | None
) -> Interpretation:
    body = raw.strip(" \r\n\t")
    aim = symbology[:3] if symbology else None
    if aim is not None:
        if aim in gs1.GS1_SYMBOLOGIES:
            return gs1.parse(body, gs_substitute, today or date.today())
        if aim[:2] == "]E":  # EAN/UPC: always a GTIN (EAN-13, EAN-8, UPC-A)
            return gtin.parse_gtin(body)
        if aim[:2] == "]I" and len(body) == 14 and is_digits(body):  # ITF-14
            return gtin.parse_gtin(body)
    if not body:
        return result("text", {})
    c0 = body[0]
    if "0" <= c0 <= "9" or c0 in _CODABAR_FIRST:
        found = vaccination.match(body)
        if found is not None:
            return found
    if is_digits(body):
        n = len(body)
        if n in _GTIN_LENGTHS_WITHOUT_AIM:
            return gtin.parse_gtin(body)
        if n == mynumber_form.LENGTH:
            return _application_id_or_gs1(body, gs_substitute, today)
    if gs1.looks_like(body, gs_substitute):
        if c0 == "(":  # the printed form; "(03) 1234-5678" is a phone number, not GS1
            hri = gs1.parse_hri(body)
            if hri.error is not None:
                return parse_text(body)
            return gs1.to_result(hri, today or date.today())
        return gs1.parse(body, gs_substitute, today or date.today())
    return parse_text(body)


def _application_id_or_gs1(
    body: str, gs_substitute: str | None, today: date | None
) -> Interpretation:
    """23 digits: an application ID, unless it is a clean GS1 message led by a good GTIN.

    `01` + GTIN-14 + `10` + a 5-digit lot is also 23 digits; an AIM identifier settles it,
    without one a clean parse with a valid check digit is the tie-breaker.
    """
    if body.startswith("01"):
        parsed = gs1.parse_elements(body, gs1.separators(gs_substitute))
        if (
            parsed.error is None
            and len(parsed.elements) > 1
            and all(e.check_digit_ok for e in parsed.elements)
        ):
            return gs1.to_result(parsed, today or date.today())
    found = mynumber_form.match(body)
    assert found is not None
    return found


def split_aim(text: str) -> tuple[str | None, str]:
    """Strip a leading AIM symbology identifier (`]d2`, `]C1` ...) into its own value.

    `]` + symbology letter + modifier character (ISO/IEC 15424), ASCII only.
    """
    if (
        len(text) >= 3
        and text[0] == "]"
        and text[1].isascii()
        and text[1].isalpha()
        and text[2].isascii()
        and text[2].isalnum()
    ):
        return text[:3], text[3:]
    return None, text

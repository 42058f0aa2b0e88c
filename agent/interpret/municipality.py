"""全国地方公共団体コード (JIS X 0401 + check digit): the 6-digit municipality code.

d1..d5 weighted 6,5,4,3,2; r = sum mod 11; check digit = last digit of (11 - r).
Source: 総務省 地方公共団体コード (検査数字の算出方法); FORMATS.md has the worked examples.

The rule cannot tell r = 0 from r = 10 (both give check digit 1), so a single changed
digit that moves the remainder between those two values goes unnoticed: 81,820 of the
4,500,000 single-digit changes over d1..d5 of all codes (1.8 %, about 1 in 55; counted
exhaustively, see docs/interpretation.md). Every other single-digit change, and any
change of the check digit itself, is caught.
"""

from __future__ import annotations

from agent.interpret._common import is_digits


def municipality_check_digit(first5: str) -> int:
    """The check digit for the 5-digit JIS X 0401 code `first5` (prefecture + city)."""
    if len(first5) != 5 or not is_digits(first5):
        raise ValueError("a municipality code has 5 digits before its check digit")
    return _check(first5)


def _check(d: str) -> int:
    # Unrolled 6,5,4,3,2 weights: this runs on every ticket scan.
    r = (6 * int(d[0]) + 5 * int(d[1]) + 4 * int(d[2]) + 3 * int(d[3]) + 2 * int(d[4])) % 11
    return (11 - r) % 10


def is_valid_municipality_code(code: str) -> bool:
    """Whether `code` is 6 ASCII digits whose last digit is the check digit of the first 5."""
    if len(code) != 6 or not is_digits(code):
        return False
    return _check(code) == ord(code[5]) - 48

"""GS1 element strings (GS1-128, DataBar, GS1 DataMatrix, GS1 QR) through `biip`.

Sources: GS1 General Specifications §3 (AIs), §7.8 (FNC1 / GS separator), §7.12 (dates:
DD=00 is the last day of the month); biip (https://github.com/jodal/biip) holds the AI
table. Japanese vaccine labels: (01) GTIN-14, (17) expiry, (10) lot, (21) serial.

biip costs ~90 µs a message, so parses are cached: per message (a re-scan, a
double-fire) and per separator-delimited segment (the vials of one carton share
GTIN, expiry and lot; only the serial is new). Only the date comparison against
`today` runs on every call.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple

from agent.interpret._common import Interpretation, is_digits, result

if TYPE_CHECKING:
    from biip import ParseConfig
    from biip.gs1_element_strings import GS1ElementString


class _Biip(NamedTuple):
    ParseConfig: Any
    ParseError: type[Exception]
    AI: Any
    ElementString: Any
    Message: Any


@cache
def _biip() -> _Biip:
    """biip, imported at the first string that may be GS1, not at start-up.

    Importing it loads GS1's company-prefix table: about 16 MB of RSS and 80 ms,
    which a station that never sees a GS1 code should not pay.
    """
    from biip import ParseConfig, ParseError
    from biip.gs1_application_identifiers import GS1ApplicationIdentifier
    from biip.gs1_element_strings import GS1ElementString
    from biip.gs1_messages import GS1Message

    return _Biip(ParseConfig, ParseError, GS1ApplicationIdentifier, GS1ElementString, GS1Message)


GS1 = "gs1"
GS = "\x1d"

# AIM identifiers whose content is GS1 element strings (FNC1 in first position):
# ]C1 GS1-128, ]e0 GS1 DataBar, ]d2 GS1 DataMatrix, ]Q3 GS1 QR, ]J1 GS1 DotCode.
GS1_SYMBOLOGIES = frozenset({"]C1", "]e0", "]d2", "]Q3", "]J1"})

_NAMED = {"01": "gtin", "17": "expiry", "10": "lot", "21": "serial"}
_DATE_AIS = frozenset({"11", "12", "13", "15", "16", "17"})
# Fixed-length AIs a variable-length field can swallow when its GS is missing, and
# their data length: the FORMATS.md case is a lot eating (17) `10ABC12317261231`.
# Only the two that matter at a station, so that a lot which merely ends in digits
# (`A11250101`) is not flagged: flagged only if the message lacks that AI elsewhere.
_SWALLOWABLE = {"01": 14, "17": 6}
_MIN_SWALLOW = 1 + 2 + 6


@dataclass(frozen=True, slots=True)
class _Element:
    ai: str
    value: str
    date: str | None  # ISO date for date AIs, DD=00 already resolved by biip
    check_digit_ok: bool  # False when a GTIN / SSCC / GLN inside fails its check digit


@dataclass(frozen=True, slots=True)
class _Parsed:
    elements: tuple[_Element, ...]
    error: str | None  # "malformed" | "bad_date": where biip stopped
    missing_separator: bool


@lru_cache(maxsize=8)
def _config(separators: tuple[str, ...]) -> ParseConfig:
    config: ParseConfig = _biip().ParseConfig(separator_chars=separators)
    return config


def separators(gs_substitute: str | None) -> tuple[str, ...]:
    """GS always counts; a device's substitute character (one character) too."""
    if gs_substitute and len(gs_substitute) == 1 and gs_substitute != GS:
        return (GS, gs_substitute)
    return (GS,)


def _element(es: GS1ElementString) -> _Element:
    ok = es.gtin_error is None and es.sscc_error is None and es.gln_error is None
    iso = es.date.isoformat() if es.date is not None else None
    return _Element(es.ai.ai, es.value, iso, ok)


def _error_kind(rest: str) -> str:
    """Why biip stopped at `rest`: an impossible date, or anything else."""
    b = _biip()
    try:
        ai = b.AI.extract(rest).ai
    except b.ParseError:
        return "malformed"
    if ai in _DATE_AIS and is_digits(rest[2:8]) and len(rest) >= 8:
        return "bad_date"
    return "malformed"


@lru_cache(maxsize=4096)
def parse_elements(body: str, seps: tuple[str, ...]) -> _Parsed:
    """biip's GS1Message.parse loop, kept element by element so a failure keeps what parsed.

    biip never lets an element cross a separator, so the message is parsed one
    separator-delimited segment at a time, each segment cached on its own: the vials of
    one carton share their `01…17…10…` segment and only the serial is new.
    """
    if len(seps) > 1:
        for sep in seps[1:]:
            body = body.replace(sep, GS)
    elements: list[_Element] = []
    error: str | None = None
    for segment in body.split(GS):
        if not segment:  # a leading FNC1 sent as GS, or GS GS: biip skips them too
            continue
        parsed = _parse_segment(segment)
        elements.extend(parsed.elements)
        if parsed.error is not None:
            error = parsed.error
            break
    if not elements and error is None:
        error = "malformed"
    return _Parsed(tuple(elements), error, _swallowed(elements, seps))


@lru_cache(maxsize=4096)
def _parse_segment(segment: str) -> _Parsed:
    b = _biip()
    config = _config((GS,))
    elements: list[_Element] = []
    rest = segment
    while rest:
        try:
            es = b.ElementString.extract(rest, config=config)
        except b.ParseError:
            return _Parsed(tuple(elements), _error_kind(rest), False)
        elements.append(_element(es))
        rest = rest[len(es.ai.ai) + len(es.value) :]
    return _Parsed(tuple(elements), None, False)


def clear_caches() -> None:
    """Forget every cached parse (benchmarks measure the cold path with it)."""
    parse_elements.cache_clear()
    _parse_segment.cache_clear()
    parse_hri.cache_clear()


def _swallowed(elements: list[_Element], seps: tuple[str, ...]) -> bool:
    """Whether a variable-length value ends in a well-formed fixed-length AI the message lacks."""
    present = {e.ai for e in elements}
    for e in elements:
        value = e.value
        if len(value) < _MIN_SWALLOW or not _is_variable(e.ai):
            continue
        for i in range(1, len(value) - _MIN_SWALLOW + 2):
            ai = value[i : i + 2]
            size = _SWALLOWABLE.get(ai)
            if size is None or ai in present or not is_digits(value[i + 2 : i + 2 + size]):
                continue
            if i + 2 + size > len(value):
                continue
            tail = parse_elements(value[i:], seps)
            if tail.error is None and tail.elements and tail.elements[0].check_digit_ok:
                return True
    return False


@lru_cache(maxsize=1024)
def _is_variable(ai: str) -> bool:
    b = _biip()
    try:
        return bool(b.AI.extract(ai).separator_required)
    except b.ParseError:
        return False


@lru_cache(maxsize=1024)
def parse_hri(text: str) -> _Parsed:
    """`(01)04912345678904(17)261231(10)ABC`: the printed form, typed by a technician."""
    b = _biip()
    try:
        message = b.Message.parse_hri(text)
    except b.ParseError:
        return _Parsed((), "malformed", False)
    elements = [_element(es) for es in message.element_strings]
    return _Parsed(tuple(elements), None, False)


def to_result(parsed: _Parsed, today: date) -> Interpretation:
    """The contract's result for a parsed message, judged against `today`."""
    fields: dict[str, Any] = {}
    ais: dict[str, str] = {}
    problems: list[str] = []
    for e in parsed.elements:
        ais[e.ai] = e.value
        name = _NAMED.get(e.ai)
        if name is not None:
            fields[name] = e.date if e.ai == "17" else e.value
        if not e.check_digit_ok and "bad_check_digit" not in problems:
            problems.append("bad_check_digit")
    fields["ai"] = ais
    if parsed.error is not None:
        problems.append(parsed.error)
    if parsed.missing_separator:
        problems.append("missing_separator")
    expiry = fields.get("expiry")
    if expiry is not None and expiry < today.isoformat():
        problems.append("expired")
    return result(GS1, fields, problems)


def parse(body: str, gs_substitute: str | None, today: date) -> Interpretation:
    """Interpret `body` (AIM identifier already stripped) as GS1 element strings."""
    return to_result(parse_elements(body, separators(gs_substitute)), today)


def looks_like(body: str, gs_substitute: str | None) -> bool:
    """Cheap test, no biip: worth a GS1 parse without an AIM identifier saying so?

    A GTIN-led message (`01`/`02` + 14 digits), an SSCC (`00` + 18 digits), a string with
    digits and a separator, or the bracketed printed form.
    """
    c0 = body[:1]
    if c0 == "(":
        return len(body) >= 5 and is_digits(body[1:3]) and ")" in body[3:6]
    if not "0" <= c0 <= "9":
        return False
    head = body[:2]
    if head in ("01", "02"):
        return len(body) >= 16 and is_digits(body[2:16])
    if head == "00":
        return len(body) >= 20 and is_digits(body[2:20])
    return any(sep in body for sep in separators(gs_substitute))
